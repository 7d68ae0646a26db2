"""`echosim validate --backend sglang`: the simulator against SGLang's own server with echo's plugin (SGLang+ECHO,
or any echosim.spec policy through `--speculative-algorithm ECHO`; plain SGLang for policy ar), on the same trace.

The same phases as the validation against our engine (crossval.run), with SGLang in the engine's place:
1. prompts: as crossval (calibration and replay prompts from disjoint held-out files);
2. profile: the target's and the draft's forwards on this CPU, fitted (the shape of a forward's cost);
3. calibrate: SGLang decodes the calibration prompts in bursts of each calibration batch size; its steps are read
   back from its own log (one line per iteration, millisecond timestamps) and the plugin's per-step records
   (echosim/validate/sglang_steps.py), and SGLang's cost beyond the profiled forwards is fitted to them as the
   engine's overheads are (step_overheads.fit_overheads). The acceptance model is fitted to per-node records of
   our engine on the same calibration prompts (same pair, same draft shape: SGLang's plugin records no per-node
   outcomes), and SGLang's own calibration MAT is reported beside it;
4. replay: the replay client against SGLang (twice: the rerun is the noise floor);
5. sim and 6. compare: as crossval, into the same run folder layout.

SGLang itself runs in its own interpreter (ECHO_SGLANG_PYTHON, echo_exec/sglang_cpu/make_venv.sh): nothing here
imports sglang. With `url`, a running server is used instead; it must have been started with SGLANG_LOG_MS=1,
`--decode-log-interval 1` and (speculative) ECHO_SGLANG_RECORDS, whose files are named by `server_log` and
`server_records`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from echosim.validate.crossval import (
    CrossValConfig,
    acceptance_from_engine,
    calibration_prompts,
    fit_overheads,
    log_overheads,
    profile_and_fit,
    replay_plan,
    report,
    settle_overheads,
    simulate_same,
    step_predictor,
    write_iterations,
)
from echosim.validate.errors import ValidationError
from echosim.validate.sglang_steps import log_lines, read_log, read_step_records, sglang_steps

ADAPTIVE_NOT_WIRED = "online-adaptive budget is not wired"  # the plugin's warning when it runs the inner policy
LOG_SETTLE_S = 0.5  # SGLang logs an iteration after streaming it: let the last lines land before reading
# a request that gets no byte for this long fails (one line) rather than waiting on a stalled server, whose own
# watchdog (300 s) stops it
REQUEST_TIMEOUT_S = 330.0


@dataclass
class SglangOptions:
    python: str | None = None          # an interpreter with sglang and the plugin (default ECHO_SGLANG_PYTHON)
    url: str | None = None             # a running server instead of one started here
    server_log: str | None = None      # with url: its log (SGLANG_LOG_MS=1, --decode-log-interval 1)
    server_records: str | None = None  # with url: its ECHO_SGLANG_RECORDS file (speculative policies)
    ragged: bool = False               # ECHO's ragged verify (echo's CPU kernels verify only the selected nodes)
    start_timeout_s: float = 600.0


@dataclass
class Server:
    """A live SGLang server and where its steps are read back from."""

    url: str
    log: Path
    records: Path | None
    tree_tokens: int        # SGLang's dense verify width N (1 for plain decoding)
    topk: int
    ragged: bool
    info: dict
    proc: subprocess.Popen | None = None  # started here: not yet known to be ready


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout_s: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


def speculative(cfg: CrossValConfig, out: Path, ragged: bool):
    """SGLang's speculative flags for the policy (echo_exec.sglang_cpu.speculative_for), its config written to
    the run folder; None for plain decoding."""
    from echo_exec import sglang_cpu
    from echo_exec.errors import ExecError

    if cfg.policy == "ar":
        return None
    path = out / "sglang_policy.json"
    path.write_text(json.dumps({"policy": cfg.policy, **(cfg.policy_config or {})}, indent=2) + "\n")
    try:
        return sglang_cpu.speculative_for("ECHO", cfg.draft, policy=cfg.policy, policy_config=path, ragged=ragged)
    except (ExecError, ValueError) as exc:
        raise ValidationError(f"the policy cannot run in SGLang's ECHO worker: {exc}", field="policy") from None


@contextmanager
def sglang_server(cfg: CrossValConfig, opts: SglangOptions, out: Path, log):
    """Yields a Server: the one at opts.url, else one started here on 127.0.0.1 (stopped on exit), with the
    engine's limits (max running requests, KV tokens, prefill chunk budget, threads)."""
    from echo_exec import sglang_cpu

    spec = speculative(cfg, out, opts.ragged)
    tree, topk = (spec.num_draft_tokens, spec.topk) if spec is not None else (1, 1)
    if opts.url is not None:
        url = opts.url.rstrip("/")
        try:
            urllib.request.urlopen(url + "/health", timeout=10).close()
            info = _get_json(url + "/get_server_info")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ValidationError(f"cannot reach the SGLang server at {url}: {getattr(exc, 'reason', exc)}",
                                  field="url") from None
        if opts.server_log is None or not Path(opts.server_log).is_file():
            raise ValidationError("--url needs --server-log: the server's log (started with SGLANG_LOG_MS=1 and "
                                  "--decode-log-interval 1), from which its steps are timed",
                                  path=opts.server_log, field="server_log")
        if spec is not None and opts.server_records is None:
            raise ValidationError("--url with a speculative policy needs --server-records: the server's "
                                  "ECHO_SGLANG_RECORDS file", field="server_records")
        tree = int(info.get("speculative_num_draft_tokens") or tree)
        topk = int(info.get("speculative_eagle_topk") or topk)
        yield Server(url, Path(opts.server_log), Path(opts.server_records) if spec is not None else None, tree,
                     topk, opts.ragged, info)
        return
    python = opts.python or os.environ.get("ECHO_SGLANG_PYTHON")
    if not python:
        raise ValidationError("no interpreter with SGLang: set ECHO_SGLANG_PYTHON or --sglang-python "
                              "(echo_exec/sglang_cpu/make_venv.sh makes one)", field="sglang_python")
    try:
        has, kernel = sglang_cpu.has_sglang(python)
    except OSError as exc:
        raise ValidationError(f"cannot run the SGLang interpreter: {exc.strerror}", path=python) from None
    if not has:
        raise ValidationError("sglang does not import in this interpreter (echo_exec/sglang_cpu/make_venv.sh makes "
                              "one)", path=python)
    port = _free_port()
    log_path, records = out / "sglang_server.log", out / "sglang_steps.jsonl"
    records.unlink(missing_ok=True)
    extra = ["--decode-log-interval", "1", "--chunked-prefill-size", str(cfg.max_prefill_tokens),
             "--max-prefill-tokens", str(cfg.max_prefill_tokens)]
    if spec is not None:
        extra.append("--disable-overlap-schedule")
    argv, env = sglang_cpu.server_command(
        cfg.model, port=port, python=python, standin=not kernel, max_total_tokens=cfg.kv_blocks() * cfg.block_size,
        max_running_requests=cfg.max_running, attention_backend="intel_amx" if spec else "torch_native",
        speculative=spec, threads=cfg.threads, extra=tuple(extra))
    env.update(SGLANG_LOG_MS="1", ECHO_SGLANG_RECORDS=str(records))
    (out / "sglang_command.txt").write_text(" ".join(argv) + "\n")
    url = f"http://127.0.0.1:{port}"
    log(f"starting SGLang ({spec.algorithm + ' ' + cfg.policy if spec else 'plain decoding'}) on {url}")
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Server(url, log_path, records if spec is not None else None, tree, topk, opts.ragged,
                     {"command": " ".join(argv)}, proc)
    finally:
        sglang_cpu.stop(proc)


def wait_ready(server: Server, timeout_s: float) -> None:
    """Until the server started here answers; then its own account of its settings (/get_server_info)."""
    from echo_exec import sglang_cpu

    if server.proc is None:
        return
    try:
        sglang_cpu.wait_ready(server.url, server.proc, timeout_s=timeout_s)
    except RuntimeError as exc:
        raise ValidationError(f"{exc}; its log's last line: {_last_line(server.log)!r}", path=str(server.log)) \
            from None
    server.info.update(_get_json(server.url + "/get_server_info"))


def _mark(server: Server) -> tuple[int, int]:
    time.sleep(LOG_SETTLE_S)  # the lines of what ran before (a warm-up) land first
    return log_lines(server.log), log_lines(server.records) if server.records else 0


def _steps_since(server: Server, mark: tuple[int, int], mean_ctx: float) -> list:
    time.sleep(LOG_SETTLE_S)
    events = read_log(server.log, mark[0])
    recs = read_step_records(server.records, mark[1]) if server.records else None
    return sglang_steps(events, recs, tree_tokens=server.tree_tokens, topk=server.topk, ragged=server.ragged,
                        mean_context=mean_ctx)


def _warm_up(url: str, n_tokens: int = 8) -> None:
    from echo_exec.replay import ReplayItem, replay

    rec = asyncio.run(replay(url, [ReplayItem(0, "warm-up", 0.0, "", 32, n_tokens, prompt_ids=[65] * 32)],
                             request_timeout_s=REQUEST_TIMEOUT_S))[0]
    if not rec.ok:
        raise ValidationError(f"the SGLang server failed a warm-up request: {rec.error}")


def calibrate_sglang(cfg: CrossValConfig, server: Server, prompts: list[list[int]], mean_ctx: float, log):
    """The calibration prompts in bursts of each calibration batch size through SGLang: its steps (from its log
    and the plugin's records) and its MAT."""
    from echo_exec.replay import ReplayItem, replay, summarize

    _warm_up(server.url)
    mark = _mark(server)
    t0 = time.perf_counter()
    done = []
    for b in cfg.batches():
        for i in range(0, len(prompts), b):
            burst = [ReplayItem(j, f"cal-{b}-{j}", 0.0, "", len(prompts[j]), cfg.max_output_tokens,
                                prompt_ids=prompts[j]) for j in range(i, min(i + b, len(prompts)))]
            recs = asyncio.run(replay(server.url, burst, request_timeout_s=REQUEST_TIMEOUT_S))
            failed = [r.error for r in recs if not r.ok]
            if failed:
                raise ValidationError(f"a calibration request to SGLang failed: {failed[0]}")
            done += recs
    steps = _steps_since(server, mark, mean_ctx)
    mat = summarize(done).get("mat")
    log(f"calibration (SGLang): {len(prompts)} prompts at batch {cfg.batches()}, {len(steps)} timed steps in "
        f"{time.perf_counter() - t0:.1f} s" + (f", MAT {mat:.2f}" if mat else ""))
    if len(steps) < 8:
        raise ValidationError(f"only {len(steps)} timed steps in SGLang's log (is it started with "
                              "--decode-log-interval 1 and SGLANG_LOG_MS=1?)", path=str(server.log))
    return steps, mat


def replay_sglang(cfg: CrossValConfig, items, server: Server, out: Path, mean_ctx: float, log) -> dict:
    """The replay client against SGLang; its steps read back from its log into iterations.csv."""
    from echo_exec.replay import replay, summarize, write_outputs

    _warm_up(server.url)
    mark = _mark(server)
    log(f"SGLang: replaying {len(items)} requests over {items[-1].scheduled_s:.1f} s to {server.url}")
    records = asyncio.run(replay(server.url, items, request_timeout_s=REQUEST_TIMEOUT_S))
    steps = _steps_since(server, mark, mean_ctx)
    summary = summarize(records)
    dec = [s for s in steps if s.verify_tokens is not None]
    summary.update(iterations=len(steps), mean_batch=round(float(np.mean([len(s.verify_tokens) for s in dec])), 3)
                   if dec else 0.0, step_ms_mean=round(float(np.mean([s.step_ms for s in steps])), 4) if steps else 0.0,
                   verified_tokens=int(sum(int(s.verify_tokens.sum()) for s in dec)),
                   prefill_tokens=int(sum(c for s in steps for c, _ in s.prefill_chunks)))
    write_outputs(out, records, summary, {"command": "echosim validate --backend sglang: SGLang side", **asdict(cfg)})
    write_iterations(out / "iterations.csv", steps, t_origin=min((s.start_s for s in steps), default=0.0))
    if summary["failed"]:
        raise ValidationError(f"{summary['failed']} replayed requests failed, e.g. {summary['errors'][0]}")
    return {"summary": summary, "records": records, "iterations": steps}


def sim_policy_config(cfg: CrossValConfig, server: Server) -> dict | None:
    """The policy the plugin runs: an online-adaptive config runs its inner policy where the plugin says so."""
    config = dict(cfg.policy_config or {})
    if "adaptive" in config and ADAPTIVE_NOT_WIRED in server.log.read_text(errors="replace"):
        config.pop("adaptive")
    return config or None


def run(cfg: CrossValConfig, out: Path, opts: SglangOptions, log=print) -> dict:
    t_start = time.perf_counter()
    cal_files, items, prompt_len, mean_ctx = replay_plan(
        cfg, out, {"command": "echosim validate --backend sglang", "url": opts.url, "ragged": opts.ragged})
    with sglang_server(cfg, opts, out, log) as server:
        # the server loads (about 90 s here) while the forwards are profiled; a profile slowed by it is caught
        # by settle_overheads, which profiles again
        fit_path = profile_and_fit(cfg, out, log)
        wait_ready(server, opts.start_timeout_s)
        cost = step_predictor(cfg, fit_path)
        prompts = calibration_prompts(cal_files, cfg.n_calibration_prompts(), prompt_len, cfg.seed + 1)
        acc_path = acceptance_from_engine(cfg, prompts, cost, out, prompt_len, log)
        cal_steps, cal_mat = calibrate_sglang(cfg, server, prompts, mean_ctx, log)
        write_iterations(out / "calibration_iterations.csv", cal_steps, t_origin=cal_steps[0].start_s)
        over = fit_overheads(cost, cal_steps)
        log_overheads(over, log)
        fit_path, cost, over, first_over = settle_overheads(cfg, out, fit_path, over, cal_steps, log)
        engine = replay_sglang(cfg, items, server, out / "engine", mean_ctx, log)
        reruns = [replay_sglang(cfg, items, server, out / f"engine_rerun{i}", mean_ctx, log)["summary"]
                  for i in range(1, cfg.engine_runs)]
        sim_cfg = replace(cfg, policy_config=sim_policy_config(cfg, server))
    budget = (sim_cfg.policy_config or {}).get("budget") or {}
    sims = simulate_same(sim_cfg, engine["records"], fit_path, acc_path, over, mean_ctx, out / "sim")
    info = {k: v for k, v in server.info.items() if isinstance(v, (str, int, float, bool, list)) or v is None}
    extra = {"backend": "sglang", "sglang": {
        "url": server.url, "tree_tokens": server.tree_tokens, "topk": server.topk, "ragged": server.ragged,
        "calibration_mat": cal_mat, "sim_policy_config": sim_cfg.policy_config,
        # SGLang's worker leaves a goodput budget unbound (its default step-time shape); the simulator binds it
        "goodput_budget_unbound": isinstance(budget, dict) and budget.get("kind") == "goodput",
        "server_info": {k: info[k] for k in sorted(info) if k in SERVER_INFO_KEYS}}}
    return report(out, engine, reruns, sims, cost, over, first_over, t_start, extra)


SERVER_INFO_KEYS = ("version", "max_running_requests", "max_total_num_tokens", "max_total_tokens",
                    "chunked_prefill_size", "max_prefill_tokens", "speculative_algorithm",
                    "speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens",
                    "attention_backend", "page_size", "dtype", "command")
