"""Drafting, depth by depth, through one drafter interface (synthetic in the simulator, a real model in the engine).

EAGLE-2 expansion rule: the root gets k1 children; at every deeper depth each of the k beam nodes gets k children,
the next beam is the top-k of those k*k by cumulative score, and all k*k stay candidates. After each depth the
policy may gate: it says which requests keep drafting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from echosim.spec.forest import MAX_LOGP, MIN_LOGP, DraftForest, empty_forest, slot_layout

if TYPE_CHECKING:
    from echosim.spec.policies.base import Policy


class Drafter(Protocol):
    def expand(self, forest: DraftForest, depth: int, rows: np.ndarray, parents: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        """Children of the frontier nodes `(rows[i], parents[i])` (request index, parent slot; -1 = root), which
        will sit at `depth`. Returns (token int64 [F, k], logp [F, k]), each row sorted by logp, descending.
        `forest` holds everything drafted so far (tokens of shallower depths, kv_len, root_token)."""
        ...


def depth_widths(depth: int, k1: int, k: int) -> list[float]:
    """Draft-model rows per drafting request at each depth: the root at depth 1, its beam below (min(k, k1) nodes
    feed depth 2, k nodes every deeper depth)."""
    return ([1.0, float(min(k, k1))] + [float(k)] * max(depth - 2, 0))[:depth]


def draft_rows(stop_depth: np.ndarray, widths: list[float]) -> tuple:
    """Rows the draft model runs per depth, the batch together, from each request's deepest drafted depth."""
    depth = len(widths)
    if depth == 0:
        return ()
    counts = np.bincount(stop_depth, minlength=depth + 1).tolist()
    out, alive = [], 0
    for d in range(depth, 0, -1):  # requests that drafted depth d or deeper
        alive += counts[d]
        out.append(alive * widths[d - 1])
    return tuple(out[::-1])


def _top_k_rows(block: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest entries of each row, largest first. [n, w] -> [n, min(k, w)]."""
    w = block.shape[1]
    k = min(k, w)
    top = np.argpartition(block, w - k, axis=1)[:, w - k:] if k < w else np.broadcast_to(np.arange(w), block.shape)
    vals = np.take_along_axis(block, top, axis=1)
    return np.take_along_axis(top, np.argsort(-vals, axis=1, kind="stable"), axis=1)


def draft(drafter: Drafter, policy: Policy, root_token: np.ndarray, kv_len: np.ndarray) -> DraftForest:
    """Run one step's drafting for a batch under `policy`. Returns the forest of all candidates."""
    root_token = np.asarray(root_token, dtype=np.int64)
    kv_len = np.asarray(kv_len, dtype=np.int64)
    B = len(root_token)
    plan = policy.plan(B)
    if plan.depth == 0 or B == 0:
        return empty_forest(root_token, kv_len)
    k1, k, D = plan.k1, plan.k, plan.depth
    slot_depth, slot_rank, off = slot_layout(k1, k, D)
    S = int(off[-1])
    forest = DraftForest(
        root_token=root_token, kv_len=kv_len,
        token=np.zeros((B, S), np.int64), logp=np.full((B, S), MIN_LOGP, np.float32),
        score=np.full((B, S), -np.inf, np.float64), parent=np.full((B, S), -1, np.int32),
        valid=np.zeros((B, S), bool), slot_depth=slot_depth, slot_rank=slot_rank, depth_offsets=off,
        k1=k1, k=k, stop_depth=np.zeros(B, np.int32), gated=np.zeros(B, bool),
        beam_slot=np.full((B, D, k), -1, np.int32), beam_score=np.full((B, D, k), -np.inf))

    rows = np.nonzero(policy.start(B))[0]
    if len(rows) == 0:
        return forest
    tok, lp = drafter.expand(forest, 1, rows, np.full(len(rows), -1, np.int32), k1)
    lp = np.clip(np.asarray(lp, np.float64), MIN_LOGP, MAX_LOGP)
    # While every request drafts, index rows with a slice: fancy row indexing copies.
    at = slice(None) if len(rows) == B else rows
    cols = slice(0, k1)
    forest.token[at, cols] = tok
    forest.logp[at, cols] = lp
    forest.score[at, cols] = lp
    forest.valid[at, cols] = True
    forest.stop_depth[at] = 1
    beam = _top_k_rows(lp, k)  # slots of the depth-1 beam
    beam_scores = np.take_along_axis(lp, beam, axis=1)
    forest.beam_slot[at, 0, :beam.shape[1]] = beam
    forest.beam_score[at, 0, :beam.shape[1]] = beam_scores

    last = D + 1 if policy.gates_last_depth else D  # a gate after the last depth only marks requests
    for d in range(2, last + 1):
        keep = np.asarray(policy.gate(d - 1, rows, beam_scores, forest), dtype=bool)
        if not keep.all():
            forest.gated[rows[~keep]] = True
            rows, beam, beam_scores = rows[keep], beam[keep], beam_scores[keep]
        if len(rows) == 0 or d > D:
            break
        n, kb = beam.shape
        at = slice(None) if n == B else rows
        parents = beam.ravel().astype(np.int32)
        tok, lp = drafter.expand(forest, d, np.repeat(rows, kb), parents, k)
        lp = np.clip(np.asarray(lp, np.float64), MIN_LOGP, MAX_LOGP).reshape(n, kb * k)
        lo = int(off[d - 1])
        cols = slice(lo, lo + kb * k)
        score = (beam_scores[:, :, None] + lp.reshape(n, kb, k)).reshape(n, kb * k)
        forest.token[at, cols] = np.asarray(tok).reshape(n, kb * k)
        forest.logp[at, cols] = lp
        forest.score[at, cols] = score
        forest.parent[at, cols] = np.repeat(beam, k, axis=1)
        forest.valid[at, cols] = True
        forest.stop_depth[at] = d
        top = _top_k_rows(score, k)
        beam, beam_scores = lo + top, np.take_along_axis(score, top, axis=1)
        forest.beam_slot[at, d - 1] = beam
        forest.beam_score[at, d - 1] = beam_scores
    return forest
