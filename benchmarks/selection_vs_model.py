"""What the acceptance model gives a policy that selects, against the engine, with no timing in the way.

1. The selection curve: the records of `echosim validate`'s calibration tree (every candidate of the policy's draft
   shape verified) say, for each K, the MAT of verifying each step's K best nodes by path probability (what ECHO's
   budget and the adaptive budget pick). The same tree drafted under the fitted acceptance model gives the model's.
2. The shipped ECHO shape, static (per-request budget of 23 by path probability) and adaptive with its cost fixed
   to one prior on both sides (`observe_step` off, so measured and priced step times play no part), in the engine
   on validate's calibration prompts and under the model: MAT, drafts verified and accepted per drafting step, and
   per depth the draft-probability histogram of the verified nodes with their acceptance (parent accepted).

    python benchmarks/selection_vs_model.py RUN_DIR [--batch-sizes 4,16] [--models A.json,B.json]

RUN_DIR: an `echosim validate --policy echo` run folder (its calibration_records.jsonl and acceptance.json).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from echo_engine_vs_model import run_engine, run_model, shipped_echo, step_ms

from echosim.sim.acceptance import AcceptanceModel
from echosim.sim.acceptance_fit import simulate_records
from echosim.spec.policies import make_policy
from echosim.spec.records import NodeRecords, read_records
from echosim.validate.crossval import calibration_prompts, prompt_files

BINS = np.array([0.0, 0.3, 0.5, 0.7, 0.9, 0.97, 1.01])
KS = (1, 2, 3, 4, 6, 8, 12, 16, 23)


def step_keys(rec) -> tuple[np.ndarray, int]:
    _, inv = np.unique(rec.request.astype(np.int64) * 1_000_000 + rec.step, return_inverse=True)
    return inv, int(inv.max()) + 1


def selection_curve(rec) -> list[float]:
    """MAT of verifying each step's K best nodes by path probability (ancestor-closed: a path's probability only
    falls along it), from records of a tree that verified them all."""
    inv, n = step_keys(rec)
    order = np.lexsort((-rec.path_prob, inv))
    g, acc = inv[order], rec.accepted[order].astype(float)
    first = np.r_[True, g[1:] != g[:-1]]
    pos = np.arange(len(g)) - np.flatnonzero(first)[np.cumsum(first) - 1]
    return [1 + np.bincount(g[pos < k], acc[pos < k], minlength=n).mean() for k in KS]


def summary(rec) -> str:
    inv, n = step_keys(rec)
    acc = rec.accepted.astype(float)
    out = f"MAT over drafting steps {1 + np.bincount(inv, acc).mean():.3f}, drafts {len(acc) / n:.2f}, " \
          f"accepted per draft {acc.mean():.3f}"
    b = np.clip(np.searchsorted(BINS, rec.draft_prob, side="right") - 1, 0, len(BINS) - 2)
    for d in (1, 2, 3, 5):
        live = (rec.depth == d) & rec.parent_accepted
        cells = " ".join(f"{(live & (b == i)).sum() / max(live.sum(), 1):.2f}:"
                         + (f"{acc[live & (b == i)].mean():.2f}" if (live & (b == i)).sum() >= 15 else " -- ")
                         for i in range(len(BINS) - 1))
        out += f"\n      depth {d}: {(rec.depth == d).sum() / n:.2f} verified/step | share:accepted by q {cells}"
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--batch-sizes", default="4,16")
    p.add_argument("--models", default=None, help="acceptance models to compare (default: the run's own)")
    a = p.parse_args()
    torch.set_num_threads(1)
    run = Path(a.run)
    models = {Path(m).stem: AcceptanceModel.load(m) for m in (a.models or str(run / "acceptance.json")).split(",")}
    static = read_records(run / "calibration_records.jsonl")
    echo = {k: v for k, v in shipped_echo().items() if k != "adaptive"}
    plan = make_policy("echo", echo).plan(1)
    tree = {"steps": plan.depth, "topk": plan.k, "num_draft_tokens": 64}
    print("selection curve, MAT of the K best nodes by path probability, K = " + " ".join(map(str, KS)))
    print(f"  engine records ({len(static):,}): " + " ".join(f"{x:.3f}" for x in selection_curve(static)))
    for name, m in models.items():
        parts = []
        for s in range(8):
            part = simulate_records(m, make_policy("eagle3", tree), ["default"], requests=32, steps=40, seed=s)
            part.request[:] += s * 32
            parts.append(part)
        print(f"  model {name}: " + " ".join(f"{x:.3f}" for x in selection_curve(NodeRecords.concat(parts))))

    prompts = calibration_prompts(prompt_files()[0], 16, 256, 1)
    tmp = Path(tempfile.mkdtemp(prefix="selection-vs-model-"))

    def static_echo():
        return make_policy("echo", echo).bind(step_ms)

    def adaptive_prior_only():
        pol = make_policy("echo", {**echo, "adaptive": {}}).bind(step_ms)
        pol.observe_step = lambda *args, **kw: None  # the cost stays the bound prior, as on the model side
        return pol

    for label, make in (("static ECHO", static_echo), ("adaptive ECHO, cost prior only", adaptive_prior_only)):
        for b in (int(x) for x in a.batch_sizes.split(",")):
            rec = run_engine(make(), prompts, b, 64, tmp / f"{label[:6]}-{b}.jsonl")
            print(f"{label}, batch {b}, engine: {summary(rec)}", flush=True)
            for name, m in models.items():
                print(f"{label}, batch {b}, model {name}: {summary(run_model(m, make, b))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
