"""Saved `echosim validate` runs simulated again under other acceptance models: each run's simulator config and
trace as saved, only the acceptance model swapped, against the engine's numbers as measured. What a change to the
acceptance model would have done to validate's MAT and throughput errors, in seconds per run and without the engine.

    python benchmarks/resimulate_runs.py --runs 'runs/val-*' --acceptance A.json [B.json ...]
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np

from echosim.sim.config import ClusterConfig, SimConfig
from echosim.sim.simulator import simulate
from echosim.sim.workload import WorkloadSpec


def resimulate(run: Path, acceptance: str) -> dict:
    saved = json.loads((run / "sim" / "config.json").read_text())["sim"]
    sim = SimConfig(cluster=ClusterConfig(**saved["cluster"]), policy=saved["policy"], acceptance=acceptance,
                    core=saved.get("core", "exact"), seed=saved.get("seed", 0))
    return simulate(sim, WorkloadSpec(kind="trace", trace=str(run / "sim" / "trace.jsonl")), out_dir=None).summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="validate run folders (globs allowed)")
    p.add_argument("--acceptance", nargs="+", required=True, help="acceptance model files to compare")
    a = p.parse_args()
    runs = sorted({Path(x) for pattern in a.runs for x in glob.glob(pattern) if (Path(x) / "sim").is_dir()})
    errors = {acc: [] for acc in a.acceptance}
    print("| run | engine MAT | " + " | ".join(f"{Path(acc).name}: MAT, error, throughput error"
                                               for acc in a.acceptance) + " |")
    print("|---|---|" + "---|" * len(a.acceptance))
    for run in runs:
        eng = json.loads((run / "engine" / "summary.json").read_text())
        cells = []
        for acc in a.acceptance:
            s = resimulate(run, acc)
            err = (s["mat"] / eng["mat"] - 1) * 100
            errors[acc].append(err)
            tput = (s["throughput_tok_s"] / eng["throughput_tok_s"] - 1) * 100
            cells.append(f"{s['mat']:.3f}, {err:+.1f}%, {tput:+.1f}%")
        print(f"| {run} | {eng['mat']:.3f} | " + " | ".join(cells) + " |", flush=True)
    for acc, e in errors.items():
        e = np.array(e)
        print(f"{acc}: MAT error {e.min():+.1f}..{e.max():+.1f}%, mean {e.mean():+.1f}%, mean absolute "
              f"{np.abs(e).mean():.1f}% over {len(e)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
