"""The adaptive budget's own per-step cost, on inputs recorded from the engine, old code against new.

`record`: the engine (the shipped pair, serve's echo settings: the adaptive budget around ECHO) runs a closed
loop of C requests per concurrency (each finished request replaced at once by the next) and every call the
engine makes to the policy (set_batch, plan, start, gate, select, observe, observe_step) is stored with copies
of its arguments and its result, plus the step-time prior the engine profiled at start-up.

`replay`: those calls, in order, through a fresh policy built from the same settings and prior, in this process
(the code on PYTHONPATH), timed in this thread's CPU time; every result is checked against the recorded one (the
same decisions: start and gate masks, plans, selections), and so is the budget's final `state()`.

`engine` / `compare-engine`: the policy's calls timed inside the engine itself (its forwards beside them, as
served), the baseline's scheduler core against this tree's, interleaved.

`compare`: replays, side by side and interleaved, the worktree's code and the scheduler core of a git revision
(`--baseline`, default main: `git archive` of its `echosim/` into a temporary directory, run in a subprocess),
and prints per batch size the policy's CPU ms per decode step of each, best of `--repeats`.

    python benchmarks/bench_adaptive_overhead.py record --set spec_bench --concurrency 1,16,32,64 --out rec.pkl
    python benchmarks/bench_adaptive_overhead.py compare rec.pkl --baseline main --repeats 5
    python benchmarks/bench_adaptive_overhead.py compare-engine --concurrency 1,16,64 --baseline main
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CALLS = ("set_batch", "plan", "start", "gate", "select", "observe", "observe_step")


def _snap(x):
    """A copy of an argument as it is now (the engine fills the forest depth by depth after gate calls)."""
    from echosim.spec.forest import DraftForest

    if isinstance(x, DraftForest):
        return copy.deepcopy(x)
    if isinstance(x, np.ndarray):
        return x.copy()
    return x


def record(args) -> int:
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_engine import held_out_prompts
    from benchmarks.bench_serve import spec_bench_prompts
    from echo_exec.engine import Engine, SamplingParams
    from echo_exec.replay import SPEC_BENCH_PROMPTS
    from echo_exec.tokenizer import ByteTokenizer
    from echo_exec.train_tiny import MODELS_DIR
    from echosim.commands.serve import policy_settings

    torch.set_num_threads(1)
    draft_dir = MODELS_DIR / "tiny-draft"
    _, cfg, _ = policy_settings(None, "echo", str(draft_dir))
    out = dict(config=cfg, runs=[])
    for conc in [int(c) for c in args.concurrency.split(",")]:
        n = max(2 * conc, args.min_requests)
        if args.set == "spec_bench":
            tok = ByteTokenizer()
            prompts = [tok.encode(p["text"]) for p in spec_bench_prompts(SPEC_BENCH_PROMPTS, n, 1024, args.seed)]
        else:
            prompts = held_out_prompts(n, 192, args.gen_len, args.seed)
        engine = Engine(MODELS_DIR / "tiny-target", draft_dir, policy="echo", policy_config=cfg, max_running=64)
        pol = engine.policy
        calls: list = []
        for name in CALLS:
            fn = getattr(pol, name)

            def rec(*a, _fn=fn, _name=name, _calls=calls, **k):
                r = _fn(*a, **k)
                _calls.append((_name, tuple(_snap(x) for x in a), {key: _snap(v) for key, v in k.items()},
                               _snap(r)))
                return r

            setattr(pol, name, rec)
        params = SamplingParams(max_new_tokens=args.gen_len)
        todo, inflight = list(prompts), 0
        t0 = time.perf_counter()
        while todo or inflight:
            while todo and inflight < conc:
                engine.add_request(todo.pop(0), params)
                inflight += 1
            inflight -= len(engine.step())
        prior = pol.step_time.table if pol.step_time is not None else None
        out["runs"].append(dict(concurrency=conc, prior=prior, calls=calls, state=pol.state()))
        print(f"C={conc}: {n} requests, {sum(c[0] == 'set_batch' for c in calls)} decode steps, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    with open(args.out, "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
    return 0


def engine(args) -> int:
    """The engine's closed loop with the policy's contract calls timed per method (this thread's CPU time),
    whichever echosim is first on PYTHONPATH (compare-engine points it at the baseline's)."""
    import torch

    from benchmarks.bench_serve import spec_bench_prompts
    from echo_exec.engine import Engine, SamplingParams
    from echo_exec.replay import SPEC_BENCH_PROMPTS
    from echo_exec.tokenizer import ByteTokenizer
    from echo_exec.train_tiny import MODELS_DIR
    from echosim.commands.serve import policy_settings

    torch.set_num_threads(1)
    n = max(2 * args.concurrency, args.min_requests)
    prompts = [ByteTokenizer().encode(p["text"]) for p in spec_bench_prompts(SPEC_BENCH_PROMPTS, n, 1024, args.seed)]
    _, cfg, _ = policy_settings(None, "echo", str(MODELS_DIR / "tiny-draft"))
    eng = Engine(MODELS_DIR / "tiny-target", MODELS_DIR / "tiny-draft", policy="echo", policy_config=cfg,
                 max_running=64)
    pol, acc = eng.policy, {}
    for name in CALLS:
        fn = getattr(pol, name)

        def timed(*a, _fn=fn, _name=name, **k):
            c0 = time.thread_time()
            try:
                return _fn(*a, **k)
            finally:
                acc[_name] = acc.get(_name, 0.0) + (time.thread_time() - c0) * 1e3

        setattr(pol, name, timed)
    params = SamplingParams(max_new_tokens=args.gen_len)
    todo, inflight, batch = list(prompts), 0, []
    while todo or inflight:
        while todo and inflight < args.concurrency:
            eng.add_request(todo.pop(0), params)
            inflight += 1
        batch.append(len(eng.running))
        inflight -= len(eng.step())
    st = eng.stats()
    steps = st["decode_steps"]
    json.dump(dict(steps=steps, policy_ms=sum(acc.values()) / steps, step_cpu_ms=st["step_cpu_ms"] / st["steps"],
                   per_call={k: v / steps for k, v in acc.items()}, mean_running=float(np.mean(batch))), sys.stdout)
    return 0


def compare_engine(args) -> int:
    """engine runs, the baseline's scheduler core against this tree's, interleaved (old, new, old, new, ...)."""
    print(f"load average before: {os.getloadavg()}")
    old = Path(_baseline_tree(args.baseline))
    for name in ("echo_exec", "cost_models", "traces"):  # the rest of the project from this tree
        (old / name).symlink_to(ROOT / name)
    subprocess.run(["cp", "-r", str(ROOT / "benchmarks"), str(old / "benchmarks")], check=True)
    trees = {"new": ROOT, f"old ({args.baseline})": old}
    print("| concurrency | code | decode steps | mean running | policy CPU ms/step | engine CPU ms/step | "
          "per call (ms/step) |")
    print("|---|---|---|---|---|---|---|")
    for c in [int(x) for x in args.concurrency.split(",")]:
        for rep in range(args.repeats):
            for label in (list(trees) if rep % 2 else list(trees)[::-1]):
                env = dict(os.environ, PYTHONPATH=str(trees[label]))
                p = subprocess.run([sys.executable, str(trees[label] / "benchmarks" / Path(__file__).name), "engine",
                                    "--concurrency", str(c), "--gen-len", str(args.gen_len)], env=env, check=True,
                                   capture_output=True, text=True)
                r = json.loads(p.stdout)
                calls = ", ".join(f"{k} {v:.3f}" for k, v in r["per_call"].items())
                print(f"| {c} | {label} | {r['steps']} | {r['mean_running']:.1f} | {r['policy_ms']:.3f} | "
                      f"{r['step_cpu_ms']:.2f} | {calls} |", flush=True)
    print(f"load average after: {os.getloadavg()}")
    return 0


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def replay_run(cfg: dict, run: dict) -> dict:
    """One recorded run through a fresh policy: CPU ms per decode step by batch size; mismatches counted."""
    from echosim.spec.adaptive import batched_step_time
    from echosim.spec.policies import make_policy

    pol = make_policy("echo", cfg)
    if run["prior"] is not None:
        pol.bind(batched_step_time(run["prior"]))
    per_b: dict[int, list[float]] = {}
    per_call: dict[str, float] = {}
    mismatches, ms, B = [], 0.0, None
    clock = time.thread_time
    for i, (name, a, k, want) in enumerate(run["calls"]):
        if name == "set_batch":
            if B is not None:
                per_b.setdefault(B, []).append(ms)
            B, ms = len(a[0]), 0.0
        c0 = clock()
        got = getattr(pol, name)(*a, **k)
        dt = (clock() - c0) * 1e3
        ms += dt
        per_call[name] = per_call.get(name, 0.0) + dt
        if not _same(got, want):
            mismatches.append((i, name))
    if B is not None:
        per_b.setdefault(B, []).append(ms)
    state_same = json.dumps(pol.state(), sort_keys=True, default=str) == \
        json.dumps(run["state"], sort_keys=True, default=str)
    return dict(per_b={b: (len(v), float(np.sum(v))) for b, v in per_b.items()}, per_call=per_call,
                mismatches=mismatches[:10],
                n_mismatches=len(mismatches), state_same=state_same)


def replay(args) -> int:
    with open(args.recording, "rb") as f:
        rec = pickle.load(f)
    for run in rec["runs"]:  # once untimed: first calls (imports, NumPy's and LAPACK's set-up) are not per step
        replay_run(rec["config"], run)
    res = [replay_run(rec["config"], run) for run in rec["runs"]]
    json.dump(res, sys.stdout)
    return 0


def _baseline_tree(rev: str) -> str:
    d = tempfile.mkdtemp(prefix="adaptive-baseline-")
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "echosim"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", d], input=arch.stdout, check=True)
    return d


def compare(args) -> int:
    print(f"load average before: {os.getloadavg()}")
    trees = {"new": str(ROOT), f"old ({args.baseline})": _baseline_tree(args.baseline)}
    results: dict[str, list] = {k: [] for k in trees}
    for rep in range(args.repeats):
        for label in (list(trees) if rep % 2 == 0 else list(trees)[::-1]):
            env = dict(os.environ, PYTHONPATH=trees[label])
            p = subprocess.run([sys.executable, __file__, "replay", args.recording], env=env, check=True,
                               capture_output=True, text=True)
            results[label].append(json.loads(p.stdout))
    with open(args.recording, "rb") as f:
        conc = [run["concurrency"] for run in pickle.load(f)["runs"]]
    for label, reps in results.items():
        for r in reps:
            for run in r:
                if run["n_mismatches"] or not run["state_same"]:
                    print(f"{label}: {run['n_mismatches']} results differ from the recording "
                          f"(first: {run['mismatches']}), final state same: {run['state_same']}")
    print(f"load average after: {os.getloadavg()}")
    new, old = list(trees)
    print(f"| concurrency | decode steps | mean batch | {new} ms/step | {old} ms/step | new / old |")
    print("|---|---|---|---|---|---|")
    for j, c in enumerate(conc):
        per = {}
        for label, reps in results.items():  # best of the repeats: the least disturbed by other jobs
            steps = sum(n for n, _ in reps[0][j]["per_b"].values())
            per[label] = min(sum(ms for _, ms in r[j]["per_b"].values()) for r in reps) / max(steps, 1)
        runs = results[new][0][j]["per_b"]
        mean_b = sum(int(b) * n for b, (n, _) in runs.items()) / max(steps, 1)
        print(f"| {c} | {steps} | {mean_b:.1f} | {per[new]:.3f} | {per[old]:.3f} | {per[new] / per[old]:.2f} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--set", choices=["spec_bench", "stdlib"], default="spec_bench")
    r.add_argument("--concurrency", default="1,16,32,64")
    r.add_argument("--min-requests", type=int, default=8)
    r.add_argument("--gen-len", type=int, default=64)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("replay")
    p.add_argument("recording", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("recording", type=Path)
    c.add_argument("--baseline", default="main")
    c.add_argument("--repeats", type=int, default=5)
    e = sub.add_parser("engine")
    e.add_argument("--concurrency", type=int, default=16)
    e.add_argument("--min-requests", type=int, default=8)
    e.add_argument("--gen-len", type=int, default=64)
    e.add_argument("--seed", type=int, default=0)
    ce = sub.add_parser("compare-engine")
    ce.add_argument("--concurrency", default="1,16,64")
    ce.add_argument("--baseline", default="main")
    ce.add_argument("--repeats", type=int, default=1)
    ce.add_argument("--gen-len", type=int, default=64)
    args = ap.parse_args()
    return {"record": record, "replay": replay, "compare": compare, "engine": engine,
            "compare-engine": compare_engine}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
