"""Drafters and forests for the scheduler-core tests."""

from __future__ import annotations

import numpy as np

from echosim.spec.forest import DraftForest


class ConstDrafter:
    """Every child has draft probability `prob` (0 and 1 included); tokens distinct per parent."""

    def __init__(self, prob: float, vocab: int = 50):
        self.prob, self.vocab = prob, vocab

    def expand(self, forest: DraftForest, depth, rows, parents, k):
        tokens = (np.arange(k)[None, :] + 7 * np.asarray(parents)[:, None] + depth) % self.vocab
        with np.errstate(divide="ignore"):
            lp = np.full((len(rows), k), np.log(self.prob))
        return tokens.astype(np.int64), lp


def ancestors_closed(forest: DraftForest, selection: np.ndarray) -> bool:
    S = forest.num_slots
    chosen = set(selection.tolist())
    for flat in selection:
        p = forest.parent.ravel()[flat]
        if p >= 0 and (flat // S) * S + p not in chosen:
            return False
    return True


class MixedDrafter:
    """Even requests are confident (top child prob `hi`), odd ones not (`lo`); siblings decay by 0.9."""

    def __init__(self, hi: float = 0.9, lo: float = 0.2):
        self.hi, self.lo = hi, lo

    def expand(self, forest, depth, rows, parents, k):
        prob = np.where(np.asarray(rows) % 2 == 0, self.hi, self.lo)[:, None] * (0.9 ** np.arange(k))[None, :]
        tokens = np.arange(k)[None, :] + np.zeros((len(rows), 1), np.int64)
        return tokens, np.log(prob)
