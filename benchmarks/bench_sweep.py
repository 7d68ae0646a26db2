"""Wall time of one 100-cell sweep, serial against the process pool (and Ray with --ray), side by side.

    python benchmarks/bench_sweep.py [--jobs N] [--ray]

The grid: 5 policies x 10 concurrencies x 2 seeds, Qwen3-8B on one H100, closed loop, 2 requests per slot of
100 in / 200 out. Each backend runs it into a fresh folder; the tables must come out identical."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from echosim.sim.speculation import clear_table_cache
from echosim.sweep import parse_spec, run_sweep
from echosim.sweep.runner import default_jobs

GRID = {"policies": ["ar", "eagle3", "echo", "ddd", "tetris"],
        "concurrency": [1, 2, 4, 8, 12, 16, 24, 32, 48, 64], "seeds": [0, 1], "requests_per_slot": 2,
        "input_len": 100, "output_len": 200}


def _cpu_s() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the backends this many times (noisy machines)")
    args = ap.parse_args()
    spec = parse_spec(GRID)
    jobs = args.jobs or default_jobs()
    backends = ["serial", "pool"] + (["ray"] if args.ray else [])
    tables, walls = {}, {b: [] for b in backends}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for b in backends:
                # each round as a fresh `echosim sweep` process starts: no acceptance tables kept from the last
                # round (the pool's and Ray's workers are new processes every round)
                clear_table_cache()
                cpu0 = _cpu_s()
                t0 = time.perf_counter()
                res = run_sweep(spec, Path(tmp) / f"{b}{r}", backend=b, jobs=jobs, progress=False, plots=False)
                walls[b].append(time.perf_counter() - t0)
                cpu = _cpu_s() - cpu0
                tables[b] = res.table
                # serial: the CPU share this process got (pool and Ray workers are not our children)
                share = f", {cpu / walls[b][-1]:.2f} of a core on average" if b == "serial" else ""
                print(f"{b}: {res.cells} cells in {walls[b][-1]:.1f} s wall{share} (load {os.getloadavg()[0]:.1f})",
                      flush=True)
    for b in backends[1:]:
        pd.testing.assert_frame_equal(tables["serial"], tables[b])
        ratios = [w / s for w, s in zip(walls[b], walls["serial"], strict=True)]
        print(f"{b} / serial wall time per round: {', '.join(f'{x:.2f}' for x in ratios)} (median "
              f"{sorted(ratios)[len(ratios) // 2]:.2f}, {jobs} workers); tables identical")
    print(f"load average at the end: {os.getloadavg()}, CPUs: {os.cpu_count()}")


if __name__ == "__main__":
    main()
