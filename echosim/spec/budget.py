"""The step's verification budget K_max: a number, a number per request, or goodput-optimal from a step-time model.

A goodput-optimal budget picks, among the candidates in the policy's priority order, the prefix length K that
maximizes (B + expected accepted drafts) / step time(B + K verified tokens). Expected accepted drafts of a prefix is
the sum of its nodes' gains (calibrated path probabilities), so the marginal node is kept only while its gain pays
for the time it adds: under low load verification is nearly free and K grows; under high load it shrinks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# (verified tokens in the step including the roots [n], batch size) -> step time in ms [n]
StepTimeFn = Callable[[np.ndarray, int], np.ndarray]


def flat_then_linear(base_ms: float = 10.0, knee_tokens: float = 128.0) -> StepTimeFn:
    """The shape a step has on a GPU: flat while memory-bound, then linear in tokens once compute-bound. Used when
    no cost model is attached; backends attach a fitted one (cost_models)."""

    def step_ms(tokens: np.ndarray, batch_size: int) -> np.ndarray:
        return base_ms * np.maximum(1.0, np.asarray(tokens, dtype=np.float64) / knee_tokens)

    return step_ms


@dataclass
class Budget:
    """kind: 'per_request' (tokens per request x batch), 'fixed' (tokens per step), 'goodput' (tokens is an upper
    bound per request; the step-time model picks the total). Tokens count drafts, not roots."""

    kind: str = "per_request"
    tokens: int = 31

    def __post_init__(self) -> None:
        if self.kind not in ("per_request", "fixed", "goodput"):
            raise ValueError(f"budget kind must be per_request, fixed or goodput, not {self.kind!r}")
        if self.tokens < 0:
            raise ValueError("budget tokens must be >= 0")

    def upper_bound(self, batch_size: int) -> int:
        return self.tokens if self.kind == "fixed" else self.tokens * batch_size

    def choose(self, batch_size: int, gains: np.ndarray, step_time: StepTimeFn | None) -> int:
        """How many of the candidates (gains in priority order) to verify."""
        bound = min(self.upper_bound(batch_size), len(gains))
        if self.kind != "goodput" or bound == 0:
            return bound
        step_time = step_time or flat_then_linear()
        k = np.arange(bound + 1)
        accepted = batch_size + np.concatenate(([0.0], np.cumsum(gains[:bound])))  # np.r_ costs ~10 us a call
        goodput = accepted / step_time(batch_size + k, batch_size)
        return int(np.argmax(goodput))

    def to_json(self) -> dict:
        return {"kind": self.kind, "tokens": self.tokens}

    @classmethod
    def from_json(cls, d: dict) -> Budget:
        if not isinstance(d, dict):
            raise ValueError(f'a budget is a JSON object like {{"kind": "goodput", "tokens": 31}}, got {d!r}')
        tokens = d.get("tokens", 31)
        if type(tokens) is float and tokens.is_integer():
            tokens = int(tokens)
        if type(tokens) is not int:
            raise ValueError(f"budget tokens must be an integer, got {tokens!r}")
        return cls(kind=str(d.get("kind", "per_request")), tokens=tokens)
