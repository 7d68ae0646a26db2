"""Where the engine's step time beyond its forwards sits, phase by phase: each decode-only step of a `validate`
run's engine replays (engine/, engine_rerun1/, ...: iterations.csv, the engine's own phase times) against the
run's fitted forwards. Per replay, least squares of
- the verify phase (`verify_ms`: the tree forward, the acceptance walk, the commit) minus the priced target
  forward and LM head, on the tokens verified and the requests decoding;
- the rest of the step (`overhead_ms`: step time minus drafting and verification) on a constant and the requests;
and the mean measured draft and verify phases against their priced forwards. What `validate`'s phase-wise
overhead fit (echosim/validate/step_overheads.py `phase_rows`) assumes: the engine's per-request work inside its
verify phase, a remainder that does not grow with the batch (docs/ADAPTIVE.md).

    python benchmarks/overhead_phases.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cost_models.fitted import FittedCostModel
from cost_models.interface import StepBatch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    print("| run | replay | decode steps | verify residual: ms per token / per request | rest: ms per step / per "
          "request | draft phase ms (mean) | verify phase ms, measured / priced (mean) |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        cfg = json.loads((run / "config.json").read_text())
        cost = FittedCostModel(cfg["model"], run / "hardware.json", draft=cfg.get("draft"),
                               params=run / "cost_fit.json")
        for side in sorted(p.name for p in run.glob("engine*") if (p / "iterations.csv").is_file()):
            df = pd.read_csv(run / side / "iterations.csv")
            d = df[(df.prefill_tokens == 0) & (df.batch > 0)]
            if len(d) < 4:
                continue
            B = d.batch.to_numpy(float)
            T = d.verified_tokens.to_numpy(float)
            st = cost.step_time(StepBatch.uniform(B, T / B, d.kv_tokens.to_numpy(float) / B))
            priced = np.asarray(st.verify_ms) + np.asarray(st.lm_head_ms)
            verify = d.verify_ms.to_numpy(float)
            (per_token, per_req_v), *_ = np.linalg.lstsq(np.c_[T, B], verify - priced, rcond=None)
            (const, per_req_r), *_ = np.linalg.lstsq(np.c_[np.ones_like(B), B], d.overhead_ms.to_numpy(float),
                                                     rcond=None)
            print(f"| {run.name} | {side} | {len(d)} | {per_token:.3f} / {per_req_v:.3f} | {const:.2f} / "
                  f"{per_req_r:.3f} | {d.draft_ms.mean():.1f} | {verify.mean():.1f} / {priced.mean():.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
