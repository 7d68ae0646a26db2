"""The draft forest of one speculative step: every candidate of every request, as flat NumPy arrays.

Layout. Each request owns the same run of S candidate *slots*, in SGLang's order: depth 1 holds the root's
`k1` children; each deeper depth holds `k * k` slots (k children for each of the k beam nodes of the depth above).
A node's flat index is `req * S + slot`, so per-request work is a reshape to [B, S] and batch-wide work is a ravel.
Slots that a request never drafted (it stopped early, or the whole step is shallower) are invalid (`valid` False,
score -inf). Parents always sit in an earlier slot of the same request; the root (the last committed token, not
stored as a node) is parent -1 at depth 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# A draft probability of 0 becomes this log-prob, so every score stays finite and orderable.
MIN_LOGP = -1.0e4
# ...and a probability of 1 becomes this one, so a child's score is always strictly below its parent's: then any
# top-n set of nodes by score is ancestor-closed, with no tie-breaking pass on the hot path.
MAX_LOGP = -1.0e-7


class ForestError(ValueError):
    """A forest that breaks an invariant (child before parent, parent in another request, NaN, rising score)."""


@functools.lru_cache(maxsize=64)
def slot_layout(k1: int, k: int, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slot depth (1..D), sibling rank, and the start offset of each depth (length D+1). Cached: read-only."""
    widths = [k1] + [k * k] * max(depth - 1, 0) if depth > 0 else []
    offsets = np.zeros(len(widths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(widths)
    slot_depth = np.repeat(np.arange(1, len(widths) + 1, dtype=np.int32), widths)
    slot_rank = np.concatenate([np.arange(k1, dtype=np.int32)]
                               + [np.tile(np.arange(k, dtype=np.int32), k)] * max(depth - 1, 0)) \
        if widths else np.zeros(0, dtype=np.int32)
    for a in (slot_depth, slot_rank, offsets):
        a.flags.writeable = False
    return slot_depth, slot_rank, offsets


@dataclass
class DraftForest:
    """Candidates of one step. All [B, S] arrays; `flat_*` properties give the per-node flat view."""

    root_token: np.ndarray   # int64 [B]: last committed token of each request (the tree root)
    kv_len: np.ndarray       # int64 [B]: tokens already in the KV cache; the root sits at position kv_len
    token: np.ndarray        # int64 [B, S]
    logp: np.ndarray         # float32 [B, S]: draft log-prob of the token given its parent
    score: np.ndarray        # float64 [B, S]: cumulative log path score (sum of logp from the root)
    parent: np.ndarray       # int32 [B, S]: parent slot in the same request, -1 = root
    valid: np.ndarray        # bool [B, S]: slot was drafted
    slot_depth: np.ndarray   # int32 [S]
    slot_rank: np.ndarray    # int32 [S]: rank among siblings (0 = the parent's most likely child)
    depth_offsets: np.ndarray  # int64 [D+1]: slots of depth d are depth_offsets[d-1]:depth_offsets[d]
    k1: int = 0              # children drafted at the root
    k: int = 0               # children per beam node, and beam width, below the root
    stop_depth: np.ndarray | None = None  # int32 [B]: deepest drafted depth per request (0 = none)
    gated: np.ndarray | None = None       # bool [B]: a gate failed (at the last depth it stops nothing else)
    # The beam of every drafted depth, best first: slots int32 [B, D, k] (-1 none) and their scores float64 (-inf
    # none). Every node's parent is a beam node and a depth's n best (n <= k) are its beam's first n, so a
    # request's top n (n <= k) lie among its beam nodes: selection can rank D*k keys instead of S.
    beam_slot: np.ndarray | None = None
    beam_score: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return self.token.shape[0]

    @property
    def num_slots(self) -> int:
        return self.token.shape[1]

    @property
    def max_depth(self) -> int:
        return len(self.depth_offsets) - 1

    # Flat per-node view: request index, global parent index (-1 = root), depth, rank.
    @property
    def flat_req(self) -> np.ndarray:
        return np.repeat(np.arange(self.batch_size, dtype=np.int32), self.num_slots)

    @property
    def flat_parent(self) -> np.ndarray:
        base = (np.arange(self.batch_size, dtype=np.int64) * self.num_slots)[:, None]
        return np.where(self.parent >= 0, self.parent + base, -1).ravel()

    @property
    def flat_depth(self) -> np.ndarray:
        return np.broadcast_to(self.slot_depth, self.token.shape).ravel()

    @property
    def flat_rank(self) -> np.ndarray:
        return np.broadcast_to(self.slot_rank, self.token.shape).ravel()

    def num_valid(self) -> np.ndarray:
        """Drafted candidates per request, int64 [B]."""
        return self.valid.sum(axis=1)

    def path_prob(self) -> np.ndarray:
        """exp(score), 0 for invalid slots. float64 [B, S]."""
        return np.where(self.valid, np.exp(self.score), 0.0)

    def validate(self) -> None:
        """Raise ForestError if an invariant is broken. Vectorized; meant for tests and for drafters' outputs."""
        B, S = self.token.shape
        for name in ("logp", "score", "parent", "valid"):
            if getattr(self, name).shape != (B, S):
                raise ForestError(f"{name} has shape {getattr(self, name).shape}, expected {(B, S)}")
        if self.slot_depth.shape != (S,) or self.slot_rank.shape != (S,):
            raise ForestError("slot_depth/slot_rank must have one entry per slot")
        if self.root_token.shape != (B,) or self.kv_len.shape != (B,):
            raise ForestError("root_token and kv_len must have one entry per request")
        v = self.valid
        if np.isnan(self.score[v]).any() or np.isnan(self.logp[v]).any():
            raise ForestError("NaN score or log-prob in a drafted node")
        if (self.logp[v] > 0).any():
            raise ForestError("a draft log-prob is above 0")
        slots = np.broadcast_to(np.arange(S), (B, S))
        par = self.parent
        if ((par >= S) | (par < -1)).any():
            raise ForestError("parent slot out of range (a parent in another request)")
        child_before_parent = v & (par >= slots)
        if child_before_parent.any():
            b, s = np.argwhere(child_before_parent)[0]
            raise ForestError(f"request {b} slot {s}: child before its parent (parent slot {par[b, s]})")
        has_parent = v & (par >= 0)
        rows, cols = np.nonzero(has_parent)
        pslots = par[rows, cols]
        if not v[rows, pslots].all():
            raise ForestError("a drafted node's parent was never drafted")
        if (self.slot_depth[pslots] != self.slot_depth[cols] - 1).any():
            raise ForestError("a node's depth is not its parent's depth + 1")
        if (self.slot_depth[cols[...]] < 1).any():
            raise ForestError("drafted nodes must have depth >= 1")
        roots = v & (par < 0)
        if (self.slot_depth[np.nonzero(roots)[1]] != 1).any():
            raise ForestError("only depth-1 nodes may hang from the root")
        tol = 1e-4 * (1.0 + np.abs(self.score[rows, pslots]))
        if (self.score[rows, cols] > self.score[rows, pslots] + tol).any():
            raise ForestError("a child's path score is above its parent's")


def empty_forest(root_token: np.ndarray, kv_len: np.ndarray) -> DraftForest:
    """A forest with no candidates (autoregressive decoding, or a policy that drafts nothing)."""
    B = len(root_token)
    z = np.zeros((B, 0))
    return DraftForest(
        root_token=np.asarray(root_token, dtype=np.int64), kv_len=np.asarray(kv_len, dtype=np.int64),
        token=z.astype(np.int64), logp=z.astype(np.float32), score=z.astype(np.float64),
        parent=z.astype(np.int32), valid=z.astype(bool), slot_depth=np.zeros(0, np.int32),
        slot_rank=np.zeros(0, np.int32), depth_offsets=np.zeros(1, np.int64),
        stop_depth=np.zeros(B, np.int32), gated=np.zeros(B, bool))
