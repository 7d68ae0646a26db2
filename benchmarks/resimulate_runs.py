"""Saved `echosim validate` runs simulated again under other acceptance models: each run's simulator config and
trace as saved, only the acceptance model swapped, against the engine's numbers as measured. What a change to the
acceptance model would have done to validate's MAT and throughput errors, in seconds per run and without the engine.

    python benchmarks/resimulate_runs.py --runs 'runs/val-*' --acceptance A.json [B.json ...]
    python benchmarks/resimulate_runs.py --runs 'runs/val-*' --acceptance A.json --seeds 8 --at-speed

`{run}` in an acceptance path is replaced by each run's folder (a model fitted per run). With --seeds N each run is
simulated at seeds 0..N-1 and their mean is compared with the mean of the run's engine replays (engine/,
engine_rerun1/, ...), as `validate --sim-seeds` does; --at-speed simulates the run's `sim_at_replay_speed` (every
step priced at the replays' own machine speed, validation.json's replay_speed).
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np

from cost_models.scaled import ScaledCostModel
from echosim.sim.config import ClusterConfig, SimConfig, build_cost_model
from echosim.sim.simulator import simulate
from echosim.sim.workload import WorkloadSpec


def resimulate(run: Path, acceptance: str, seed: int | None = None, at_speed: bool = False) -> dict:
    folder = run / ("sim_at_replay_speed" if at_speed else "sim")
    saved = json.loads((folder / "config.json").read_text())["sim"]
    sim = SimConfig(cluster=ClusterConfig(**saved["cluster"]), policy=saved["policy"], acceptance=acceptance,
                    core=saved.get("core", "exact"), seed=saved.get("seed", 0) if seed is None else seed)
    speed = json.loads((run / "validation.json").read_text()).get("replay_speed") if at_speed else None
    cost = ScaledCostModel(build_cost_model(sim.cluster), speed) if speed and speed != 1.0 else None
    return simulate(sim, WorkloadSpec(kind="trace", trace=str(folder / "trace.jsonl")), out_dir=None,
                    cost=cost).summary


def engine_mean(run: Path, seeds: int) -> dict:
    """The first replay's MAT and throughput, or with several seeds the mean over every replay of the run."""
    folders = [run / "engine"] + (sorted(run.glob("engine_rerun*")) if seeds > 1 else [])
    runs = [json.loads((f / "summary.json").read_text()) for f in folders]
    return {k: float(np.mean([r[k] for r in runs])) for k in ("mat", "throughput_tok_s")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="validate run folders (globs allowed)")
    p.add_argument("--acceptance", nargs="+", required=True, help="acceptance model files to compare")
    p.add_argument("--seeds", type=int, default=1, help="simulate each run at seeds 0..N-1, compare means")
    p.add_argument("--at-speed", action="store_true", help="at the replays' own machine speed")
    a = p.parse_args()
    runs = sorted({Path(x) for pattern in a.runs for x in glob.glob(pattern) if (Path(x) / "sim").is_dir()})
    errors = {acc: [] for acc in a.acceptance}
    print("| run | engine MAT | " + " | ".join(f"{Path(acc).name}: MAT, error, throughput error"
                                               for acc in a.acceptance) + " |")
    print("|---|---|" + "---|" * len(a.acceptance))
    for run in runs:
        eng = engine_mean(run, a.seeds)
        cells = []
        for acc in a.acceptance:
            path = acc.replace("{run}", str(run))
            sims = [resimulate(run, path, seed if a.seeds > 1 else None, a.at_speed) for seed in range(a.seeds)]
            mat = float(np.mean([s["mat"] for s in sims]))
            tput = float(np.mean([s["throughput_tok_s"] for s in sims]))
            err = (mat / eng["mat"] - 1) * 100
            errors[acc].append(err)
            cells.append(f"{mat:.3f}, {err:+.1f}%, {(tput / eng['throughput_tok_s'] - 1) * 100:+.1f}%")
        print(f"| {run} | {eng['mat']:.3f} | " + " | ".join(cells) + " |", flush=True)
    for acc, e in errors.items():
        e = np.array(e)
        print(f"{acc}: MAT error {e.min():+.1f}..{e.max():+.1f}%, mean {e.mean():+.1f}%, mean absolute "
              f"{np.abs(e).mean():.1f}% over {len(e)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
