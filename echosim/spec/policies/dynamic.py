"""Dynamic baselines: DDD (stop on low beam confidence), OPT-Tree (grow while expected acceptance grows),
TETRIS (batch-wide top-C), SmartSpec (one goodput-optimal chain length for the batch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from echosim.spec.budget import Budget, flat_then_linear
from echosim.spec.forest import DraftForest
from echosim.spec.policies.base import ConfigError, DraftPlan, Policy, register
from echosim.spec.policies.static import max_tree_nodes
from echosim.spec.select import eligible_slots, priority_key, ranked_with_caps, top_per_request


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=1, initial=-np.inf)
    safe = np.where(np.isfinite(m), m, 0.0)
    return safe + np.log(np.sum(np.exp(x - safe[:, None]), axis=1))


@dataclass
class DDDConfig:
    steps: int = 8
    topk: int = 8
    num_draft_tokens: int = 64
    theta: float = -2.0                    # stop when log(sum of beam path probabilities) < theta
    check_depths: tuple[int, ...] = (2, 4, 6)


@register
class DDD(Policy):
    """Dynamic depth decoding: at the check depths, stop drafting a request whose beam has lost its mass."""

    name = "ddd"
    config_cls = DDDConfig

    def check(self) -> None:
        c = self.config
        if c.steps < 1 or c.topk < 1 or not 2 <= c.num_draft_tokens <= max_tree_nodes(c.steps, c.topk) + 1:
            raise ConfigError("ddd needs steps, topk >= 1 and 2 <= num_draft_tokens <= 1 + tree size")

    def plan(self, batch_size: int) -> DraftPlan:
        return DraftPlan(self.config.steps, self.config.topk, self.config.topk)

    def gate(self, depth, rows, beam_scores, forest):
        if depth not in self.config.check_depths:
            return np.ones(len(rows), dtype=bool)
        return _logsumexp_rows(beam_scores) >= self.config.theta

    def max_tree_tokens(self) -> int:
        return self.config.num_draft_tokens

    def select(self, forest: DraftForest) -> np.ndarray:
        n = self.config.num_draft_tokens - 1
        return top_per_request(priority_key(forest), n, eligible_slots(forest, n))


@dataclass
class OptTreeConfig:
    num_nodes: int = 48   # draft tokens of the tree per request
    topk: int = 8
    max_depth: int = 10
    delta: float = 0.1    # add a layer only while the best tree's expected acceptance grows by more


@register
class OptTree(Policy):
    """OPT-Tree: keep adding layers while E[accepted] of the best num_nodes-node tree grows by more than delta.
    E[accepted] of a node set is the sum of its path probabilities; the best n-node tree is the top n."""

    name = "opt_tree"
    config_cls = OptTreeConfig

    def check(self) -> None:
        c = self.config
        if c.max_depth < 1 or c.topk < 1 or c.num_nodes < 1:
            raise ConfigError("opt_tree needs max_depth, topk and num_nodes >= 1")

    def plan(self, batch_size: int) -> DraftPlan:
        return DraftPlan(self.config.max_depth, self.config.topk, self.config.topk)

    def start(self, batch_size: int) -> np.ndarray:
        # Per request: the path probabilities of its best num_nodes nodes so far, and their sum.
        self._best = np.zeros((batch_size, self.config.num_nodes))
        self._expect = np.zeros(batch_size)
        return np.ones(batch_size, dtype=bool)

    def gate(self, depth, rows, beam_scores, forest):
        n = self.config.num_nodes
        if n <= beam_scores.shape[1]:  # the depth's n best are the first n of its (sorted) beam
            new = np.exp(beam_scores[:, :n])
        else:
            lo, hi = forest.depth_offsets[depth - 1], forest.depth_offsets[depth]
            new = np.exp(forest.score[rows, lo:hi])  # undrafted slots are -inf: exp gives 0
        both = np.concatenate([self._best[rows], new], axis=1)
        best = -np.partition(-both, n - 1, axis=1)[:, :n] if both.shape[1] > n else both
        expect = best.sum(axis=1)
        grow = expect - self._expect[rows]
        self._best[rows], self._expect[rows] = best, expect
        return grow > self.config.delta

    def max_tree_tokens(self) -> int:
        return 1 + self.config.num_nodes

    def select(self, forest: DraftForest) -> np.ndarray:
        n = self.config.num_nodes
        return top_per_request(priority_key(forest), n, eligible_slots(forest, n))


@dataclass
class TetrisConfig:
    steps: int = 5
    topk: int = 8
    budget: Budget = field(default_factory=lambda: Budget("per_request", 8))


@register
class Tetris(Policy):
    """TETRIS: the batch's top-C candidates by cumulative log-prob, wherever they are."""

    name = "tetris"
    config_cls = TetrisConfig

    def check(self) -> None:
        if self.config.steps < 1 or self.config.topk < 1:
            raise ConfigError("tetris needs steps >= 1 and topk >= 1")

    def plan(self, batch_size: int) -> DraftPlan:
        return DraftPlan(self.config.steps, self.config.topk, self.config.topk)

    def select(self, forest: DraftForest) -> np.ndarray:
        B, S = forest.token.shape
        key = priority_key(forest)
        ordered = self.config.budget.kind == "goodput"
        ranked = ranked_with_caps(key, np.full(B, S), self.config.budget.upper_bound(B), ordered=ordered)
        k = self.config.budget.choose(B, np.exp(key.ravel()[ranked]), self.step_time) if ordered else len(ranked)
        return np.sort(ranked[:k])


@dataclass
class SmartSpecConfig:
    max_k: int = 8              # longest chain considered
    ema: float = 0.9            # weight of the past in the acceptance-rate estimate
    initial_accept_rate: float = 0.7


@register
class SmartSpec(Policy):
    """SmartSpec-style: every request drafts one chain of the same length k; k maximizes predicted goodput
    B * E[tokens | k] / step_ms(B * (k + 1)), with E from an EMA of the per-token acceptance rate."""

    name = "smartspec"
    config_cls = SmartSpecConfig

    def check(self) -> None:
        c = self.config
        if c.max_k < 0 or not 0.0 <= c.ema < 1.0 or not 0.0 <= c.initial_accept_rate <= 1.0:
            raise ConfigError("smartspec needs max_k >= 0, 0 <= ema < 1, 0 <= initial_accept_rate <= 1")
        self.accept_rate = c.initial_accept_rate

    def best_k(self, batch_size: int) -> int:
        if batch_size == 0:
            return 0
        a = min(self.accept_rate, 0.999999)
        k = np.arange(self.config.max_k + 1)
        expected_tokens = (1.0 - a ** (k + 1)) / (1.0 - a)  # accepted drafts + the bonus token
        step = (self.step_time or flat_then_linear())(batch_size * (k + 1), batch_size)
        return int(np.argmax(batch_size * expected_tokens / step))

    def plan(self, batch_size: int) -> DraftPlan:
        k = self.best_k(batch_size)
        return DraftPlan(k, 1, 1) if k else DraftPlan(0, 0, 0)

    def select(self, forest: DraftForest) -> np.ndarray:
        return np.flatnonzero(forest.valid.ravel())

    def observe(self, forest, selection, accept_len, accepted=None):
        drafted = forest.valid.sum(axis=1)
        tries = accept_len + (accept_len < drafted)  # tokens checked until the first rejection
        if tries.sum() > 0:
            rate = accept_len.sum() / tries.sum()
            self.accept_rate = self.config.ema * self.accept_rate + (1 - self.config.ema) * rate

    def state(self) -> dict:
        return {"accept_rate": round(float(self.accept_rate), 4)}
