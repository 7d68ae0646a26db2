"""Calibration of ECHO's gates from per-node records (see records.py).

For each request-step and depth d, the confidence c_{i,d} is the best path probability among the depth-d drafts,
and the outcome is whether the accepted path reached depth d. Sweet-spot depths are those where c separates the two
best (AUROC). At each sweet spot, tau_d maximizes a throughput proxy over the records: gating a request at d keeps
its accepted length up to d and verifies `truncated_tokens` instead of `full_tokens`; a step costs
1 + token_cost * verified drafts (token_cost: a verified draft's cost relative to the step's fixed cost; small
under low load, larger under high load).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from echosim.spec.policies.echo import EchoConfig
from echosim.spec.records import NodeRecords


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged). NaN if a class is empty."""
    label = np.asarray(label, bool)
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    uniq, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    avg_rank = first_rank + (counts - 1) / 2.0
    ranks = avg_rank[inv]
    return float((ranks[label].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


@dataclass
class DepthStats:
    depth: int
    samples: int
    reached: int
    auroc: float


@dataclass
class Calibration:
    config: EchoConfig
    depths: list[DepthStats]
    predicted_gain: float  # throughput proxy with the chosen gates / without gates
    notes: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"depths": [vars(d) for d in self.depths], "predicted_gain": self.predicted_gain, **self.notes}


def _group_depth_table(rec: NodeRecords):
    """Per (request-step, depth): group index, depth, c (best path prob), reached (an accepted node there).
    Also per group: accepted length L."""
    _, group = np.unique(np.stack([rec.step, rec.request]), axis=1, return_inverse=True)
    group = group.ravel()
    n_groups = int(group.max()) + 1
    D = int(rec.depth.max())
    key = group.astype(np.int64) * (D + 1) + rec.depth
    uk, inv = np.unique(key, return_inverse=True)
    c = np.full(len(uk), -np.inf)
    np.maximum.at(c, inv, rec.path_prob)
    reached = np.zeros(len(uk), bool)
    np.logical_or.at(reached, inv, rec.accepted)
    L = np.zeros(n_groups, np.int64)
    np.maximum.at(L, group, np.where(rec.accepted, rec.depth, 0))
    return uk // (D + 1), (uk % (D + 1)).astype(np.int64), c, reached, L


def calibrate(rec: NodeRecords, base: EchoConfig | None = None, max_gates: int = 2, token_cost: float = 0.02,
              min_samples: int = 20, min_auroc: float = 0.55) -> Calibration:
    base = base or EchoConfig()
    g, d, c, reached, L = _group_depth_table(rec)
    n_groups = len(L)
    stats = []
    for depth in range(1, int(d.max(initial=0)) + 1):
        sel = d == depth
        # Only steps whose path reached depth - 1 say anything about depth d.
        sel &= L[g] >= depth - 1
        stats.append(DepthStats(depth, int(sel.sum()), int(reached[sel].sum()), auroc(c[sel], reached[sel])))
    usable = [s for s in stats if s.samples >= min_samples and min(s.reached, s.samples - s.reached) >= 5
              and s.auroc >= min_auroc and s.depth < base.steps]
    sweet = sorted(sorted(usable, key=lambda s: -s.auroc)[:max_gates], key=lambda s: s.depth)

    full, trunc = base.num_draft_tokens - 1, base.remaining_num_draft_tokens - 1
    accepted = L.astype(float).copy()
    tokens = np.full(n_groups, float(full))
    gated = np.zeros(n_groups, bool)

    def proxy(acc: np.ndarray, tok: np.ndarray) -> np.ndarray:
        return (acc + 1).sum(axis=-1) / (1.0 + token_cost * tok).sum(axis=-1)

    baseline = float(proxy(accepted, tokens))
    gates = []
    for s in sweet:
        rows = np.nonzero((d == s.depth) & ~gated[g])[0]
        grp, conf = g[rows], c[rows]
        taus = np.unique(np.r_[0.0, np.quantile(conf, np.linspace(0.02, 0.98, 49))])
        cut = conf[None, :] < taus[:, None]                      # [n_tau, n]: gated at this depth
        acc = np.broadcast_to(accepted, (len(taus), n_groups)).copy()
        tok = np.broadcast_to(tokens, (len(taus), n_groups)).copy()
        acc[:, grp] = np.where(cut, np.minimum(accepted[grp], s.depth), accepted[grp])
        tok[:, grp] = np.where(cut, float(trunc), tokens[grp])
        best = int(np.argmax(proxy(acc, tok)))
        tau = float(taus[best])
        if tau > 0:
            gates.append((s.depth, round(tau, 4)))
            hit = grp[cut[best]]
            gated[hit] = True
            accepted[hit] = np.minimum(accepted[hit], s.depth)
            tokens[hit] = trunc
    config = replace(base, gates=gates)
    return Calibration(config=config, depths=stats, predicted_gain=float(proxy(accepted, tokens)) / baseline,
                       notes={"token_cost": token_cost, "request_steps": n_groups})


def calibrate_fixed(rec: NodeRecords, base: EchoConfig | None = None, token_cost: float = 0.02) -> Calibration:
    """The fixed-threshold ablation's calibration: ONE tau for every depth, chosen on all depths pooled with the
    same throughput proxy as calibrate(): a request-step stops at the first depth d whose confidence c_{i,d} is
    below tau (keeping its accepted length up to d and verifying remaining_num_draft_tokens). Candidate taus are
    quantiles of all depths' confidences together. Returns a config with gate_mode 'fixed' and fixed_threshold."""
    base = base or EchoConfig()
    g, d, c, reached, L = _group_depth_table(rec)
    n_groups, D = len(L), int(d.max(initial=0))
    conf = np.full((n_groups, D + 1), np.inf)  # depths never drafted never gate
    conf[g, d] = c
    conf = conf[:, 1:max(base.steps, 1)]  # gates at depths 1 .. steps - 1
    full, trunc = base.num_draft_tokens - 1, base.remaining_num_draft_tokens - 1
    taus = np.unique(np.r_[0.0, np.quantile(c[np.isfinite(c)], np.linspace(0.02, 0.98, 49))]) \
        if np.isfinite(c).any() else np.array([0.0])
    acc, tok = np.empty((len(taus), n_groups)), np.empty((len(taus), n_groups))
    for i, tau in enumerate(taus):
        below = conf < tau
        first = np.where(below.any(axis=1), below.argmax(axis=1) + 1, 0)  # first gated depth, 0 = never
        cut = first > 0
        acc[i] = np.where(cut, np.minimum(L, first), L)
        tok[i] = np.where(cut, float(trunc), float(full))
    proxy = (acc + 1).sum(axis=1) / (1.0 + token_cost * tok).sum(axis=1)
    best = int(np.argmax(proxy))
    config = replace(base, gate_mode="fixed", fixed_threshold=round(float(taus[best]), 4))
    return Calibration(config=config, depths=[], predicted_gain=float(proxy[best] / proxy[0]),
                       notes={"token_cost": token_cost, "request_steps": n_groups, "mode": "fixed"})
