"""Strict replay: one trace through the real engine and through the simulator, and how far apart they land.

DESIGN.md, "Validation": the same arrivals and lengths go through both; the simulator prices its steps with a
cost model fitted from the engine's own profile on this machine, its acceptance model is fitted from the engine's
records on other prompts than the replay's, and its KV capacity, batch limits and policy are the engine's.
Reported: signed and absolute percentage error of token throughput, MAT, TTFT, TPOT and E2E (mean, P50, P90, P99).

Phases, each writing into the run folder so that the run describes itself:
1. prompts: the held-out standard-library files (never trained on) split in two, calibration and replay;
2. profile: the target's and the draft's packed forwards timed on this device and fitted (cost_models);
3. calibrate: the engine, behind its HTTP server as in the replay, decodes calibration prompts streamed in bursts
   of a few batch sizes, logging per-node records and per-step times; the acceptance model is fitted to the
   records, and the engine's own CPU work per step (scheduling, sampling, bookkeeping, serving: what a forward
   profile does not see) to what the fitted forwards leave unexplained;
4. engine: the replay's requests sent by the replay client to the engine behind the HTTP server (127.0.0.1);
5. sim: the same requests (the trace's arrivals, the engine's prompt and output token counts) simulated;
6. compare.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from echosim.validate.errors import ValidationError
from echosim.validate.step_overheads import DRIFT_WARN, Overheads, fit_overheads, priced_steps_ms, replay_drift

# Metrics compared, as (summary key, sub-key or None). Percentiles come from the same definitions on both sides
# (echosim.metrics.Metrics).
METRICS = [("throughput_tok_s", None), ("mat", None)] + [
    (name, q) for name in ("ttft_ms", "tpot_ms", "e2e_ms") for q in ("mean", "p50", "p90", "p99")]


@dataclass
class CrossValConfig:
    model: str                          # target model directory (config.json + safetensors)
    draft: str | None                   # draft model directory (None for ar)
    policy: str = "eagle3"
    policy_config: dict | None = None
    trace: str = "synthetic_bursty_4rps"
    limit: int = 48                     # the trace's first N requests
    time_scale: float = 1.0
    max_prompt_tokens: int = 256        # lengths clipped alike for both sides
    max_output_tokens: int = 64
    max_running: int = 16
    num_kv_blocks: int | None = None    # default: room for max_running requests of the longest clipped length
    block_size: int = 16
    max_prefill_tokens: int = 512
    calibration_prompts: int | None = None  # default: max(16, max_running), so the largest batch is reached
    calibration_batches: tuple[int, ...] = ()  # default: 1, max_running / 4, max_running
    profile_repeats: int = 3             # timed calls per grid point per round
    profile_rounds: int = 3              # passes over the grid (a slow spell hits every point a little)
    engine_runs: int = 2                 # the replay through the engine again: the noise floor of the errors
    sim_seeds: int = 8                   # the simulator at this many seeds; compared by their mean (its own noise)
    device: str = "cpu"
    threads: int = 1
    seed: int = 0

    def check(self) -> None:
        for name in ("limit", "max_prompt_tokens", "max_output_tokens", "max_running", "block_size",
                     "max_prefill_tokens", "calibration_prompts", "profile_repeats", "profile_rounds",
                     "engine_runs", "sim_seeds", "threads"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValidationError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        if not self.time_scale > 0:
            raise ValidationError(f"time_scale must be > 0, got {self.time_scale}", field="time_scale")
        for flag, d in (("model", self.model), ("draft", self.draft)):
            if d is not None and not (Path(d) / "config.json").is_file():
                raise ValidationError(f"{flag}: not a model directory (no config.json)", path=str(d))
        if self.draft is None and self.policy != "ar":
            raise ValidationError(f"policy {self.policy!r} needs a draft model", field="draft")
        from echosim.spec.policies import ConfigError, make_policy
        from traces import resolve_trace

        try:
            make_policy(self.policy, self.policy_config)
        except ConfigError as exc:
            raise ValidationError(str(exc), field="policy_config") from None
        resolve_trace(str(self.trace))  # a missing trace fails here, before anything is written

    def batches(self) -> list[int]:
        if self.calibration_batches:
            return sorted(set(int(b) for b in self.calibration_batches))
        return sorted({1, max(self.max_running // 4, 1), self.max_running})

    def n_calibration_prompts(self) -> int:
        """Calibration prompts: as many as the largest calibration batch at least, else that batch is never run
        (with 16 prompts at max_running 64 the calibration's largest batch was 16, and the overhead fit priced
        the replay's batches of 32-63, most of its time, by extrapolation)."""
        if self.calibration_prompts is not None:
            return int(self.calibration_prompts)
        return max(16, max(self.batches()))

    def kv_blocks(self) -> int:
        if self.num_kv_blocks is not None:
            return int(self.num_kv_blocks)
        per_request = -(-(self.max_prompt_tokens + self.max_output_tokens + 128) // self.block_size)
        return self.max_running * per_request


# ----------------------------------------------------------------------------------------------------------
# 1. prompts


def prompt_files() -> tuple[list[Path], list[Path]]:
    """(calibration files, replay files): the held-out standard-library files, alternating in sorted order."""
    from echo_exec.train_tiny import split_files

    _, held = split_files()
    held = sorted(f for f in held if f.stat().st_size >= 1024)  # skip near-empty files (__init__.py...)
    if len(held) < 4:
        raise ValidationError("too few held-out standard-library files for calibration and replay prompts")
    return held[0::2], held[1::2]


def _window(path: Path, need: int, rng: np.random.Generator, limit: int = 8192) -> str:
    """Up to `limit` bytes of a file from a seeded offset that leaves `need` bytes after it: a replay prompt cut as
    the calibration prompts are (a file's first bytes, its licence and docstring, read unlike its code)."""
    data = path.read_bytes()
    start = int(rng.integers(0, len(data) - need)) if len(data) > need else 0
    return data[start:start + limit].decode("utf-8", errors="ignore")


def calibration_prompts(files: list[Path], n: int, prompt_len: int, seed: int) -> list[list[int]]:
    """n byte-token prompts of prompt_len from the calibration files, at seeded offsets: each file once in a
    seeded order, then again at other offsets while more are asked for than there are files."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    pool = [f for f in files if f.stat().st_size > prompt_len + 16]
    if not pool:
        raise ValidationError(f"no calibration file is longer than the prompts ({prompt_len} bytes)")
    while len(out) < n:
        for f in [pool[i] for i in rng.permutation(len(pool))[:n - len(out)]]:
            data = f.read_bytes()
            start = int(rng.integers(0, len(data) - prompt_len))
            out.append(list(data[start:start + prompt_len]))
    return out


# ----------------------------------------------------------------------------------------------------------
# 2. profile and fit


def profile_and_fit(cfg: CrossValConfig, out: Path, log) -> Path:
    """Profiles of the target and the draft on this device, and the step-time model fitted to both."""
    import torch

    from cost_models.fitted import ape_stats, fit_params, heldout_stats, predict_obs
    from cost_models.profiles import concat, read_profile, write_profile
    from cost_models.roofline import RooflineParams
    from cost_models.specs import load_model
    from echo_exec.profiler import profile_model
    from echosim.spec.policies import make_policy

    torch.set_num_threads(cfg.threads)
    # the grid spans what the engine will run: contexts up to the longest request, trees up to the policy's
    # largest (verify), beams of every request (draft)
    ctx = sorted({0, cfg.max_prompt_tokens // 2, cfg.max_prompt_tokens + cfg.max_output_tokens})
    batches = sorted({1, 2, 4, 8, cfg.max_running})
    policy = make_policy(cfg.policy, cfg.policy_config)
    plan = policy.plan(1)
    candidates = drafted_candidates(plan)
    tree = min(1 + candidates, max(getattr(policy.config, "num_draft_tokens", 1 + candidates), 1))
    tree_tokens = [t for t in (1, 2, 4, 8, 16, 32, 64, 128) if t < 2 * tree] or [1]
    jobs = [("target", cfg.model, batches, tree_tokens)]
    if cfg.draft:
        jobs.append(("draft", cfg.draft, sorted({*batches, max(plan.k, 1) * cfg.max_running}), [1, 2, 4, 8]))
    paths = []
    for role, d, widths, tokens in jobs:
        t0 = time.perf_counter()
        spec = load_model(d)
        rows = profile_model(spec, device=cfg.device, batch_sizes=widths, tokens_per_seq=tokens, kv_lens=ctx,
                             warmup=2, repeats=cfg.profile_repeats, rounds=cfg.profile_rounds)
        if role == "target":  # prefill chunks: one sequence, up to the chunk budget
            chunks = [t for t in (64, 128, 256, 512, 1024, 2048) if t <= cfg.max_prefill_tokens]
            rows += profile_model(spec, device=cfg.device, batch_sizes=(1,), tokens_per_seq=chunks,
                                  kv_lens=(0, cfg.max_prompt_tokens // 2), warmup=2, repeats=cfg.profile_repeats,
                                  rounds=cfg.profile_rounds)
        path = out / f"profile_{role}.csv"
        write_profile(rows, path)
        paths.append(path)
        log(f"profiled the {role} ({spec.name}): {len(rows)} points in {time.perf_counter() - t0:.1f} s")
    base = RooflineParams(hardware="this-machine", gemm_tflops=1.0, gemm_gbps=100.0, elem_gbps=100.0,
                          attn_tflops=1.0, attn_gbps=100.0, attn_kv_block=1.0)
    tables = [read_profile(p) for p in paths]
    res = fit_params(concat(tables), base, kv_block=1.0)
    stats = {}
    for t, p in zip(tables, paths, strict=True):
        stats[p.name] = {"full_fit": ape_stats(predict_obs(t, res.params), t.obs_measured_ms),
                         "heldout": heldout_stats(t, base, kv_block=1.0)}
        h = stats[p.name]["heldout"]["test"]
        log(f"step-time fit, {p.name}: held-out median {h['median_ape_pct']}% P90 {h['p90_ape_pct']}%")
    fit = {"kind": "fitted", "hardware": "this-machine", "params": res.params.to_dict(),
           "fitted_parameters": res.fitted, "profiles": [p.name for p in paths], "stats": stats,
           "command": "echosim validate (echosim/validate/crossval.py)"}
    path = out / "cost_fit.json"
    path.write_text(json.dumps(fit, indent=2) + "\n")
    (out / "hardware.json").write_text(json.dumps({
        "name": "this-machine", "peak_bf16_tflops": 1.0, "hbm_tbps": 0.1, "memory_gb": 1.0, "nvlink_gbps": 1.0,
        "source": "the machine the profiles ran on (memory unused: the KV capacity is the engine's)"}, indent=2))
    return path


def set_draft_depth_overhead(fit_path: Path, ms: float) -> None:
    """Store the engine's fitted cost per draft depth in the step-time fit (the cost model's draft_depth_overhead_ms):
    the simulator's pricing and the goodput budgets then charge it for every depth a step drafts."""
    fit = json.loads(fit_path.read_text())
    fit["params"]["draft_depth_overhead_ms"] = float(ms)
    fit["draft_depth_overhead_source"] = "fitted on the engine's calibration steps (overheads.json)"
    fit_path.write_text(json.dumps(fit, indent=2) + "\n")


def step_predictor(cfg: CrossValConfig, fit_path: Path, step_overhead_ms: float | None = None):
    """The fitted step-time model of this engine (target + draft) on this machine; with the engine's fitted
    per-step overhead, it prices a step as the simulator will (ClusterConfig.step_overhead_ms)."""
    from cost_models.fitted import FittedCostModel

    return FittedCostModel(cfg.model, fit_path.parent / "hardware.json", draft=cfg.draft, params=fit_path,
                           step_overhead_ms=step_overhead_ms)


# ----------------------------------------------------------------------------------------------------------
# 3. calibrate: acceptance and per-step overheads


def make_engine(cfg: CrossValConfig, *, policy: str | None = None, policy_config: dict | None = None,
                records: Path | None = None, log_iterations: bool = True):
    import torch

    from echo_exec.engine import Engine

    torch.set_num_threads(cfg.threads)
    name = policy or cfg.policy
    return Engine(cfg.model, cfg.draft if name != "ar" else None, policy=name,
                  policy_config=policy_config if policy else cfg.policy_config, device=cfg.device,
                  max_running=cfg.max_running, num_kv_blocks=cfg.kv_blocks(), block_size=cfg.block_size,
                  max_prefill_tokens=cfg.max_prefill_tokens, records_path=records, seed=cfg.seed,
                  log_iterations=log_iterations)


def drafted_candidates(plan) -> int:
    """Nodes a request drafts under a plan (DraftPlan): k1 at depth 1, k * k at every deeper depth."""
    return plan.k1 + max(plan.depth - 1, 0) * plan.k * plan.k if plan.depth > 0 else 0


def verifies_every_candidate(policy: str, config: dict | None) -> bool:
    """A static tree whose token budget holds all its drafted candidates (records then show the drafter whole)."""
    from echosim.spec.policies import make_policy

    pol = make_policy(policy, config)
    plan = pol.plan(1)
    return plan.depth > 0 and getattr(pol.config, "num_draft_tokens", 0) >= 1 + drafted_candidates(plan)


# the largest tree the records run verifies. Every candidate of the usual shapes fits (steps 5-6 x topk 4: 69-85
# tokens), so the fit keeps the records' own draft marginal; at 64 the shipped 5 x 4 shape (68 candidates) fell
# back to the parametric one, whose drafts grow surer with depth than the real drafter's (docs/ADAPTIVE.md)
RECORDS_TREE_MAX = 128


def records_shape(cfg: CrossValConfig) -> dict | None:
    """The static tree whose records the acceptance model is fitted from: the policy's draft shape, every
    candidate verified (up to RECORDS_TREE_MAX tokens), so no gating or budget filters what the records show of
    the drafter. None when the policy's own records serve (eagle3) or it drafts nothing (ar)."""
    from echosim.spec.policies import make_policy

    if cfg.policy in ("ar", "eagle3"):
        return None
    plan = make_policy(cfg.policy, cfg.policy_config).plan(1)
    if plan.depth == 0:
        return None
    return {"steps": plan.depth, "topk": plan.k,
            "num_draft_tokens": min(1 + drafted_candidates(plan), RECORDS_TREE_MAX)}


def engine_decode(cfg: CrossValConfig, eng, prompts: list[list[int]], cost, prompt_len: int,
                  log) -> tuple[list, float]:
    """The calibration prompts in bursts of each calibration batch size, streamed through our engine's server: the
    engine's step log and its MAT."""
    from echo_exec.engine import SamplingParams
    from echo_exec.replay import ReplayItem, replay

    bind_budget(eng, cost, None, prompt_len + cfg.max_output_tokens / 2)
    eng.generate(prompts[:1], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    eng.iterations.clear()
    t0 = time.perf_counter()
    texts = [bytes(p).decode("utf-8", errors="ignore") for p in prompts]
    with served(eng, eng.policy.name) as url:
        for b in cfg.batches():
            for i in range(0, len(texts), b):
                burst = [ReplayItem(j, f"cal-{b}-{j}", 0.0, texts[j], len(prompts[j]), cfg.max_output_tokens)
                         for j in range(i, min(i + b, len(texts)))]
                failed = [r.error for r in asyncio.run(replay(url, burst)) if not r.ok]
                if failed:
                    raise ValidationError(f"a calibration request failed: {failed[0]}")
    eng.close()
    mat = eng.stats()["avg_accept_length"]
    log(f"calibration ({eng.policy.name}): {len(prompts)} prompts at batch {cfg.batches()}, "
        f"{len(eng.iterations)} steps in {time.perf_counter() - t0:.1f} s, MAT {mat:.2f}")
    return list(eng.iterations), mat


def calibrate(cfg: CrossValConfig, files: list[Path], cost, out: Path, prompt_len: int, log):
    """Engine runs on calibration prompts at each calibration batch size: per-node records -> acceptance model,
    per-step times of the policy -> overheads. Returns (acceptance path, Overheads, the calibration steps)."""
    prompts = calibration_prompts(files, cfg.n_calibration_prompts(), prompt_len, cfg.seed + 1)
    acc_path = acceptance_from_engine(cfg, prompts, cost, out, prompt_len, log)
    its, _ = engine_decode(cfg, make_engine(cfg), prompts, cost, prompt_len, log)
    write_iterations(out / "calibration_iterations.csv", its, t_origin=its[0].start_s if its else 0.0)
    over = fit_overheads(cost, its)
    log_overheads(over, log)
    return acc_path, over, its


def log_overheads(over: Overheads, log) -> None:
    log(f"engine overheads: {over.step_overhead_ms:.3f} ms/step + {over.overhead_per_token_ms:.4f} ms/token + "
        f"{over.overhead_per_draft_row_ms:.4f} ms/draft row + {over.overhead_per_request_ms:.4f} ms/request + "
        f"{over.overhead_per_draft_depth_ms:.3f} ms/draft depth "
        f"(fitted forwards explain "
        f"{over.forward_share:.0%} of step time; per-step median error {over.median_ape_pct}%)")


def acceptance_from_engine(cfg: CrossValConfig, prompts: list[list[int]], cost, out: Path, prompt_len: int,
                           log) -> Path | None:
    """The acceptance model, fitted to per-node records of our engine on the calibration prompts (a run of its
    own: writing records costs step time the replay never pays); None for plain decoding."""
    from echosim.sim.acceptance_fit import fit_records
    from echosim.spec.records import read_records

    if cfg.policy == "ar":
        return None
    records = out / "calibration_records.jsonl"
    shape = records_shape(cfg)
    _, records_mat = engine_decode(cfg, make_engine(cfg, policy="eagle3" if shape else None, policy_config=shape,
                                                    records=records), prompts, cost, prompt_len, log)
    rec = read_records(records)
    # the records' own draft distribution is kept when they show every candidate (docs/ACCEPTANCE.md)
    marginal = "empirical" if verifies_every_candidate("eagle3", shape or cfg.policy_config) else "logit-normal"
    # Lower ranks take the records' own share of the draft mass, and the latent's split between request and step
    # gives the records' step-to-step autocorrelation (docs/ACCEPTANCE.md). Together they brought the MAT error
    # of 16 saved ECHO runs from mean |3.9|% to |2.0|% and of 8 eagle3 runs from |2.6|% to |2.1|%; either alone
    # helped one policy and hurt the other (docs/VALIDATION.md). The maximum-likelihood skill is kept (matching
    # the records run's MAT instead put ECHO's MAT 3-11% high): the records' tree MAT is reported, not matched.
    from echosim.sim.acceptance import measure_mat
    from echosim.sim.acceptance_fit import match_persistence
    from echosim.spec.policies import make_policy

    model = fit_records(rec, name="engine-calibration", draft_marginal=marginal, rank_shares=True).model
    model, persist = match_persistence(model, rec)
    tree_mat = measure_mat(model, make_policy("eagle3", shape or cfg.policy_config), "default")["mat"]
    note = (f"; sigma_request {model.accept_params.sigma_request:.3f}, sigma_step {model.accept_params.sigma_step:.3f}"
            f" for the records' step-to-step autocorrelation {persist['records_autocorrelation'] or 0:.3f}"
            f"; on the records' tree it gives MAT {tree_mat:.2f}, the records run {records_mat:.2f}")
    acc_path = out / "acceptance.json"
    model.save(acc_path)
    log(f"acceptance model fitted to {len(rec):,} calibration records"
        + (f" (eagle3 {shape})" if shape is not None else "") + f", {marginal} draft marginal" + note)
    return acc_path


def bind_budget(engine, cost, over: Overheads | None, mean_ctx: float) -> None:
    """Goodput budgets pick their size against the step time: give the engine's policy the fitted one, priced as
    the simulator prices its budgets (StepPricer.budget_step_ms)."""
    from echosim.sim.pricing import StepPricer
    from echosim.spec.drafting import depth_widths

    pricer = StepPricer(cost, over.overhead_per_token_ms if over else 0.0,
                        over.overhead_per_draft_row_ms if over else 0.0, over.overhead_per_request_ms if over else 0.0)
    plan = engine.policy.plan(1)
    widths = depth_widths(plan.depth, plan.k1, plan.k)

    def step_ms(tokens, batch_size):  # the plan's full drafting, as the simulator's budgets price it
        return pricer.budget_step_ms(tokens, batch_size, mean_ctx, tuple(batch_size * w for w in widths))

    engine.policy.bind(step_ms)


def write_iterations(path: Path, iterations, t_origin: float) -> None:
    """The engine's steps in the simulator's iterations.csv columns (the split: draft, target, the rest)."""
    from echosim.metrics import ITERATION_COLUMNS

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ITERATION_COLUMNS)
        for it in iterations:
            start = it.start_s - t_origin
            batch = 0 if it.verify_tokens is None else len(it.verify_tokens)
            verified = 0 if it.verify_tokens is None else int(it.verify_tokens.sum())
            kv = 0 if it.context_lens is None else int(it.context_lens.sum())
            rest = it.step_ms - it.draft_ms - it.target_ms
            w.writerow([0, f"{start:.6f}", f"{start + it.step_ms / 1e3:.6f}", batch,
                        sum(c for c, _ in it.prefill_chunks), verified, it.accepted, f"{it.draft_ms:.4f}",
                        f"{it.target_ms:.4f}", "0", f"{rest:.4f}", f"{it.step_ms:.4f}", kv, it.waiting])


# ----------------------------------------------------------------------------------------------------------
# 4. engine replay, 5. simulation, 6. comparison


@contextmanager
def served(eng, policy: str):
    """The engine behind the HTTP server on 127.0.0.1 (this process, its own thread); yields the base URL. The
    calibration and the replay both go through it, so the overheads fitted include the server's own work."""
    from echo_exec.engine import SamplingParams
    from echo_exec.server import EchoServer, Limits, ServerThread
    from echo_exec.tokenizer import ByteTokenizer

    server = EchoServer(eng, make_params=SamplingParams, limits=Limits(eng.vocab_size, eng.max_len),
                        info={"policy": policy}, encode=ByteTokenizer().encode)
    thread = ServerThread(server)
    try:
        yield thread.url
    finally:
        thread.stop()


def replay_engine(cfg: CrossValConfig, items, eng, out: Path, log) -> dict:
    """The replay client against the engine behind the HTTP server."""
    from echo_exec.engine import SamplingParams
    from echo_exec.replay import replay, summarize, write_outputs

    eng.generate([[65] * 32], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    eng.iterations.clear()
    with served(eng, cfg.policy) as url:
        log(f"engine: replaying {len(items)} requests over {items[-1].scheduled_s:.1f} s to {url}")
        records = asyncio.run(replay(url, items))
    summary = summarize(records)
    state = eng.policy.state()   # an adaptive budget's estimates at the end of the replay
    if state:
        summary["budget_state"] = state
    its = list(eng.iterations)
    # what a client cannot see, the engine's own log can: fill the per-step keys the simulator reports
    steps = [it for it in its if it.verify_tokens is not None]
    summary.update(iterations=len(its), mean_batch=round(np.mean([len(it.verify_tokens) for it in steps]), 3)
                   if steps else 0.0, step_ms_mean=round(float(np.mean([it.step_ms for it in its])), 4) if its else 0.0,
                   verified_tokens=int(sum(int(it.verify_tokens.sum()) for it in steps)),
                   prefill_tokens=int(sum(c for it in its for c, _ in it.prefill_chunks)))
    write_outputs(out, records, summary, {"command": "echosim validate: engine side", **asdict(cfg)})
    t0 = min((it.start_s for it in its), default=0.0)
    write_iterations(out / "iterations.csv", its, t_origin=t0)
    if summary["failed"]:
        raise ValidationError(f"{summary['failed']} replayed requests failed, e.g. {summary['errors'][0]}")
    return {"summary": summary, "records": records, "iterations": its}


def simulate_same(cfg: CrossValConfig, records, fit_path: Path, acc_path: Path | None, over: Overheads,
                  mean_ctx: float, out: Path, hardware: str | None = None, speed: float = 1.0) -> list[dict]:
    """The engine's requests (trace arrivals; the prompt and output tokens it served) through the simulator, at
    cfg.sim_seeds seeds (cfg.seed, cfg.seed + 1, ...): their summaries, the first seed's run folder in `out`.
    A few dozen requests are a small sample of the acceptance model's per-request difficulty: one seed's MAT
    moved by up to +-12% against another's on the same replay (docs/ADAPTIVE.md), so one seed is no reference.
    speed: every step's price times this (the fitted forwards and the overheads alike; ScaledCostModel)."""
    from cost_models.scaled import ScaledCostModel
    from echosim.sim.config import ClusterConfig, SimConfig, build_cost_model
    from echosim.sim.simulator import simulate
    from echosim.sim.workload import WorkloadSpec
    from traces.request import TraceArrays
    from traces.writer import write_jsonl

    order = sorted(records, key=lambda r: r.index)
    trace = out / "trace.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(trace, TraceArrays(arrival_s=np.array([r.scheduled_s for r in order]),
                                   prompt_tokens=np.array([r.prompt_tokens for r in order], np.int64),
                                   output_tokens=np.array([r.output_tokens for r in order], np.int64)))
    hardware = hardware or str(fit_path.parent / "hardware.json")  # profile_and_fit writes it beside the fit
    cluster = ClusterConfig(model=cfg.model, hardware=hardware, draft=cfg.draft,
                            cost_model=str(fit_path), step_overhead_ms=over.step_overhead_ms,
                            overhead_per_token_ms=over.overhead_per_token_ms * speed,
                            overhead_per_draft_row_ms=over.overhead_per_draft_row_ms * speed,
                            overhead_per_request_ms=over.overhead_per_request_ms * speed, max_running=cfg.max_running,
                            # the engine caps each step's prefill chunks, not its trees plus chunks
                            max_prefill_tokens=cfg.max_prefill_tokens, prefill_forward="separate",
                            max_batched_tokens=cfg.max_prefill_tokens + cfg.max_running * 4096,
                            block_tokens=cfg.block_size, kv_blocks=cfg.kv_blocks())
    policy = {"policy": cfg.policy, **(cfg.policy_config or {})}
    sim = SimConfig(cluster=cluster, policy=policy, acceptance=str(acc_path) if acc_path else "qwen3-8b",
                    core="exact", seed=cfg.seed)
    cost = ScaledCostModel(build_cost_model(cluster), speed) if speed != 1.0 else None
    workload = WorkloadSpec(kind="trace", trace=str(trace))
    return [simulate(replace(sim, seed=cfg.seed + i), workload, out_dir=out if i == 0 else None, cost=cost).summary
            for i in range(max(int(cfg.sim_seeds), 1))]


def _get(summary: dict, key: str, sub: str | None):
    v = summary.get(key)
    if sub is not None:
        v = (v or {}).get(sub)
    return None if v is None else float(v)


def _err(ref: float | None, x: float | None) -> float | None:
    return None if ref is None or x is None or ref == 0 else (x - ref) / abs(ref) * 100


def compare(engine: dict, sim: dict | list[dict], reruns: list[dict] = ()) -> list[dict]:
    """Per metric: engine value, simulated value, signed error (sim - engine) / engine in %, and its absolute;
    with reruns of the engine on the same replay, the largest absolute error of a rerun against the first run
    (the machine's own noise: the floor under any simulator error), and the simulator against all the engine's
    runs together: their mean, lowest and highest, the signed error against the mean, and whether the simulated
    value lies inside the runs' range. Where the engine's own decisions depend on its measured step times (an
    adaptive budget), one run is a sample, not a reference (docs/VALIDATION.md). `sim` may be several simulated
    runs (seeds): the simulated value is then their mean, with their lowest and highest."""
    sims = sim if isinstance(sim, list) else [sim]
    rows = []
    for key, sub in METRICS:
        e = _get(engine, key, sub)
        seeds = [_get(x, key, sub) for x in sims]
        s = None if None in seeds else float(np.mean(seeds))
        err = _err(e, s)
        runs = [e] + [_get(r, key, sub) for r in reruns]
        noise = [_err(e, x) for x in runs[1:]]
        row = {"metric": key if sub is None else f"{key}.{sub}", "engine": e, "sim": s,
               "signed_pct": None if err is None else round(err, 2),
               "abs_pct": None if err is None else round(abs(err), 2),
               "engine_rerun_abs_pct": None if not noise or None in noise else
               round(max(abs(x) for x in noise), 2)}
        if len(sims) > 1 and s is not None:
            row.update({"sim_seeds": len(sims), "sim_min": min(seeds), "sim_max": max(seeds)})
        if reruns and None not in runs:
            mean = float(np.mean(runs))
            err_mean = _err(mean, s)
            row.update({"engine_runs": len(runs), "engine_mean": mean, "engine_min": min(runs),
                        "engine_max": max(runs),
                        "signed_pct_vs_mean": None if err_mean is None else round(err_mean, 2),
                        "sim_in_engine_range": None if s is None else bool(min(runs) <= s <= max(runs))})
        rows.append(row)
    return rows


def format_comparison(rows: list[dict]) -> str:
    def cell(x, digits=1):
        return "n/a" if x is None else f"{x:,.{digits}f}"

    several = any("engine_mean" in r for r in rows)
    seeds = max((r.get("sim_seeds", 1) for r in rows), default=1)
    sim_head = f"sim: mean of {seeds} seeds (lowest - highest)" if seeds > 1 else "sim"
    head = f"| metric | engine | {sim_head} | signed error | abs error | engine rerun (abs) |"
    if several:
        head += " engine runs: mean (lowest - highest) | sim vs mean | sim inside the runs' range |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        d = 3 if r["metric"] == "mat" else 1
        rerun = r.get("engine_rerun_abs_pct")
        sim = cell(r["sim"], d) + (f" ({cell(r['sim_min'], d)} - {cell(r['sim_max'], d)})" if "sim_min" in r else "")
        line = (f"| {r['metric']} | {cell(r['engine'], d)} | {sim} | "
                f"{cell(r['signed_pct'])}% | {cell(r['abs_pct'])}% | "
                f"{'-' if rerun is None else cell(rerun) + '%'} |")
        if several:
            if "engine_mean" in r:
                inside = r["sim_in_engine_range"]
                inside = "n/a" if inside is None else "yes" if inside else "no"
                line += (f" {cell(r['engine_mean'], d)} ({cell(r['engine_min'], d)} - {cell(r['engine_max'], d)}) | "
                         f"{cell(r['signed_pct_vs_mean'])}% | {inside} |")
            else:
                line += " n/a | n/a | n/a |"
        lines.append(line)
    return "\n".join(lines)


BATCH_CLASSES = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, None))  # None: no upper end


def _class_label(lo: int, hi: int | None) -> str:
    return f"decode, batch {lo}" + ("+" if hi is None else "" if hi == lo else f"-{hi}")


def step_breakdown(engine_csv: Path, sim_csv: Path, engine_priced_ms: np.ndarray | None = None) -> list[dict]:
    """Where step-time errors come from: the engine's and the simulator's iterations (iterations.csv, the same
    columns) by kind (decode steps by batch size class, steps with prefill chunks): how many, mean step time,
    tokens verified per request, mean prefill tokens; with engine_priced_ms (one per engine row,
    priced_steps_ms), the engine's own steps as the simulator's step model prices them."""
    import pandas as pd

    frames = {name: pd.read_csv(path) for name, path in (("engine", engine_csv), ("sim", sim_csv))}
    if engine_priced_ms is not None:
        if len(engine_priced_ms) != len(frames["engine"]):
            raise ValueError(f"{len(engine_priced_ms)} priced steps for {len(frames['engine'])} engine rows")
        frames["engine"]["priced_ms"] = engine_priced_ms
    kinds = [(_class_label(lo, hi), ("decode", lo, hi)) for lo, hi in BATCH_CLASSES]
    kinds.append(("with prefill chunks", ("prefill", 0, None)))
    rows = []
    for label, (kind, lo, hi) in kinds:
        row = {"steps": label}
        for name, d in frames.items():
            if kind == "prefill":
                mask = d.prefill_tokens > 0
            else:
                mask = (d.prefill_tokens == 0) & (d.batch >= lo)
                if hi is not None:
                    mask &= d.batch <= hi
            sel = d[mask]
            row[f"{name}_n"] = len(sel)
            row[f"{name}_step_ms"] = round(float(sel.step_ms.mean()), 2) if len(sel) else None
            dec = sel[sel.batch > 0]
            row[f"{name}_tokens_per_request"] = round(float(dec.verified_tokens.sum() / dec.batch.sum()), 2) \
                if len(dec) else None
            row[f"{name}_prefill_tokens"] = round(float(sel.prefill_tokens.mean()), 1) if len(sel) else None
            if "priced_ms" in sel:
                row["engine_priced_ms"] = round(float(sel.priced_ms.mean()), 2) if len(sel) else None
        if row["engine_n"] or row["sim_n"]:
            rows.append(row)
    return rows


def format_breakdown(rows: list[dict]) -> str:
    def cell(x):
        return "-" if x is None else f"{x:,}"

    priced = any("engine_priced_ms" in r for r in rows)
    head = "| steps | engine n | sim n | engine step ms | "
    head += "engine steps priced by the model, ms | " if priced else ""
    lines = [head + "sim step ms | tokens/request (engine / sim) | prefill tokens (engine / sim) |",
             "|---" * (8 if priced else 7) + "|"]
    for r in rows:
        mid = f"{cell(r.get('engine_priced_ms'))} | " if priced else ""
        lines.append(f"| {r['steps']} | {r['engine_n']} | {r['sim_n']} | {cell(r['engine_step_ms'])} | {mid}"
                     f"{cell(r['sim_step_ms'])} | {cell(r['engine_tokens_per_request'])} / "
                     f"{cell(r['sim_tokens_per_request'])} | {cell(r['engine_prefill_tokens'])} / "
                     f"{cell(r['sim_prefill_tokens'])} |")
    return "\n".join(lines)


def budget_states(engine_runs: list[dict], sim: dict) -> list[dict]:
    """What each side's adaptive budget had learnt by the end (policy state(): its step-cost fits and how much it
    drafted), one row per engine run and one for the simulator; empty for policies without such a budget. Where
    the two sides' MAT or verified tokens part, this says whether the costs they learnt or the acceptance did."""
    rows = []
    for name, summary in [(f"engine run {i + 1}", r) for i, r in enumerate(engine_runs)] + [("sim", sim)]:
        st = summary.get("budget_state")
        if not st:
            continue
        per = st.get("per_drafting_request_step") or {}
        rows.append({"side": name, "steps": st.get("steps"), "verify_ms_model": st.get("verify_ms_model"),
                     "draft_ms_model": st.get("draft_ms_model"), "fixed_ms": st.get("fixed_ms"),
                     "expected_accepted": per.get("expected_accepted"), "verified_drafts": per.get("verified_drafts"),
                     "draft_depth": per.get("draft_depth")})
    return rows


def format_budget_states(rows: list[dict]) -> str:
    def num(x):
        return "n/a" if x is None else f"{x:,.3g}"

    def fit(d):
        return "n/a" if not d else " / ".join(num(v) for v in d.values())

    head = rows[0] if rows else {}
    v_keys = " / ".join((head.get("verify_ms_model") or {}).keys()) or "verify fit"
    d_keys = " / ".join((head.get("draft_ms_model") or {}).keys()) or "draft fit"
    lines = [f"| side | steps | verify ms fit ({v_keys}) | draft ms fit ({d_keys}) | rest of a step, ms | "
             "per drafting request-step: expected accepted / verified drafts / depth |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['side']} | {num(r['steps'])} | {fit(r['verify_ms_model'])} | {fit(r['draft_ms_model'])} | "
                     f"{num(r['fixed_ms'])} | {num(r['expected_accepted'])} / {num(r['verified_drafts'])} / "
                     f"{num(r['draft_depth'])} |")
    return "\n".join(lines)


def replay_plan(cfg: CrossValConfig, out: Path, header: dict) -> tuple[list[Path], list, int, float]:
    """Check the config, start the run folder (config.json with `header`) and cut the replay's prompts: (the
    calibration files, the replay items, the median prompt length, the mean context the budgets are priced at)."""
    from echo_exec.replay import plan_from_trace

    cfg.check()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**header, **asdict(cfg)}, indent=2) + "\n")
    cal_files, replay_files = prompt_files()
    prompt_set = out / "replay_prompts.jsonl"
    rng = np.random.default_rng(cfg.seed + 2)
    prompt_set.write_text("".join(json.dumps({"prompt": _window(f, cfg.max_prompt_tokens, rng)}) + "\n"
                                  for f in replay_files))
    items = plan_from_trace(cfg.trace, time_scale=cfg.time_scale, limit=cfg.limit, prompt_set=prompt_set,
                            max_prompt_tokens=cfg.max_prompt_tokens, max_output_tokens=cfg.max_output_tokens)
    prompt_len = int(np.median([it.target_prompt_tokens for it in items]))
    return cal_files, items, prompt_len, prompt_len + cfg.max_output_tokens / 2


def run(cfg: CrossValConfig, out: Path, log=print) -> dict:
    t_start = time.perf_counter()
    cal_files, items, prompt_len, mean_ctx = replay_plan(cfg, out, {"command": "echosim validate"})
    fit_path = profile_and_fit(cfg, out, log)
    cost = step_predictor(cfg, fit_path)
    acc_path, over, cal_steps = calibrate(cfg, cal_files, cost, out, prompt_len, log)
    fit_path, cost, over, first_over = settle_overheads(cfg, out, fit_path, over, cal_steps, log)
    runs = []
    for i in range(cfg.engine_runs):
        # each replay on an engine of its own: an adaptive budget learns from every step, so a replay on the
        # engine of the one before would start from what that one taught it (the simulator's starts cold)
        eng = make_engine(cfg)  # goodput budgets see the step time the simulator will use, overheads included
        bind_budget(eng, step_predictor(cfg, fit_path, over.step_overhead_ms), over, mean_ctx)
        runs.append(replay_engine(cfg, items, eng, out / ("engine" if i == 0 else f"engine_rerun{i}"), log))
        del eng
    engine, reruns = runs[0], [r["summary"] for r in runs[1:]]
    sims = simulate_same(cfg, engine["records"], fit_path, acc_path, over, mean_ctx, out / "sim")
    # again at the speed the replays ran at against their calibrated price (the machine's, not the policy's)
    speed = replay_drift([it for r in runs for it in r["iterations"]],
                         np.concatenate([priced_steps_ms(cost, over, r["iterations"]) for r in runs]))
    at_speed = simulate_same(cfg, engine["records"], fit_path, acc_path, over, mean_ctx,
                             out / "sim_at_replay_speed", speed=speed) if speed else None
    return report(out, engine, reruns, sims, cost, over, first_over, t_start, {"replay_speed": speed},
                  at_speed=at_speed)


def settle_overheads(cfg: CrossValConfig, out: Path, fit_path: Path, over: Overheads, cal_steps: list, log):
    """When the profile ran at another speed than the engine now runs (Overheads.suspect), profile once more and
    refit the overheads on the same calibration steps; then store them (overheads.json, and the per-depth cost in
    the step-time fit). Returns (fit path, cost model as the simulator sees it, overheads, the first fit or None)."""
    first_over = None
    if over.suspect:
        first_over = over
        log(f"the profiled forwards explain {over.forward_share:.0%} of the calibration steps' time (median error "
            f"{over.median_ape_pct}%): the machine's speed moved since profiling; profiling again")
        fit_path = profile_and_fit(cfg, out, log)
        over = fit_overheads(step_predictor(cfg, fit_path), cal_steps)
        log(f"engine overheads, refitted: forwards explain {over.forward_share:.0%}, per-step median error "
            f"{over.median_ape_pct}%" + (" (still suspect: step prices unreliable; run again on a quieter machine)"
                                         if over.suspect else ""))
    (out / "overheads.json").write_text(json.dumps(asdict(over), indent=2) + "\n")
    set_draft_depth_overhead(fit_path, over.overhead_per_draft_depth_ms)
    # now with the engine's cost per draft depth, as the simulator sees it
    return fit_path, step_predictor(cfg, fit_path), over, first_over


def seed_summaries(sims: list[dict]) -> list[dict]:
    """Each simulated seed's headline numbers (validation.json)."""
    return [{"seed": i, "throughput_tok_s": s.get("throughput_tok_s"), "mat": s.get("mat")}
            for i, s in enumerate(sims)]


def report(out: Path, engine: dict, reruns: list[dict], sims: list[dict], cost, over: Overheads,
           first_over: Overheads | None, t_start: float, extra: dict | None = None,
           at_speed: list[dict] | None = None) -> dict:
    """Compare the engine's replay (its summary, requests and steps) with the simulator's (`sims`: one summary
    per seed, the first with its run folder in out/sim; again at the replays' machine speed in `at_speed`) and
    write validation.json and validation.md. The steps and the budget's state are the first seed's."""
    sim = sims[0]
    rows = compare(engine["summary"], sims, reruns)
    priced = priced_steps_ms(cost, over, engine["iterations"])
    drift = replay_drift(engine["iterations"], priced)
    steps = step_breakdown(out / "engine" / "iterations.csv", out / "sim" / "iterations.csv", priced)
    budgets = budget_states([engine["summary"], *reruns], sim)
    result = {"metrics": rows, "steps": steps, "budget_states": budgets, "engine": engine["summary"],
              "sim": {k: v for k, v in sim.items() if k != "sim"}, "sim_seeds": seed_summaries(sims),
              "engine_reruns": reruns,
              "overheads": asdict(over), "overheads_suspect": over.suspect,
              "overheads_before_reprofile": asdict(first_over) if first_over else None,
              "replay_steps_over_priced": drift, **(extra or {}),
              "wall_s": round(time.perf_counter() - t_start, 1)}
    (out / "validation.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_comparison(rows)
    if over.suspect:
        table = (f"**Step prices unreliable**: the profiled forwards explain {over.forward_share:.0%} of the "
                 f"calibration steps' time, per-step median error {over.median_ape_pct}% (after profiling twice); "
                 "run again on a quieter machine.\n\n" + table)
    if drift is not None and abs(drift - 1.0) > DRIFT_WARN:
        table = (f"**The replay's steps took {drift:.2f}x what the calibration priced them at** (median over its "
                 "steps): the machine's speed moved between calibration and replay, and the simulated latencies "
                 "are off by about as much; run again.\n\n" + table)
    if at_speed:
        result["sim_at_replay_speed"] = {k: v for k, v in at_speed[0].items() if k != "sim"}
        result["sim_at_replay_speed_seeds"] = seed_summaries(at_speed)
        result["metrics_at_replay_speed"] = compare(engine["summary"], at_speed, reruns)
        (out / "validation.json").write_text(json.dumps(result, indent=2) + "\n")
        keep = {"throughput_tok_s", "mat", "ttft_ms.mean", "tpot_ms.mean", "e2e_ms.mean"}
        table += (f"\n\nThe simulator at the replays' own machine speed ({extra['replay_speed']:.2f}x the "
                  "calibrated step prices, the median over the engine runs' steps; the machine's speed, not the "
                  "policy's decisions, which stay simulated):\n\n"
                  + format_comparison([r for r in result["metrics_at_replay_speed"] if r["metric"] in keep]))
    budget_md = ("\n\nThe adaptive budgets at the end of each run (what each side learnt):\n\n"
                 + format_budget_states(budgets)) if budgets else ""
    (out / "validation.md").write_text(table + "\n\nSteps, engine against simulator (where a step-time error "
                                       "comes from):\n\n" + format_breakdown(steps) + budget_md + "\n")
    return result


# ----------------------------------------------------------------------------------------------------------
# The simulator against a replay that already ran (ours, or a converted bench_serving / vLLM result): no engine
# here, so it works for a GPU cluster's run. The cost model and acceptance model are the user's (named or fitted).


@dataclass
class ReplayedRequest:
    """What the simulator needs of a replayed request: its trace arrival and the lengths the server served."""

    index: int
    scheduled_s: float
    prompt_tokens: int
    output_tokens: int


def read_replay(folder: Path) -> tuple[list[ReplayedRequest], dict]:
    """The successful requests of a replay folder (requests.csv) and its summary (summary.json)."""
    req_path, sum_path = folder / "requests.csv", folder / "summary.json"
    for p in (req_path, sum_path):
        if not p.is_file():
            raise ValidationError("not a replay folder (echosim replay writes requests.csv and summary.json)",
                                  path=str(p))
    try:
        summary = json.loads(sum_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValidationError(f"not valid JSON ({exc.msg})", path=str(sum_path), line=exc.lineno) from None
    rows = []
    with open(req_path, newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            if row.get("ok", "True") != "True":
                continue
            try:
                scheduled = row.get("scheduled_s") or row["arrival_s"]
                rows.append(ReplayedRequest(int(row["request"]), float(scheduled), int(row["prompt_tokens"]),
                                            int(row["output_tokens"])))
            except (KeyError, ValueError) as exc:
                raise ValidationError(f"bad request row: {exc}", path=str(req_path), line=n) from None
    if not rows:
        raise ValidationError("the replay has no successful requests", path=str(req_path))
    return rows, summary


def convert_bench_result(path: Path, out: Path) -> Path:
    """A bench_serving (SGLang, --output-details) or `vllm bench serve` (--save-result --save-detailed) result file
    as a replay folder: per-request prompt and output lengths, TTFT and inter-token gaps. Their clients do not save
    send times, so the file must come from a run that sent every request at once (--request-rate inf)."""
    from echo_exec.replay import RequestRecord, summarize, write_outputs

    try:
        lines = [x for x in path.read_text().splitlines() if x.strip()]
        data = json.loads(lines[-1]) if path.suffix == ".jsonl" else json.loads("\n".join(lines))
    except (OSError, IndexError, json.JSONDecodeError) as exc:
        raise ValidationError(f"cannot read the result file: {exc}", path=str(path)) from None
    need = ("input_lens", "output_lens", "ttfts", "itls")
    missing = [k for k in need if not isinstance(data.get(k), list)]
    if missing:
        raise ValidationError(f"no per-request {', '.join(missing)} (run the benchmark with --output-details / "
                              "--save-detailed)", path=str(path), field=missing[0])
    rate = data.get("request_rate")
    if rate not in (None, "inf", float("inf")) and not (isinstance(rate, float) and math.isinf(rate)):
        raise ValidationError(f"request_rate {rate}: the file has no send times; validate a run made with "
                              "--request-rate inf, or replay the workload with echosim replay", path=str(path),
                              field="request_rate")
    cap = data.get("max_concurrency")
    if isinstance(cap, int) and 0 < cap < len(data["input_lens"]):
        raise ValidationError(f"max_concurrency {cap}: the client held requests back, and the file does not say "
                              "when it sent them; validate a run without --max-concurrency, or replay the workload "
                              "with echosim replay", path=str(path), field="max_concurrency")
    records = []
    for i, (p, o, ttft, itl) in enumerate(zip(data["input_lens"], data["output_lens"], data["ttfts"], data["itls"],
                                              strict=True)):
        if not ttft or o < 1:
            continue  # a failed request
        chunks = [ttft + sum(itl[:k]) for k in range(len(itl) + 1)]
        records.append(RequestRecord(i, str(i), 0.0, ttft, chunks[-1], int(p), int(o), 0, 0, "", 0.0, int(p), int(o),
                                     "", True, "", chunk_s=chunks))
    summary = summarize(records)
    if data.get("accept_length"):
        summary["mat"] = float(data["accept_length"])
    write_outputs(out, records, summary, {"command": "converted", "source": str(path)})
    return out


def validate_replay(replay: Path, cfg: CrossValConfig, cost_fit: Path, acceptance: str, over: Overheads,
                    out: Path, hardware: str | None = None) -> dict:
    """The replay's requests through the simulator (their trace arrivals, the lengths the server served), with the
    given step-time fit (hardware.json beside it), acceptance model and engine overheads, compared with what the
    replay measured: the error table of `run`."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if replay.is_file():  # a benchmark client's result file
        replay = convert_bench_result(replay, out / "replay")
    records, measured = read_replay(replay)
    if hardware is None and not (cost_fit.parent / "hardware.json").is_file():
        raise ValidationError("name the GPU (--hardware h100, or a spec .json), or keep hardware.json beside the "
                              "step-time fit", path=str(cost_fit))
    sims = simulate_same(cfg, records, cost_fit, acceptance, over, 0.0, out / "sim", hardware)  # type: ignore
    rows = compare(measured, sims)
    result = {"metrics": rows, "replay": str(replay), "measured": measured,
              "sim": {k: v for k, v in sims[0].items() if k != "sim"}, "sim_seeds": seed_summaries(sims),
              "overheads": asdict(over),
              "cost_model": str(cost_fit), "hardware": hardware, "acceptance": acceptance,
              "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "config.json").write_text(json.dumps({"command": "echosim validate --replay", "replay": str(replay),
                                                 **asdict(cfg), "cost_model": str(cost_fit),
                                                 "acceptance": acceptance, "overheads": asdict(over)}, indent=2)
                                     + "\n")
    (out / "validation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "validation.md").write_text(format_comparison(rows) + "\n")
    return result
