"""A seeded random drafter: draft distributions from a Dirichlet per node. Deterministic given (seed, request,
path), so tests and benchmarks can build realistic forests without a model."""

from __future__ import annotations

import numpy as np

from echosim.spec.forest import DraftForest


class RandomDrafter:
    def __init__(self, vocab_size: int = 1000, concentration: float = 0.3, seed: int = 0):
        self.vocab_size = vocab_size
        self.concentration = concentration
        self.rng = np.random.default_rng(seed)

    def expand(self, forest: DraftForest, depth: int, rows: np.ndarray, parents: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        F = len(rows)
        k = min(k, self.vocab_size)
        # Top-k of a peaked distribution: sorted Dirichlet mass, the rest of the vocabulary holds the remainder.
        probs = self.rng.dirichlet(np.full(k + 1, self.concentration), size=F)[:, :k]
        probs = -np.sort(-probs, axis=1)
        # distinct tokens per row: a random offset plus the rank
        offset = self.rng.integers(0, self.vocab_size, size=(F, 1))
        tokens = (offset + np.arange(k)) % self.vocab_size
        with np.errstate(divide="ignore"):
            return tokens.astype(np.int64), np.log(probs).astype(np.float32)
