"""Where a simulator run's CPU goes: the full Azure hour (as bench_sim_speed.py runs it) with a few named functions
wrapped in `time.perf_counter` pairs (~0.1 us of timer per call included in each figure). The functions nest
(`_peek_prefix` holds the merge kernel and the curves; `Speculator.step` of goodput ECHO calls `_peek_prefix`).

    python benchmarks/sim_time_breakdown.py --policy echo
    python benchmarks/sim_time_breakdown.py --policy 'echo{"budget":{"kind":"goodput","tokens":31}}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_sim_speed as bench  # noqa: E402
from echosim import metrics  # noqa: E402
from echosim.sim import pricing, replica, speculation  # noqa: E402

WRAPPED = [(pricing.StepPricer, "price_parts", "price"), (metrics.Metrics, "iteration", "metrics.iteration"),
           (speculation.Speculator, "_peek_prefix", "goodput _peek_prefix"),
           (speculation.Speculator, "_curve", "goodput step-time curves"),
           (speculation.Speculator, "step", "general loop: Speculator.step"),
           (replica.Replica, "_keep", "Replica._keep (finishes)"), (replica.Replica, "_append", "Replica._append")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="echo", help="NAME or NAME{JSON settings}")
    ap.add_argument("--requests", type=int, default=None)
    args = ap.parse_args()
    spent: dict[str, float] = {}
    calls: dict[str, int] = {}
    clock = time.perf_counter

    def timed(fn, key):
        def wrapper(*a):
            t0 = clock()
            out = fn(*a)
            spent[key] = spent.get(key, 0.0) + clock() - t0
            calls[key] = calls.get(key, 0) + 1
            return out
        return wrapper

    for cls, name, key in WRAPPED:
        setattr(cls, name, timed(getattr(cls, name), key))
    kernel_of = speculation.prefix_steps_kernel
    wrapped_kernel: list = []

    def kernel():   # the merge kernel, timed
        k = kernel_of()
        if k is not None and not wrapped_kernel:
            wrapped_kernel.append(timed(k, "goodput merge kernel (first call loads the cache)"))
        return wrapped_kernel[0] if k is not None else None

    speculation.prefix_steps_kernel = kernel
    run_args = argparse.Namespace(trace=str(bench.TRACE), core="table", requests=args.requests, time_scale=1.0,
                                  seed=0, out=None, synthetic=None, rate=300.0)
    row = bench.run_one(bench._policy(args.policy), run_args)
    print(json.dumps({"policy": row["policy"], "cpu_s": row["cpu_s"], "iterations": row["iterations"]}))
    for key in sorted(spent, key=spent.get, reverse=True):
        print(f"{key:<52}{spent[key]:>8.3f} s{calls[key]:>10,} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
