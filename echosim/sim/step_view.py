"""One speculative step of a batch, laid open: which candidates each request drafted, which the policy selected
under its budget (depth against width, and across requests), and how many the target accepted.

It runs exactly what a simulated decode iteration runs (echosim.sim.speculation: the synthetic drafter of the
acceptance model, the policy's draft -> gate -> select, Flatten & Pack, greedy verification) on one batch, and
keeps the per-node picture that the simulator reduces to counts. The dashboard draws it (echosim.plots)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echosim.sim.config import ClusterConfig, build_cost_model
from echosim.sim.pricing import StepPricer
from echosim.sim.simulator import budget_step_time, load_acceptance, make_policy


@dataclass
class StepView:
    policy: dict                  # the resolved policy config
    batch_size: int
    max_depth: int                # deepest depth the plan drafts
    drafted: np.ndarray           # int [B, D]: candidates drafted per request and depth
    selected: np.ndarray          # int [B, D]: of them, verified (the policy's selection)
    accepted: np.ndarray          # int [B]: drafts the target accepted (the bonus token not counted)
    gated: np.ndarray             # bool [B]: the request's drafting was stopped by a gate
    stop_depth: np.ndarray        # int [B]: deepest depth drafted
    difficulty: np.ndarray        # float [B]: the request's latent difficulty (higher: harder to predict)

    @property
    def verified(self) -> np.ndarray:
        """Tokens verified per request, the root included."""
        return self.selected.sum(axis=1) + 1

    @property
    def depth_tokens(self) -> np.ndarray:
        """Per request: the selected tokens that extend its tree's depth (one per depth reached)."""
        return (self.selected > 0).sum(axis=1)

    @property
    def width_tokens(self) -> np.ndarray:
        """Per request: the selected tokens beyond one per depth (siblings: width)."""
        return self.selected.sum(axis=1) - self.depth_tokens

    def summary(self) -> dict:
        v = self.verified
        return {"batch_size": self.batch_size, "verified_tokens": int(v.sum()),
                "depth_tokens": int(self.depth_tokens.sum()), "width_tokens": int(self.width_tokens.sum()),
                "accepted_drafts": int(self.accepted.sum()), "mat": round(float((self.accepted + 1).mean()), 4),
                "waste": round(1.0 - float(self.accepted.sum()) / int(self.selected.sum()), 4)
                if self.selected.sum() else 0.0,
                "gated_requests": int(self.gated.sum())}


def one_step(policy_cfg: dict, batch_size: int, cluster: ClusterConfig | None = None,
             acceptance: str | None = None, seed: int = 0, kv_len: int = 512) -> StepView:
    """One step of `batch_size` requests (difficulties drawn from the acceptance model) at `kv_len` cached
    tokens each, priced by the cluster's step-time model for policies whose budget depends on it."""
    from echosim.spec.drafting import draft
    from echosim.spec.pack import pack
    from echosim.spec.verify import verify_greedy

    cluster = cluster or ClusterConfig()
    acc = load_acceptance(acceptance or cluster.model)
    pricer = StepPricer(build_cost_model(cluster), cluster.overhead_per_token_ms, cluster.overhead_per_draft_row_ms,
                        cluster.overhead_per_request_ms)
    policy = make_policy(policy_cfg, budget_step_time(pricer, [None]))
    rng = np.random.default_rng([seed, 4])
    B = int(batch_size)
    ds = np.full(B, acc.dataset_index("default"), np.int64)
    difficulty = np.asarray(acc.sample_difficulty(B, ds, rng), dtype=np.float64)
    drafter = acc.drafter(seed)
    drafter.set_batch(difficulty, ds)
    forest = draft(drafter, policy, np.zeros(B, np.int64), np.full(B, kv_len, np.int64))
    selection = np.asarray(policy.select(forest), dtype=np.int64)
    batch = pack(forest, selection, check=False)
    result = verify_greedy(batch, drafter.target_argmax(batch))
    D = int(forest.slot_depth.max()) if forest.slot_depth.size else 0
    drafted = np.zeros((B, max(D, 1)), np.int64)
    selected = np.zeros((B, max(D, 1)), np.int64)
    if D:
        depth_of = forest.slot_depth - 1
        for d in range(D):
            drafted[:, d] = forest.valid[:, depth_of == d].sum(axis=1)
        S = forest.valid.shape[1]
        req, slot = selection // S, selection % S
        np.add.at(selected, (req, depth_of[slot]), 1)
    stop = forest.stop_depth if forest.stop_depth is not None else np.zeros(B, np.int32)
    gated = forest.gated if getattr(forest, "gated", None) is not None else np.zeros(B, bool)
    return StepView(policy=policy.describe(), batch_size=B, max_depth=D, drafted=drafted, selected=selected,
                    accepted=np.asarray(result.accept_len, np.int64), gated=np.asarray(gated, bool),
                    stop_depth=np.asarray(stop, np.int64), difficulty=difficulty)
