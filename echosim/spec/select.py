"""Selection primitives shared by the policies. A selection is a sorted array of flat node indices
(req * S + slot): request-major, slot ascending, which is also the order Flatten & Pack lays nodes out in.

Ancestor closure comes from the scores themselves: drafting keeps every draft log-prob strictly below 0
(forest.MAX_LOGP), so a child always ranks strictly below its parent and any top-n set is ancestor-closed.
"""

from __future__ import annotations

import numpy as np

from echosim.spec.forest import DraftForest


def priority_key(forest: DraftForest, bonus: np.ndarray | None = None) -> np.ndarray:
    """float64 [B, S]: path score (strictly decreasing along every path, -inf for undrafted slots), plus a
    per-request `bonus` [B] (ECHO's priority tiers). Without a bonus this is the forest's own array: don't mutate."""
    return forest.score if bonus is None else forest.score + bonus[:, None]


def eligible_slots(forest: DraftForest, n: int) -> np.ndarray | None:
    """Slots that can be in some request's top n: a node ranks below its d-1 ancestors and its elder siblings,
    so it needs depth - 1 + sibling rank < n. None when every slot can."""
    ok = forest.slot_depth - 1 + forest.slot_rank < n
    return None if ok.all() else np.flatnonzero(ok)


def top_per_request(key: np.ndarray, n: int | np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """The n_i best nodes of each request i (fewer if it has fewer candidates), as sorted flat indices.
    `columns`: only these slots can qualify (see eligible_slots)."""
    if columns is not None:
        full_S = key.shape[1]
        flat = top_per_request(key[:, columns], n)
        return (flat // len(columns)) * full_S + columns[flat % len(columns)]
    B, S = key.shape
    n = np.minimum(np.broadcast_to(np.asarray(n, dtype=np.int64), (B,)), S)
    m = int(n.max(initial=0))
    if m <= 0 or B == 0:
        return np.zeros(0, np.int64)
    if m < S:
        part = np.argpartition(key, S - m, axis=1)[:, S - m:]
        vals = np.take_along_axis(key, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        part = np.take_along_axis(part, order, axis=1)
        vals = np.take_along_axis(vals, order, axis=1)
    else:
        part = np.broadcast_to(np.arange(S), (B, S))
        vals = key
    keep = (np.arange(part.shape[1])[None, :] < n[:, None]) & np.isfinite(vals)
    flat = (np.arange(B, dtype=np.int64)[:, None] * S + part)[keep]
    flat.sort()
    return flat


def _rank_in_request(req: np.ndarray) -> np.ndarray:
    """For a sequence of request ids, how many earlier entries share each entry's request (0, 1, 2 ...)."""
    order = np.argsort(req, kind="stable")
    sorted_req = req[order]
    starts = np.r_[0, np.nonzero(sorted_req[1:] != sorted_req[:-1])[0] + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(req)]))
    ranks = np.empty(len(req), np.int64)
    ranks[order] = np.arange(len(req)) - run_start
    return ranks


def ranked_with_caps(key: np.ndarray, cap: np.ndarray, limit: int) -> np.ndarray:
    """The best nodes across the batch in priority order (descending key), skipping a request's nodes once it holds
    cap[i] of them, at most `limit` nodes. Flat indices, in priority order (not sorted)."""
    B, S = key.shape
    flat_key = key.ravel()
    finite = int(np.isfinite(flat_key).sum()) if B * S else 0
    limit = min(int(limit), int(np.minimum(cap, S).sum()), finite)
    if limit <= 0:
        return np.zeros(0, np.int64)
    take = min(finite, 2 * limit + B)
    while True:
        n = flat_key.size
        idx = np.argpartition(flat_key, n - take)[n - take:] if take < n else np.arange(n)
        idx = idx[np.argsort(-flat_key[idx], kind="stable")]
        idx = idx[np.isfinite(flat_key[idx])]
        req = idx // S
        ok = _rank_in_request(req) < cap[req]
        chosen = idx[ok]
        if len(chosen) >= limit or take >= finite:
            return chosen[:limit]
        take = min(finite, take * 2)
