"""Acceptance of the real records against the fitted model's, by depth, rank and draft probability.

Reads an `echosim validate` run folder: its calibration records (the engine, a static tree verifying every
candidate) and the acceptance model fitted to them. The model then drafts the same tree shape through the real
scheduler core (simulate_records) and both sides are binned alike. Only nodes whose parent was accepted count
(a node below a rejected parent is never accepted). A whole-tree MAT can match while the split by rank does not;
a policy that picks nodes by their probability (ECHO) sees the split.

    python benchmarks/acceptance_by_rank.py RUN_DIR [--depths 1,3,5] [--requests 256] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from echosim.sim.acceptance import AcceptanceModel
from echosim.sim.acceptance_fit import infer_parent_accepted, simulate_records
from echosim.spec.policies import make_policy
from echosim.spec.records import read_records

BINS = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0001])


def table(rec, depths: list[int], min_nodes: int) -> dict:
    """{(rank, depth): (n, acceptance, [acceptance per draft-probability bin or None])}."""
    live = infer_parent_accepted(rec)
    depth, rank = np.asarray(rec.depth), np.asarray(rec.rank)
    prob, acc = np.asarray(rec.draft_prob), np.asarray(rec.accepted, float)
    b = np.digitize(prob, BINS) - 1
    out = {}
    for r in (0, 1):
        for d in depths:
            s = live & (depth == d) & ((rank == 0) if r == 0 else (rank >= 1))
            cells = [float(acc[s & (b == i)].mean()) if (s & (b == i)).sum() >= min_nodes else None
                     for i in range(len(BINS) - 1)]
            out[(r, d)] = (int(s.sum()), float(acc[s].mean()) if s.any() else float("nan"), cells)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--depths", default="1,3,5")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    run = Path(a.run_dir)
    real = read_records(run / "calibration_records.jsonl")
    model = AcceptanceModel.load(run / "acceptance.json")
    cfg = json.loads((run / "config.json").read_text())
    D, k = int(np.max(real.depth)), int(np.max(real.rank)) + 1
    _, per_tree = np.unique(np.c_[real.step, real.request], axis=0, return_counts=True)  # nodes of each tree
    shape = {"steps": D, "topk": k, "num_draft_tokens": int(per_tree.max()) + 1}
    sim = simulate_records(model, make_policy("eagle3", shape), ["default"], a.requests, a.steps)
    depths = [int(x) for x in a.depths.split(",")]
    t_real, t_sim = table(real, depths, 15), table(sim, depths, 15)
    print(f"run {run} (policy {cfg.get('policy')}), tree {shape}: {len(real):,} real nodes, {len(sim):,} simulated")
    print("bins of draft probability: " + " ".join(f"[{lo:g},{hi:.2g})" for lo, hi in zip(BINS[:-1], BINS[1:],
                                                                                          strict=True)))
    print("| rank | depth | nodes real / sim | acceptance real / sim | by draft probability: real / sim |")
    print("|---|---|---|---|---|")
    for key in t_real:
        (nr, ar, cr), (ns, as_, cs) = t_real[key], t_sim[key]
        cells = " ".join("–" if x is None and y is None else f"{'–' if x is None else f'{x:.2f}'}/"
                         f"{'–' if y is None else f'{y:.2f}'}" for x, y in zip(cr, cs, strict=True))
        print(f"| {'0' if key[0] == 0 else '1+'} | {key[1]} | {nr} / {ns} | {ar:.3f} / {as_:.3f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
