"""Selection primitives shared by the policies. A selection is a sorted array of flat node indices
(req * S + slot): request-major, slot ascending, which is also the order Flatten & Pack lays nodes out in.

Ancestor closure comes from the scores themselves: drafting keeps every draft log-prob strictly below 0
(forest.MAX_LOGP), so a child always ranks strictly below its parent and any top-n set is ancestor-closed.
"""

from __future__ import annotations

import math

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
    if m == 1:  # one node each (ECHO's floor): a row-wise argmax
        best = key.argmax(axis=1)
        rows = np.flatnonzero((n > 0) & (key[np.arange(B), best] > -np.inf))
        return rows * S + best[rows]
    if m < S:
        part = np.argpartition(key, S - m, axis=1)[:, S - m:]
        vals = np.take_along_axis(key, part, axis=1)
    else:
        part = np.broadcast_to(np.arange(S), (B, S))
        vals = key
    keep = vals > -np.inf
    if int(n.min()) < m:  # requests want different counts: rank each row's m best, keep the first n_i
        order = np.argsort(-vals, axis=1)
        part = np.take_along_axis(part, order, axis=1)
        keep = np.take_along_axis(keep, order, axis=1) & (np.arange(m)[None, :] < n[:, None])
    flat = (np.arange(B, dtype=np.int64)[:, None] * S + part)[keep]
    flat.sort()
    return flat


def _threshold(flat_key: np.ndarray, S: int, room: np.ndarray, want: int) -> float:
    """A key threshold above which about `want` candidates of the requests with room lie, from a strided sample."""
    n = flat_key.size
    stride = max(1, n // 4096)
    while math.gcd(stride, S) != 1:  # a stride sharing a factor with S samples only some slots (some ranks)
        stride += 1
    at = np.arange(0, n, stride)
    at = at[room[at // S] > 0]
    sample = flat_key[at]
    population = len(sample)
    sample = sample[sample > -np.inf]  # undrafted slots: many equal keys slow np.partition down a lot
    m = len(sample)
    q = int(np.ceil(1.3 * want * population / max(int((room > 0).sum()) * S, 1))) + 8
    if m == 0 or q >= m:
        return -np.inf
    return float(np.partition(sample, m - q)[m - q])


def _best(flat_key: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """The n entries of idx with the largest keys (any order)."""
    if len(idx) <= n:
        return idx
    return idx[np.argpartition(flat_key[idx], len(idx) - n)[len(idx) - n:]]


def _best_per_request(flat_key: np.ndarray, idx: np.ndarray, S: int, room: np.ndarray) -> np.ndarray:
    """Of the candidates idx, each request's room[req] best (a small set: the requests that hit their cap)."""
    req = idx // S
    order = np.lexsort((-flat_key[idx], req))
    idx, req = idx[order], req[order]
    starts = np.r_[0, np.flatnonzero(req[1:] != req[:-1]) + 1]
    rank = np.arange(len(idx)) - np.repeat(starts, np.diff(np.r_[starts, len(idx)]))
    return idx[rank < room[req]]


def ranked_with_caps(key: np.ndarray, room: np.ndarray, limit: int, taken: np.ndarray | None = None,
                     ordered: bool = True) -> np.ndarray:
    """The best nodes across the batch by descending key, at most `limit`, at most room[i] from request i (0: it
    takes no part), never a node in `taken` (flat indices chosen elsewhere, e.g. a floor). Flat indices, in
    priority order if `ordered`, else in any order. Cost: one pass over the keys, then work on about `limit`
    candidates: requests that hit their cap are settled with their best room[i], and the rest re-ranked."""
    B, S = key.shape
    room = np.minimum(np.asarray(room, np.int64), S)
    capacity = int(room.sum())
    limit = min(int(limit), capacity)
    if limit <= 0:
        return np.zeros(0, np.int64)
    taken = np.zeros(0, np.int64) if taken is None else np.asarray(taken, np.int64)
    active = np.flatnonzero(room > 0)
    if len(active) <= B // 2:  # most requests take no part (e.g. few confident ones): rank only the others' rows
        where = np.full(B, -1, np.int64)
        where[active] = np.arange(len(active))
        t_row = where[taken // S]
        t_local = t_row[t_row >= 0] * S + taken[t_row >= 0] % S
        sub = ranked_with_caps(key[active], room[active], limit, t_local, ordered)
        return active[sub // S] * S + sub % S
    flat_key = key.ravel()
    if len(taken):
        is_taken = np.zeros(flat_key.size, bool)
        is_taken[taken] = True
    if limit == capacity or (2 * limit >= capacity and len(active) * S <= 32768):
        # (nearly) everyone fills its room: a request's chosen nodes are always its best ones, so take each
        # request's room[i] best (a row-wise partition of few rows) and keep the best `limit` of those
        idx = active
        extra = np.bincount(taken // S, minlength=B)[idx] if len(taken) else 0
        sub = top_per_request(key[idx], room[idx] + extra)  # room[i] best once the taken ones are left out
        top = idx[sub // S] * S + sub % S
        if len(taken):
            top = top[~is_taken[top]]
            if (np.bincount(top // S, minlength=B) > room).any():  # some taken nodes were not among the best
                top = _best_per_request(flat_key, top, S, room)
        top = _best(flat_key, top, limit)
        return top[np.argsort(-flat_key[top])] if ordered else top
    want = limit + len(taken) + B
    while True:
        t = _threshold(flat_key, S, room, want)
        exhaustive = t == -np.inf
        cand = np.flatnonzero(flat_key >= t) if not exhaustive else np.flatnonzero(flat_key > -np.inf)
        cand = cand[room[cand // S] > 0]
        if len(taken):
            cand = cand[~is_taken[cand]]
        settled, need, left = [], limit, room.copy()
        while need > 0:
            top = _best(flat_key, cand, need)
            over = np.bincount(top // S, minlength=B) > left
            if not over.any():
                settled.append(top)
                need -= len(top)
                break
            at_cap = over[cand // S]  # these requests get their best `left` and leave the race
            full = _best_per_request(flat_key, cand[at_cap], S, left)
            settled.append(full)
            need -= len(full)
            left[over] = 0
            cand = cand[~at_cap]
            if len(cand) == 0:
                break
        if need <= 0 or exhaustive:
            out = np.concatenate(settled) if settled else np.zeros(0, np.int64)
            out = _best(flat_key, out, limit)
            return out[np.argsort(-flat_key[out])] if ordered else out
        want *= 4
