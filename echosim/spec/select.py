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


_F32_MIN = np.float32(np.finfo(np.float32).min)  # a threshold at least this excludes undrafted (-inf) slots


def top_per_request(key: np.ndarray, n: int | np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """The n_i best nodes of each request i (fewer if it has fewer candidates), as sorted flat indices.
    `columns`: only these slots can qualify (see eligible_slots).

    Fast path: each row's n_i-th best key comes from a value-only float32 sort (SIMD sorts, several times faster
    than float64 arg-partitions), and the chosen nodes are the keys at or above it, read back in
    flat order. Float32 rounding is monotone, so that set is exactly the float64 top-n_i unless a tie straddles
    the cut; the few rows where one does are redone exactly."""
    B, S = key.shape
    n = np.asarray(n, dtype=np.int64)
    n = np.minimum(n if n.ndim else np.full(B, n), S if columns is None else len(columns))
    m = int(n.max(initial=0))
    if m <= 0 or B == 0:
        return np.zeros(0, np.int64)
    if m == 1 and columns is None:  # one node each (ECHO's floor): a row-wise argmax
        best = key.argmax(axis=1)
        rows = np.arange(B)
        keep = (n > 0) & (key[rows, best] > -np.inf)
        return (rows * S + best)[keep]
    sub = key if columns is None else key[:, columns]
    C = sub.shape[1]
    k32 = sub.astype(np.float32)
    if C <= 2048:  # a whole-row SIMD sort beats a partition at these widths
        top, m = np.sort(k32, axis=1), C
    else:
        top = np.sort(np.partition(k32, C - m, axis=1)[:, C - m:], axis=1)  # [B, m] ascending
    thr = np.where(n > 0, top[np.arange(B), m - np.maximum(n, 1)], np.inf)
    np.maximum(thr, _F32_MIN, out=thr)
    flat = np.flatnonzero(k32 >= thr.astype(np.float32)[:, None])
    over = np.flatnonzero(np.bincount(flat // C, minlength=B) > n)
    if len(over):  # float32 ties at a row's cut: that row's exact float64 top n_i
        fixed = [r * C + np.sort(np.argsort(-sub[r], kind="stable")[:n[r]]) for r in over]
        fixed = [f[sub.ravel()[f] > -np.inf] for f in fixed]
        flat = np.sort(np.concatenate([flat[~np.isin(flat // C, over)]] + fixed))
    if columns is not None:
        flat = (flat // C) * S + columns[flat % C]
    return flat


def best_sorted(flat_key: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """The n entries of idx (sorted flat indices) with the largest keys, still sorted. Ancestor-closed when idx is:
    float32 value partition for the cut, exact float64 order among the few keys tied with it."""
    if len(idx) <= n:
        return idx
    if n <= 0:
        return idx[:0]
    v = flat_key[idx]
    v32 = v.astype(np.float32)
    thr = np.partition(v32, len(v32) - n)[len(v32) - n]
    above = v32 > thr
    short = n - int(above.sum())
    tied = np.flatnonzero(v32 == thr)
    if short < len(tied):  # the cut splits a tie: float64 decides, then flat order (a parent comes first)
        tied = tied[np.lexsort((tied, -v[tied]))[:short]]
    above[tied] = True
    return idx[above]


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
                top = np.sort(_best_per_request(flat_key, top, S, room))
        top = best_sorted(flat_key, top, limit)
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


def band_per_row(sub: np.ndarray, skip: np.ndarray, cap: np.ndarray, limit: int) -> np.ndarray | None:
    """sub [A, C]: keys of A requests' candidates. For each row j, its entries ranked skip[j]+1 .. cap[j] by key (a
    row's top skip[j] are already chosen, e.g. ECHO's floor), then the best `limit` of those across the rows: sorted
    flat indices into sub. None when float32 ties blur a boundary (use ranked_with_caps).

    One float32 row sort gives every boundary as a value: a row's band is the keys in [lo, hi), where hi is its
    skip-th best key and lo the larger of its cap-th best and the batch-wide cut. Both boundaries are checked
    clean (exactly skip and skip + count keys at or above them), so the answer is the exact float64 one."""
    A, C = sub.shape
    if A == 0 or limit <= 0 or C == 0:
        return np.zeros(0, np.int64)
    cap = np.minimum(cap, C)
    skip = np.minimum(skip, cap)
    w = int(cap.max())
    if w == 0:
        return np.zeros(0, np.int64)
    k32 = sub.astype(np.float32)
    win = np.sort(k32, axis=1)[:, ::-1][:, :w]  # [A, w]: each row's w best keys, descending
    j = np.arange(w)
    inwin = (j >= skip[:, None]) & (j < cap[:, None]) & (win > -np.inf)
    total = int(np.count_nonzero(inwin))
    if total > limit:
        vals = win[inwin]
        cut = np.partition(vals, total - limit)[total - limit]
        inwin &= win >= cut
        if np.count_nonzero(inwin) != limit:  # a tie at the batch-wide cut
            return None
    count = inwin.sum(axis=1)
    at = np.arange(A)
    hi = np.where(skip > 0, win[at, np.maximum(skip - 1, 0)], np.inf).astype(np.float32)
    lo = np.where(count > 0, win[at, np.maximum(skip + count - 1, 0)], hi).astype(np.float32)
    ge_lo = k32 >= lo[:, None]
    ge_hi = k32 >= hi[:, None]
    n_hi = ge_hi.sum(axis=1)
    if (n_hi != skip).any() or (ge_lo.sum(axis=1) - n_hi != count).any():
        return None  # a tie straddles a row's boundary
    return np.flatnonzero(ge_lo & ~ge_hi)
