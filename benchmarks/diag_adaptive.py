"""Why the adaptive budget loses where it loses: the engine called directly under a closed loop of C requests
(each finished request is replaced at once by the next, as `bench_serve.py`'s clients do), policies interleaved
turn by turn on the same prompts, every step logged with CPU times (this thread's, so a loaded machine inflates
them far less than wall time) and, for an adaptive policy, its decisions: verified drafts, expected vs realized
accepted tokens, predicted vs measured step time.

Prints per policy: tokens per CPU second and per wall second, their ratio to the first policy, and a breakdown of
the CPU time per decode step (draft / target / rest); for adaptive policies, the budget's calibration: predicted
over measured verify and step time by verified-token bucket, expected over realized accepted drafts, the share of
steps that drafted, that probed, and that drafted for a new request.

    python benchmarks/diag_adaptive.py --set spec_bench --concurrency 16 --requests 48 [--repeats 2] [--log F.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import held_out_prompts  # noqa: E402
from benchmarks.bench_serve import spec_bench_prompts  # noqa: E402
from echo_exec.engine import Engine, SamplingParams  # noqa: E402
from echo_exec.replay import SPEC_BENCH_PROMPTS  # noqa: E402
from echo_exec.tokenizer import ByteTokenizer  # noqa: E402
from echo_exec.train_tiny import MODELS_DIR  # noqa: E402
from echosim.commands.serve import policy_settings  # noqa: E402


def time_policy(policy) -> list:
    """Wrap the policy's scheduler-contract methods with CPU timers; returns the accumulator [ms]."""
    acc = [0.0]
    for name in ("set_batch", "plan", "start", "gate", "select", "observe", "observe_step"):
        fn = getattr(policy, name)

        def timed(*a, _fn=fn, **k):
            c0 = time.thread_time()
            try:
                return _fn(*a, **k)
            finally:
                acc[0] += (time.thread_time() - c0) * 1e3

        setattr(policy, name, timed)
    return acc


def closed_loop(engine: Engine, prompts: list[list[int]], concurrency: int, gen_len: int, log: list) -> dict:
    """All prompts through the engine with `concurrency` in flight; per-step records appended to `log`."""
    params = SamplingParams(max_new_tokens=gen_len)
    pol = engine.policy
    spent = getattr(engine, "_policy_cpu_ms", None) or time_policy(pol)
    engine._policy_cpu_ms = spent
    todo = list(prompts)
    inflight = 0
    outs = []
    tokens = 0
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    while todo or inflight:
        while todo and inflight < concurrency:
            engine.add_request(todo.pop(0), params)
            inflight += 1
        if hasattr(pol, "last"):
            pol.last = {}
        probing = bool(getattr(pol, "probing", False))
        has_new = bool(getattr(pol, "_has_new", False))
        c0, w0, p0 = time.thread_time(), time.perf_counter(), spent[0]
        done = engine.step()
        c1, w1 = time.thread_time(), time.perf_counter()
        it = engine.iterations.pop() if engine.iterations else None
        engine.iterations.clear()
        for o in done:
            inflight -= 1
            tokens += len(o.output_ids)
            outs.append(o.output_ids)
        if it is None or it.verify_tokens is None:
            continue
        rec = dict(cpu_ms=(c1 - c0) * 1e3, policy_cpu_ms=spent[0] - p0, wall_ms=(w1 - w0) * 1e3,
                   prefill=bool(it.prefill_chunks),
                   batch=int(len(it.verify_tokens)), verify_tokens=int(it.verify_tokens.sum()),
                   draft_ms=it.draft_ms, target_ms=it.target_ms, accepted=it.accepted,
                   draft_depth=int(np.count_nonzero(it.draft_rows)), draft_rows=int(sum(it.draft_rows)))
        if hasattr(pol, "last"):
            last = pol.last
            B = rec["batch"]
            rec.update(probing=probing, has_new=has_new, planned_drafts=bool(pol.drafts),
                       expected=last.get("expected_accepted"), predicted_ms=last.get("predicted_ms"),
                       predicted_verify_ms=float(pol._verify_ms(np.array([rec["verify_tokens"]]), B)[0]),
                       fixed_ms=pol.fixed_ms)
        log.append(rec)
    return dict(cpu_s=time.thread_time() - cpu0, wall_s=time.perf_counter() - wall0, tokens=tokens, outs=outs)


def summarize(name: str, steps: list[dict]) -> dict:
    dec = [s for s in steps if not s["prefill"]]
    a = {k: np.array([s.get(k) if s.get(k) is not None else np.nan for s in dec], np.float64)
         for k in ("cpu_ms", "policy_cpu_ms", "wall_ms", "draft_ms", "target_ms", "verify_tokens", "batch",
                   "accepted", "expected", "predicted_ms", "predicted_verify_ms", "draft_depth")}
    out = dict(decode_steps=len(dec), mean_batch=float(np.mean(a["batch"])) if dec else 0.0,
               verify_tokens_per_step=float(np.mean(a["verify_tokens"])) if dec else 0.0,
               cpu_ms_per_step=float(np.mean(a["cpu_ms"])) if dec else 0.0,
               policy_cpu_ms_per_step=float(np.mean(a["policy_cpu_ms"])) if dec else 0.0,
               draft_ms_per_step=float(np.mean(a["draft_ms"])) if dec else 0.0,
               target_ms_per_step=float(np.mean(a["target_ms"])) if dec else 0.0,
               rest_ms_per_step=float(np.mean(a["wall_ms"] - a["draft_ms"] - a["target_ms"])) if dec else 0.0,
               drafted_share=float(np.mean(a["draft_depth"] > 0)) if dec else 0.0)
    if dec and "expected" in dec[0]:
        drafted = a["draft_depth"] > 0
        out.update(
            probe_share=float(np.mean([s["probing"] for s in dec])),
            new_request_share=float(np.mean([s["has_new"] for s in dec])),
            drafted_but_planned_off=float(np.mean([s["draft_depth"] > 0 and not s["planned_drafts"] for s in dec])),
            expected_over_realized=float(np.nansum(a["expected"]) / max(np.sum(a["accepted"]), 1)),
            verified_zero_share_of_drafted=float(np.mean((a["verify_tokens"] == a["batch"])[drafted]))
            if drafted.any() else None)
        # the verify fit by verified drafts per request
        per = (a["verify_tokens"] - a["batch"]) / np.maximum(a["batch"], 1)
        rows = []
        for lo, hi in ((0, 0.01), (0.01, 1), (1, 3), (3, 8), (8, 100)):
            m = (per >= lo) & (per < hi)
            if m.sum() >= 3:
                rows.append(dict(drafts_per_request=f"[{lo}, {hi})", steps=int(m.sum()),
                                 verify_pred_over_meas=float(np.sum(a["predicted_verify_ms"][m]) /
                                                             np.sum(a["target_ms"][m])),
                                 step_pred_over_meas=float(np.nansum(a["predicted_ms"][m]) /
                                                           np.sum(a["wall_ms"][m][~np.isnan(a["predicted_ms"][m])]))
                                 if np.any(~np.isnan(a["predicted_ms"][m])) else None,
                                 mean_target_ms=float(np.mean(a["target_ms"][m])),
                                 mean_draft_ms=float(np.mean(a["draft_ms"][m]))))
        out["fit_by_size"] = rows
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=MODELS_DIR / "tiny-target")
    ap.add_argument("--draft", type=Path, default=MODELS_DIR / "tiny-draft")
    ap.add_argument("--policies", default="ar,eagle3,echo")
    ap.add_argument("--configs", type=json.loads, default={}, help='{"name": {settings}} to override')
    ap.add_argument("--set", choices=["spec_bench", "stdlib"], default="spec_bench")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-running", type=int, default=64, help="as `bench_serve.py`'s servers")
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", type=Path, default=None, help="per-step records (JSON lines)")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="the engine times its phases (and its start-up profile) in this thread's CPU time")
    args = ap.parse_args()
    if args.cpu_clock:
        import types

        import echo_exec.engine as eng

        eng.time = types.SimpleNamespace(perf_counter=time.thread_time, thread_time=time.thread_time,
                                         monotonic=time.monotonic)
    torch.set_num_threads(1)
    if args.set == "spec_bench":
        tok = ByteTokenizer()
        prompts = [tok.encode(p["text"]) for p in spec_bench_prompts(SPEC_BENCH_PROMPTS, args.requests, 1024,
                                                                       args.seed)]
    else:
        prompts = held_out_prompts(args.requests, 192, args.gen_len, args.seed)
    load0 = os.getloadavg()
    engines = {}
    for label in args.policies.split(","):  # "name" or "label=name" (a policy under --configs[label])
        label, _, name = label.partition("=") if "=" in label else (label, "", label)
        _, cfg, _ = policy_settings(None, name, str(args.draft))
        cfg = args.configs.get(label, cfg)
        engines[label] = Engine(args.target, None if name == "ar" else args.draft, policy=name, policy_config=cfg,
                                max_running=args.max_running, log_iterations=True)
        engines[label].generate(prompts[:2], SamplingParams(max_new_tokens=8))
    names = list(engines)
    tot = {n: dict(cpu_s=0.0, wall_s=0.0, tokens=0) for n in names}
    logs: dict = {n: [] for n in names}
    outs: dict = {n: [] for n in names}
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for n in order:
            r = closed_loop(engines[n], prompts, args.concurrency, args.gen_len, logs[n])
            for k in ("cpu_s", "wall_s", "tokens"):
                tot[n][k] += r[k]
            outs[n].append(sorted(r["outs"]))
        print(f"rep {rep}: " + "  ".join(f"{n} {tot[n]['tokens'] / tot[n]['cpu_s']:.1f} tok/cpu-s" for n in names),
              flush=True)
    load1 = os.getloadavg()
    base = names[0]
    report = dict(set=args.set, concurrency=args.concurrency, requests=args.requests, repeats=args.repeats,
                  load_start=load0, load_end=load1, policies={})
    for n in names:
        t = tot[n]
        s = summarize(n, logs[n])
        s.update(tok_per_cpu_s=t["tokens"] / t["cpu_s"], tok_per_wall_s=t["tokens"] / t["wall_s"],
                 cpu_ratio=(t["tokens"] / t["cpu_s"]) / (tot[base]["tokens"] / tot[base]["cpu_s"]),
                 wall_ratio=(t["tokens"] / t["wall_s"]) / (tot[base]["tokens"] / tot[base]["wall_s"]),
                 mat=engines[n].stats()["avg_accept_length"], same_outputs=outs[n] == outs[base])
        if hasattr(engines[n].policy, "state"):
            st = engines[n].policy.state()
            if st:
                s["state"] = {k: st[k] for k in ("verify_ms_model", "draft_ms_model", "fixed_ms",
                                                 "per_drafting_request_step") if k in st}
        report["policies"][n] = s
    # the budget's price of a plain step, which it almost never takes while drafting pays, against the plain
    # steps ar measured at the same batch sizes in this run (meaningful with --cpu-clock: both in CPU time)
    if "ar" in names:
        ar = [s for s in logs["ar"] if not s["prefill"]]
        for n in names:
            pol = engines[n].policy
            if not hasattr(pol, "_verify_ms"):
                continue
            rows = {}
            for b in sorted({s["batch"] for s in ar}):
                meas = [s["target_ms"] for s in ar if s["batch"] == b]
                if len(meas) >= 5:
                    pred = float(pol._verify_ms(np.array([float(b)]), b)[0])
                    rows[b] = dict(predicted_verify_ms=round(pred, 2), ar_measured_ms=round(float(np.median(meas)), 2),
                                   steps=len(meas))
            report["policies"][n]["plain_step_price_vs_ar"] = rows
    print(json.dumps(report, indent=1, default=float))
    if args.log:
        with args.log.open("w") as f:
            for n in names:
                for rec in logs[n]:
                    f.write(json.dumps(dict(policy=n, **rec), default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
