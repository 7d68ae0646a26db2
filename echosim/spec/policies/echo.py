"""ECHO: sparse confidence gating at calibrated depths and an elastic budget over the batch as one super-tree.

Gating: only at the sweet-spot depths d, a request's confidence c_{i,d} (the path probability of its best
depth-d candidate) is compared with tau_d. Below it, the request stops drafting (truncated); its tree is then
made of shallow candidates, i.e. it is spent on width. Selection fills the step's budget K_max in priority
order over the whole batch: a floor for every request, then Priority 1 (confident requests, deepest/most likely
first), then Priority 2 (truncated requests widen with what is left). Within a tier, nodes go by path score, so
each added node is the one with the largest expected acceptance (marginal gains are concave along a path).
Ablations (the paper's two): `echo_dense` gates at every depth with per-depth thresholds (each depth takes the
nearest sweet spot's tau); `echo_fixed` gates at every depth with ONE threshold calibrated for all depths pooled
(calibrate.calibrate_fixed; uncalibrated: `fixed_threshold`, else the mean of the sweet spots' taus). A request's
best path probability falls with depth, so one tau over-prunes deep drafts and under-prunes shallow ones: what the
per-depth calibration of ECHO avoids. echo_fixed therefore differs from echo whenever steps > 2, also with a single
sweet spot.
Defaults are the paper's Qwen3-8B SGLang settings at batch 4..16 (EchoConfig.from_sglang(5, 8, 32, 3, 0.3, 20)):
one gate at depth 4 with tau 0.3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from echosim.spec.budget import Budget
from echosim.spec.forest import DraftForest
from echosim.spec.policies.base import ConfigError, DraftPlan, Policy, register
from echosim.spec.policies.static import max_tree_nodes
from echosim.spec.select import band_per_row, ranked_with_caps, top_per_request


@dataclass
class EchoConfig:
    steps: int = 5                        # deepest draft depth
    topk: int = 8                         # children per node and beam width
    num_draft_tokens: int = 32            # per confident request, the root included (SGLang's convention)
    remaining_num_draft_tokens: int = 20  # per truncated request, the root included
    gates: list[tuple[int, float]] = field(default_factory=lambda: [(4, 0.3)])  # sweet spots: (depth, tau)
    root_threshold: float = 0.0           # best depth-1 probability below this: do not deepen at all (0 = off)
    root_width: int = 0                   # children drafted at the root (0 = topk); width for root-gated requests
    floor_tokens: int = 1                 # drafts every drafting request gets before any priority
    budget: Budget = field(default_factory=lambda: Budget("per_request", 31))
    gate_mode: str = "sparse"             # sparse | dense (ablation) | fixed (ablation)
    fixed_threshold: float | None = None  # gate_mode 'fixed': the one tau at every depth (None: mean of the gates')

    @classmethod
    def from_sglang(cls, steps: int, topk: int, num_draft_tokens: int, judge_depth: int, threshold: float,
                    remaining_num_draft_tokens: int) -> EchoConfig:
        """The paper's SGLang-level settings (echo_reported.md): gate once with threshold after the draft step of
        loop index judge_depth, i.e. at depth judge_depth + 1 (SGLang's draft loop index i handles the depth-i+1
        candidates). The authors' reference code names its gates by the same kind of loop index: its Qwen3-8B gate
        (loop index 2 there, depth 4, threshold 0.3) is the paper's SGLang Qwen3-8B setting (judge_depth 3, 0.3)."""
        return cls(steps=steps, topk=topk, num_draft_tokens=num_draft_tokens,
                   remaining_num_draft_tokens=remaining_num_draft_tokens, gates=[(judge_depth + 1, threshold)],
                   budget=Budget("per_request", num_draft_tokens - 1))


@register
class Echo(Policy):
    name = "echo"
    config_cls = EchoConfig
    gate_mode: str | None = None  # the ablation subclasses force theirs
    gates_last_depth = True

    def check(self) -> None:
        c = self.config
        mode = self.gate_mode or c.gate_mode
        if mode not in ("sparse", "dense", "fixed"):
            raise ConfigError(f"echo gate_mode must be sparse, dense or fixed, not {mode!r}")
        if c.steps < 1 or c.topk < 1:
            raise ConfigError(f"echo needs steps >= 1 and topk >= 1 (got steps={c.steps}, topk={c.topk})")
        k1 = max(c.root_width, c.topk)
        size = k1 + (c.steps - 1) * c.topk * c.topk
        if not 1 <= c.num_draft_tokens <= size + 1:
            raise ConfigError(f"echo num_draft_tokens={c.num_draft_tokens} must be in 1..{size + 1}")
        if not 1 <= c.remaining_num_draft_tokens <= c.num_draft_tokens + max_tree_nodes(1, k1):
            raise ConfigError("echo remaining_num_draft_tokens must be >= 1")
        for depth, tau in c.gates:
            if not 1 <= depth <= c.steps:
                raise ConfigError(f"echo gate depth {depth} outside 1..steps={c.steps}")
            if not 0.0 <= tau <= 1.0:
                raise ConfigError(f"echo gate threshold {tau} at depth {depth} is not a probability")
        # log-thresholds per gated depth, for the mode in force
        taus = dict(c.gates)
        if c.fixed_threshold is not None and not 0.0 <= c.fixed_threshold <= 1.0:
            raise ConfigError(f"echo fixed_threshold {c.fixed_threshold} is not a probability")
        if mode == "fixed":  # one tau at every depth (the last one drafts nothing deeper to gate)
            tau = c.fixed_threshold if c.fixed_threshold is not None else \
                (float(np.mean(list(taus.values()))) if taus else 0.0)
            taus = {d: tau for d in range(1, c.steps)}
        elif mode == "dense":
            known = sorted(taus) or [1]
            taus = {d: taus.get(min(known, key=lambda g: (abs(g - d), g)), 0.0) for d in range(1, c.steps)}
        self._log_tau = {d: (np.log(t) if t > 0 else -np.inf) for d, t in taus.items()}
        self._log_root = np.log(c.root_threshold) if c.root_threshold > 0 else -np.inf

    def plan(self, batch_size: int) -> DraftPlan:
        c = self.config
        return DraftPlan(c.steps, max(c.root_width, c.topk), c.topk)

    def max_tree_tokens(self) -> int:
        return max(self.config.num_draft_tokens, self.config.remaining_num_draft_tokens)

    def gate(self, depth, rows, beam_scores, forest):
        tau = self._log_tau.get(depth, -np.inf)
        if depth == 1:
            tau = max(tau, self._log_root)
        return beam_scores[:, 0] >= tau  # log c_{i,d}, the best path at this depth, against log tau_d

    def select(self, forest: DraftForest) -> np.ndarray:
        c = self.config
        B, S = forest.token.shape
        if S == 0 or B == 0:
            return np.zeros(0, np.int64)
        drafting = forest.stop_depth > 0
        gated = forest.gated if forest.gated is not None else forest.stop_depth < forest.max_depth
        truncated = drafting & gated
        cap = np.where(truncated, c.remaining_num_draft_tokens - 1, c.num_draft_tokens - 1)
        bound = c.budget.upper_bound(B)
        key = forest.score
        # Floor: every drafting request's best floor_tokens nodes (they lie within the first floor_tokens depths).
        if c.floor_tokens == 1 and forest.beam_slot is not None:  # a request's best node heads its depth-1 beam
            rows = np.flatnonzero(drafting & (cap > 0) & (forest.beam_score[:, 0, 0] > -np.inf))
            floor = (rows * S + forest.beam_slot[rows, 0, 0])[:bound]
        elif c.floor_tokens > 0:
            hi = int(forest.depth_offsets[min(c.floor_tokens, forest.max_depth)])
            sub = top_per_request(key[:, :hi], np.where(drafting, np.minimum(cap, c.floor_tokens), 0))
            floor = ((sub // hi) * S + sub % hi)[:bound]
        else:
            floor = np.zeros(0, np.int64)
        floor_n = np.bincount(floor // S, minlength=B)
        # Priority 1: confident requests extend (deepest, most likely paths first). Priority 2: truncated widen.
        ordered = c.budget.kind == "goodput"  # only the goodput budget reads the priority order
        room = bound - len(floor)
        p1 = self._tier(forest, drafting & ~truncated, cap, floor, floor_n, room, ordered)
        p2 = self._tier(forest, truncated, cap, floor, floor_n, room - len(p1), ordered)
        ranked = np.concatenate([floor, p1, p2])
        k = c.budget.choose(B, np.exp(key.ravel()[ranked]), self.step_time) if ordered else len(ranked)
        return np.sort(ranked[:max(k, len(floor))], kind="stable")  # merges sorted runs (floor, p1, p2) in O(n)

    @staticmethod
    def _tier(forest: DraftForest, members: np.ndarray, cap: np.ndarray, floor: np.ndarray, floor_n: np.ndarray,
              limit: int, ordered: bool) -> np.ndarray:
        """One priority tier: each member request's best nodes after its floor, up to its cap, the best `limit`
        across the tier. The floor holds each request's top floor_n nodes (a top-n set lies within its first n
        depths), so the tier is a band of each request's ranking (band_per_row) over a few candidates per
        request: its beam nodes when cap <= k, else all its slots while the rows are few."""
        rows = np.flatnonzero(members & (cap > floor_n))
        if limit <= 0 or len(rows) == 0:
            return np.zeros(0, np.int64)
        S = forest.num_slots
        n = int(cap[rows].max())
        if not ordered and forest.beam_slot is not None and n <= forest.k:
            D, k = forest.beam_slot.shape[1:]
            band = band_per_row(forest.beam_score[rows].reshape(-1, D * k), floor_n[rows], cap[rows], limit)
            if band is not None:
                r = rows[band // (D * k)]
                return np.sort(r * S + forest.beam_slot.reshape(-1, D * k)[r, band % (D * k)])
        elif not ordered and len(rows) * S <= 16384:  # a sort of each row's slots pays while the rows are few
            band = band_per_row(forest.score[rows], floor_n[rows], cap[rows], limit)
            if band is not None:
                return rows[band // S] * S + band % S
        room = np.zeros(len(cap), np.int64)
        room[rows] = cap[rows] - floor_n[rows]
        return ranked_with_caps(forest.score, room, limit, floor, ordered)


@register
class EchoDense(Echo):
    """Ablation: gate at every depth (thresholds from the nearest calibrated sweet spot)."""

    name = "echo_dense"
    gate_mode = "dense"


@register
class EchoFixed(Echo):
    """Ablation: gate at every depth with one threshold calibrated for all depths (module docstring)."""

    name = "echo_fixed"
    gate_mode = "fixed"
