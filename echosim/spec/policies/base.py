"""The policy interface every speculation strategy implements, and the registry of CLI names.

A step under a policy: `plan` fixes depth and widths for this batch size; `start` says which requests draft at
all; `gate` runs after each drafted depth and says which requests keep drafting; `select` picks an ancestor-closed
node set per request under the step's budget; `observe` sees the verified result (for policies that adapt).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from echosim.spec.budget import StepTimeFn
from echosim.spec.errors import SpecError
from echosim.spec.forest import DraftForest


@dataclass(frozen=True)
class DraftPlan:
    depth: int  # deepest depth drafted (0 = no drafting)
    k1: int     # children of the root
    k: int      # children per beam node and beam width below the root


class ConfigError(SpecError):
    """An impossible policy configuration."""


class Policy(ABC):
    name: ClassVar[str]
    config_cls: ClassVar[type]

    needs_step_time: ClassVar[bool] = False  # an online step-cost fit that wants the backend's profile as prior

    def __init__(self, config: Any = None, step_time: StepTimeFn | None = None):
        self.config = config if config is not None else self.config_cls()
        self.step_time = step_time
        self.check()

    def check(self) -> None:
        """Raise ConfigError for an impossible config."""

    def bind(self, step_time: StepTimeFn | None) -> Policy:
        """Attach the backend's step-time model (goodput budgets, smartspec)."""
        self.step_time = step_time
        return self

    @abstractmethod
    def plan(self, batch_size: int) -> DraftPlan: ...

    def start(self, batch_size: int) -> np.ndarray:
        return np.ones(batch_size, dtype=bool)

    def max_plan(self, batch_size: int) -> DraftPlan:
        """The deepest, widest plan this policy may ever make at this batch size (for reserving KV room); an
        adaptive policy's plan() may be shallower from step to step."""
        return self.plan(batch_size)

    def set_batch(self, keys: np.ndarray) -> None:
        """Stable ids (int) of the requests about to step, in batch row order: for policies that keep
        per-request estimates across steps."""

    def max_tree_tokens(self) -> int | None:
        """The most tokens one request verifies in a step, the root included (a bound for reserving KV room);
        None when any drafted candidate may be picked."""
        return None

    # Also gate after the last drafted depth: nothing is left to stop, but forest.gated records who failed
    # (ECHO gives gated requests a smaller budget even when the gate sits at the last depth).
    gates_last_depth = False

    def gate(self, depth: int, rows: np.ndarray, beam_scores: np.ndarray, forest: DraftForest) -> np.ndarray:
        """After drafting `depth`: which of the drafting requests `rows` continue. beam_scores [n, k]: the
        cumulative log scores of each row's beam at that depth, best first."""
        return np.ones(len(rows), dtype=bool)

    @abstractmethod
    def select(self, forest: DraftForest) -> np.ndarray:
        """Sorted flat node indices (req * S + slot) to verify."""

    def observe(self, forest: DraftForest, selection: np.ndarray, accept_len: np.ndarray,
                accepted: np.ndarray | None = None) -> None:
        """accept_len [B]: drafts accepted per request this step (the bonus token not counted); accepted: the
        flat node indices of the accepted drafts, when the backend has them."""

    def observe_step(self, batch_size: int, verify_tokens: int, verify_ms: float, draft_depths: int = 0,
                     draft_rows: float = 0.0, draft_ms: float = 0.0, other_ms: float | None = None) -> None:
        """A finished step's measured (engine) or priced (simulator) times, for policies that fit a step-time
        model online (see echosim/spec/adaptive.py for the arguments)."""

    def state(self) -> dict:
        """Live settings and estimates, for /server_info (adaptive policies report their budget's state)."""
        return {}

    def describe(self) -> dict:
        return {"policy": self.name, **config_to_json(self.config)}


def config_to_json(config: Any) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = v.to_json() if hasattr(v, "to_json") else (list(map(list, v)) if f.name == "gates" else v)
    return out


POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls
