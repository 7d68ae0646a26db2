"""One simulated run: arrivals -> router -> replicas (continuous batching with speculation) -> a run folder.

    result = simulate(SimConfig(...), WorkloadSpec(kind="trace", trace="traces/azure_conv_2023_5min.jsonl"),
                      out_dir=Path("runs/demo"))
    result.summary["throughput_tok_s"]

The run folder is self-describing: config.json (everything needed to rerun it), requests.csv, iterations.csv,
summary.json. The same config and seed give byte-identical files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simpy

from echosim.metrics import Metrics, write_json
from echosim.sim.config import SimConfig, build_cost_model, kv_capacity_blocks
from echosim.sim.errors import SimError
from echosim.sim.load import capacity_rps, load_report
from echosim.sim.pricing import CTX_BUCKET, StepPricer
from echosim.sim.replica import Replica
from echosim.sim.router import Router
from echosim.sim.speculation import Speculator
from echosim.sim.workload import Arrivals, WorkloadSpec, request_chunks, trace_reader


@dataclass
class RunResult:
    summary: dict
    config: dict
    out_dir: Path | None = None
    wall_s: float = 0.0


def load_acceptance(spec: str):
    """An acceptance model from a preset name or a fitted file."""
    from echosim.sim.acceptance import AcceptanceModel

    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        return AcceptanceModel.load(path)
    try:
        return AcceptanceModel.preset(spec)
    except SimError as exc:
        raise SimError(f"{exc}; pass --acceptance PRESET or a fitted .json (echosim fit-acceptance)") from None


def make_policy(policy_cfg: dict, step_time=None):
    from echosim.spec.policies import ConfigError
    from echosim.spec.policies import make_policy as _make

    cfg = dict(policy_cfg)
    name = cfg.pop("policy", None)
    if not name:
        raise SimError("a policy config needs 'policy' (its name)", field="policy")
    cfg.pop("calibration", None)
    try:
        return _make(name, cfg, step_time)
    except ConfigError as exc:
        raise SimError(str(exc), field="policy") from None


def budget_step_time(pricer: StepPricer, speculator_ref: list):
    """The step-time callable budget policies use: (verify tokens incl. roots [n], batch size) -> ms [n], for the
    live batch's mean context and the plan's full drafting (a constant, but it shifts the goodput optimum)."""

    def step_ms(tokens, batch_size):
        spec = speculator_ref[0]
        rows = tuple(batch_size * w for w in spec.width) if spec is not None else ()
        return pricer.budget_step_ms(tokens, batch_size, spec.mean_ctx if spec is not None else 512.0, rows)

    # the answer depends on the context through its bucket only, and the budget asks for candidates B + 0..n:
    # the speculator may keep answers per (batch, bucket, n) (Speculator._step_time_cached)
    step_ms.ctx_bucket = CTX_BUCKET
    return step_ms


def simulate(config: SimConfig, workload: WorkloadSpec, out_dir: Path | None = None, records: str | None = None,
             progress: bool = False, acceptance=None, cost=None) -> RunResult:
    """`acceptance` and `cost` (a step-time model, cost_models' interface) override what the config names."""
    wall0 = time.perf_counter()
    config.check()
    c = config.cluster
    cost = cost if cost is not None else build_cost_model(c)
    kv_blocks = kv_capacity_blocks(c, cost)
    acceptance = acceptance if acceptance is not None else load_acceptance(config.acceptance)
    reader = trace_reader(workload) if workload.trace else None
    if workload.kind == "trace" and reader is None:
        raise SimError("trace replay needs a trace file (--trace)", field="trace")
    if workload.kind == "closed" and workload.concurrency < 1:
        raise SimError(f"a closed loop needs --concurrency >= 1, got {workload.concurrency}", field="concurrency")

    if records is not None and c.replicas > 1:
        raise SimError("per-node records are written for one replica; use --replicas 1 with --records")

    # one policy (and speculator) per replica in exact mode: policies may keep state across steps
    pricers = [StepPricer(cost, c.overhead_per_token_ms, c.overhead_per_draft_row_ms, c.overhead_per_request_ms)
               for _ in range(c.replicas)]
    speculators = []
    for i in range(c.replicas if config.core != "table" else 1):
        ref: list = [None]
        policy = make_policy(config.policy, budget_step_time(pricers[i], ref))
        spec = Speculator(policy, acceptance, seed=config.seed + 7919 * i, core=config.core,
                          records_path=records if i == 0 else None)
        ref[0] = spec
        speculators.append(spec)
        if spec.core == "table":
            break

    try:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        metrics = Metrics(out_dir, config.slo_ttft_ms, config.slo_tpot_ms)
    except OSError as exc:
        raise SimError(f"cannot write the run folder ({exc.strerror or exc})", path=str(out_dir)) from None
    env = simpy.Environment()
    chunks = _fitting(request_chunks(workload, config.seed, reader), kv_blocks, c.block_tokens,
                      reader.path if reader is not None and workload.kind == "trace" else None)
    bar = _progress(progress, workload)
    finished = [0]

    def on_finish(req) -> None:
        finished[0] += 1
        if bar is not None and finished[0] % 256 == 0:
            bar.update(256)
        if arrivals.concurrency:
            arrivals.issue_next()

    replicas = [Replica(env, i, pricers[i], speculators[min(i, len(speculators) - 1)], kv_blocks, c, metrics,
                        on_finish) for i in range(c.replicas)]
    router = Router(replicas, c.router)
    arrivals = Arrivals(env, chunks, router.submit, speculators[0].assign,
                        concurrency=workload.concurrency if workload.kind == "closed" else 0)
    backlog = [0]   # requests waiting when the last one arrived (open loop)
    if arrivals.concurrency:
        arrivals.start_closed_loop()
    else:
        env.process(arrivals.open_loop()).callbacks.append(
            lambda _: backlog.__setitem__(0, sum(len(r.waiting) for r in replicas)))
    try:
        env.run()
    finally:
        metrics.close()
        if bar is not None:
            bar.update(finished[0] - bar.n)
            bar.close()
    stuck = sum(r.outstanding for r in replicas)
    if stuck:
        raise SimError(f"{stuck} requests never finished (nothing could run); check the KV and batch limits")

    preemptions = sum(r.preemptions for r in replicas)
    summary = metrics.summary(preemptions)
    wall = time.perf_counter() - wall0
    sim_s = env.now
    if not arrivals.concurrency and summary["requests"]:
        n = summary["requests"]
        steps = summary["decode_request_steps"]
        capacity = capacity_rps(pricers[0], speculators[0].width, c, kv_blocks, metrics.prompt_tokens / n,
                                summary["output_tokens"] / n, summary["mat"],
                                summary["verified_tokens"] / steps if steps else 1.0)
        load = load_report(metrics, summary, capacity, c.replicas, backlog[0])
        if load is not None:
            summary["load"] = load
    summary["speculation"] = speculators[0].describe()
    state = speculators[0].policy.state()   # an adaptive budget's estimates at the end (replica 0's)
    if state:
        summary["budget_state"] = state
    summary["kv_blocks_per_replica"] = kv_blocks
    summary["routed"] = router.routed
    caches = [r.cache.stats() for r in replicas if r.cache is not None and r.cache.lookups]
    if caches:  # only traces with prefix keys (hash_ids, text) look the cache up
        hit, prompt = sum(s["hit_tokens"] for s in caches), sum(s["prompt_tokens"] for s in caches)
        summary["prefix_cache"] = {"lookups": sum(s["lookups"] for s in caches), "prompt_tokens": prompt,
                                   "hit_tokens": hit, "hit_rate": round(hit / prompt, 6) if prompt else 0.0,
                                   "evicted_tokens": sum(s["evicted_tokens"] for s in caches)}
    if reader is not None and reader.stats.bad_lines:
        summary["bad_lines_skipped"] = reader.stats.bad_lines
    summary["sim"] = {"simulated_s": round(sim_s, 6), "wall_s": round(wall, 3),
                      "speedup": round(sim_s / wall, 1) if wall > 0 else 0.0,
                      "iterations_per_s": round(metrics.iterations / wall, 1) if wall > 0 else 0.0,
                      "events": metrics.iterations + arrivals.waits,
                      "events_per_s": round((metrics.iterations + arrivals.waits) / wall, 1) if wall > 0 else 0.0,
                      "requests_per_s": round(summary["requests"] / wall, 1) if wall > 0 else 0.0}
    cfg = {"sim": config.to_json(), "workload": workload.to_json(),
           "cost_model": repr(cost), "kv_blocks_per_replica": kv_blocks,
           "policy_resolved": speculators[0].policy.describe()}
    if out_dir is not None:
        write_json(out_dir / "config.json", cfg)
        # wall-clock figures vary run to run: keep them out of the deterministic summary file
        write_json(out_dir / "summary.json", {k: v for k, v in summary.items() if k != "sim"} | {
            "speculation": {k: v for k, v in summary["speculation"].items() if k != "table_build_s"}})
    return RunResult(summary, cfg, out_dir, wall)


def _fitting(chunks, kv_blocks: int, block: int, path):
    """The chunks, checked up front: a request whose prompt and output cannot fit one replica's KV cache could
    never run; say so naming its trace line and field (a whole chunk in a few vector operations)."""
    from traces.formats import FORMATS

    for chunk in chunks:
        need = -(-(chunk.prompt_tokens + chunk.output_tokens) // block)
        over = np.flatnonzero(need > kv_blocks)
        if len(over):
            i = int(over[0])
            p, o = int(chunk.prompt_tokens[i]), int(chunk.output_tokens[i])
            fmt = FORMATS.get(chunk.format)
            prompt_only = -(-p // block) > kv_blocks
            field = (fmt.prompt_field if prompt_only else fmt.output_field) if fmt is not None else \
                ("prompt_tokens" if prompt_only else "output_tokens")
            line = int(chunk.line[i]) if chunk.line is not None and path is not None else None
            raise SimError(f"a request of {p:,} prompt + {o:,} output tokens needs {int(need[i]):,} KV blocks of "
                           f"{block} tokens, more than a replica holds ({kv_blocks:,}); use a larger GPU, more TP, "
                           "or drop it from the trace", path=str(path) if line is not None else None, line=line,
                           field=field)
        yield chunk


def _progress(enabled: bool, workload: WorkloadSpec):
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    if not sys.stderr.isatty():
        return None
    return tqdm(total=workload.requests, unit="req", desc="simulating", delay=1.0, leave=False)
