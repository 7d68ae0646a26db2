"""Autoregressive decoding and the static EAGLE trees: fixed shape whatever the load."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echosim.spec.forest import DraftForest
from echosim.spec.policies.base import ConfigError, DraftPlan, Policy, register
from echosim.spec.select import eligible_slots, priority_key, top_per_request


def max_tree_nodes(steps: int, topk: int) -> int:
    """Candidates one request can have: topk at depth 1, topk*topk at each deeper depth."""
    return topk + max(steps - 1, 0) * topk * topk if steps > 0 else 0


@dataclass
class ARConfig:
    pass


@register
class AR(Policy):
    """Plain decoding: verify only the root (the last token), MAT 1.00."""

    name = "ar"
    config_cls = ARConfig

    def plan(self, batch_size: int) -> DraftPlan:
        return DraftPlan(0, 0, 0)

    def select(self, forest: DraftForest) -> np.ndarray:
        return np.zeros(0, np.int64)


@dataclass
class Eagle3Config:
    steps: int = 5              # draft depth
    topk: int = 8               # children per node and beam width
    num_draft_tokens: int = 32  # verified tokens per request, the root included (SGLang's convention)


@register
class Eagle3(Policy):
    """SGLang's EAGLE-3 tree: per request, the top N-1 candidates by cumulative score, every request the same."""

    name = "eagle3"
    config_cls = Eagle3Config

    def check(self) -> None:
        c = self.config
        if c.steps < 1 or c.topk < 1:
            raise ConfigError(f"eagle3 needs steps >= 1 and topk >= 1 (got steps={c.steps}, topk={c.topk})")
        cap = max_tree_nodes(c.steps, c.topk) + 1
        if not 2 <= c.num_draft_tokens <= cap:
            raise ConfigError(f"eagle3 num_draft_tokens={c.num_draft_tokens} must be in 2..{cap} "
                              f"(1 + topk + (steps-1)*topk^2 for steps={c.steps}, topk={c.topk})")

    def plan(self, batch_size: int) -> DraftPlan:
        return DraftPlan(self.config.steps, self.config.topk, self.config.topk)

    def max_tree_tokens(self) -> int:
        return self.config.num_draft_tokens

    def select(self, forest: DraftForest) -> np.ndarray:
        n = self.config.num_draft_tokens - 1
        return top_per_request(priority_key(forest), n, eligible_slots(forest, n))


@dataclass
class Eagle2Config:
    total_tokens: int = 59  # draft tokens per request (the root excluded, as EAGLE-2 counts them)
    depth: int = 5
    top_k: int = 10


@register
class Eagle2(Policy):
    """EAGLE-2 dynamic trees: expand the top_k beam by context-aware score, then rerank every candidate and keep
    the best total_tokens of each request."""

    name = "eagle2"
    config_cls = Eagle2Config

    def check(self) -> None:
        c = self.config
        if c.depth < 1 or c.top_k < 1 or c.total_tokens < 1:
            raise ConfigError("eagle2 needs depth, top_k and total_tokens >= 1")
        if c.total_tokens > max_tree_nodes(c.depth, c.top_k):
            raise ConfigError(f"eagle2 total_tokens={c.total_tokens} exceeds the {max_tree_nodes(c.depth, c.top_k)} "
                              f"candidates of depth={c.depth}, top_k={c.top_k}")

    def plan(self, batch_size: int) -> DraftPlan:
        return DraftPlan(self.config.depth, self.config.top_k, self.config.top_k)

    def max_tree_tokens(self) -> int:
        return 1 + self.config.total_tokens

    def select(self, forest: DraftForest) -> np.ndarray:
        n = self.config.total_tokens
        return top_per_request(priority_key(forest), n, eligible_slots(forest, n))
