"""Compiled kernels of the replica's decode runs (numba), each with a pure-NumPy twin that gives the same outputs.

Why compiled: a decode run prepares ~5-30 steps of a batch of ~5 requests. In NumPy that is a few dozen calls per
run on arrays of tens to a few hundred elements, each call costing its overhead (1-20 us) rather than its work:
goodput ECHO's merge of the batch's priority orders and its budget's argmax per step came to ~150-350 us per
run, more than the ~100 us of CPU a run of ~8 steps may take for the simulator to run at 1000x real time
(docs/SIMULATOR.md, "Goodput ECHO in decode runs"). The same loops compiled take a few us per run.

numba is optional at run time: without it (or with ECHOSIM_NO_JIT=1) the NumPy twins run, with the same outputs
(tests/test_sim_speed.py runs both). Kernels compile on first use and are cached on disk (`cache=True`), so a
process pays the compile once per machine and later ones load it (docs/SIMULATOR.md gives the times). Loading
numba costs ~0.5 s of CPU and ~110 MB of memory a process, so only goodput ECHO (table core) uses the kernels.
"""

from __future__ import annotations

import os

import numpy as np

_KERNELS: dict = {}


def jit_enabled() -> bool:
    if os.environ.get("ECHOSIM_NO_JIT", "") not in ("", "0"):
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def prefix_steps_kernel():
    """The compiled `prefix_steps`, or None (no numba, or ECHOSIM_NO_JIT set): the caller then uses NumPy."""
    if "prefix_steps" not in _KERNELS:
        _KERNELS["prefix_steps"] = _compile_prefix_steps() if jit_enabled() else None
    return _KERNELS["prefix_steps"]


def _compile_prefix_steps():
    import numba

    return numba.njit(cache=True, nogil=True)(prefix_steps)


# outcome-row columns (echosim/sim/speculation.py: TOKENS, ACCEPTED, ONE, EMIT, TOKENS_SQ, STOP)
_TOKENS, _ACCEPTED, _EMIT, _TOKENS_SQ = 0, 1, 3, 4


def prefix_steps(neg_merge, gain, acc_flag, n_pos, n_floor, drawn, i0, kv, bucket_tokens, curve, left, emitted,
                 rows):
    """Goodput ECHO's choices for the steps i0, i0 + 1, ... of a decode run while the batch's context stays in the
    bucket `curve` belongs to (the budget's step-time curve there), as Speculator._choose_prefix makes them:
    per step, the drawn rows' positive nodes (row r's first n_pos[r] ranks, the first n_floor[r] its floor)
    merged by `neg_merge` (ascending; ties in batch order, then rank: a stable sort of the batch's nodes), the
    cut that maximizes (B + cumulative gain) / curve (the first maximum), at least the floors; each request's
    nodes verified and accepted are written into its outcome row, rows [k, B, 6] (the drawn table rows), and the
    tokens it emitted since the run's start added to `emitted` [B].
    Returns (next step, KV sum at its start, status): 0 all k steps done, or a request's tokens `left` are all
    emitted by the last step made (a run ends there); 1 the bucket changed (call again with the next bucket's
    curve); 2 the cut of the returned step falls inside a group of equal keys (the general loop's merge, whose
    order among ties is argpartition's, must decide that step)."""
    k, B = drawn.shape
    C = neg_merge.shape[1]
    owner = np.empty(B * C, np.int64)     # the merge: per position, its request, key, gain and accepted flag
    keys = np.empty(B * C, np.float64)
    gains = np.empty(B * C, np.float64)
    accs = np.empty(B * C, np.int64)
    head = np.empty(B, np.int64)          # per request: its next rank to merge, and that node's key
    head_key = np.empty(B, np.float64)
    heap = np.empty(B, np.int64)          # requests ordered by (head key, request)
    m = np.empty(B, np.int64)
    acc = np.empty(B, np.int64)
    bucket = int(kv / B) // bucket_tokens
    i = i0
    while i < k:
        if int(kv / B) // bucket_tokens != bucket:
            return i, kv, 1
        # a B-way merge of the requests' orders (each sorted by rank already) through a binary heap
        size = 0
        floors = 0
        for b in range(B):
            r = drawn[i, b]
            floors += n_floor[r]
            head[b] = 0
            if n_pos[r] == 0:
                continue
            head_key[b] = neg_merge[r, 0]
            j = size
            size += 1
            while j > 0:   # sift up
                p = (j - 1) // 2
                pb = heap[p]
                if head_key[b] < head_key[pb] or (head_key[b] == head_key[pb] and b < pb):
                    heap[j] = pb
                    j = p
                else:
                    break
            heap[j] = b
        bound = 0
        while size > 0:
            b = heap[0]
            r = drawn[i, b]
            c = head[b]
            owner[bound] = b
            keys[bound] = head_key[b]
            gains[bound] = gain[r, c]
            accs[bound] = acc_flag[r, c]
            bound += 1
            head[b] = c + 1
            if c + 1 == n_pos[r]:   # exhausted: the heap's last request moves to the top
                size -= 1
                if size == 0:
                    break
                b = heap[size]
            else:
                head_key[b] = neg_merge[r, c + 1]
            j = 0
            while True:   # sift b down from the top
                lo = 2 * j + 1
                if lo >= size:
                    break
                cb = heap[lo]
                if lo + 1 < size:
                    db = heap[lo + 1]
                    if head_key[db] < head_key[cb] or (head_key[db] == head_key[cb] and db < cb):
                        lo += 1
                        cb = db
                if head_key[cb] < head_key[b] or (head_key[cb] == head_key[b] and cb < b):
                    heap[j] = cb
                    j = lo
                else:
                    break
            heap[j] = b
        # Budget.choose: argmax over cuts j = 0..bound of (B + gains[:j].sum()) / curve[j], the sum cumulative
        best_j = 0
        best_val = (B + 0.0) / curve[0]
        acc_gain = 0.0
        for j in range(1, bound + 1):
            acc_gain += gains[j - 1]   # as np.cumsum adds, in order
            val = (B + acc_gain) / curve[j]
            if val > best_val:
                best_val, best_j = val, j
        cut = max(best_j, floors)
        if floors < cut < bound and keys[cut - 1] == keys[cut]:
            return i, kv, 2
        for b in range(B):
            m[b] = 0
            acc[b] = 0
        accepted = 0
        for j in range(cut):
            b = owner[j]
            m[b] += 1
            acc[b] += accs[j]
            accepted += accs[j]
        finished = False
        for b in range(B):
            rows[i, b, _TOKENS] = m[b] + 1
            rows[i, b, _ACCEPTED] = acc[b]
            rows[i, b, _EMIT] = acc[b] + 1
            rows[i, b, _TOKENS_SQ] = (m[b] + 1) * (m[b] + 1)
            emitted[b] += acc[b] + 1
            finished = finished or emitted[b] >= left[b]
        kv += accepted + B
        i += 1
        if finished:
            break
    return i, kv, 0


def run_sums_kernel():
    """The compiled `run_sums`, or None (the caller then computes the same with NumPy)."""
    if "run_sums" not in _KERNELS:
        if jit_enabled():
            import numba

            _KERNELS["run_sums"] = numba.njit(cache=True, nogil=True)(run_sums)
        else:
            _KERNELS["run_sums"] = None
    return _KERNELS["run_sums"]


def run_sums(rows, ctx0, left0, width, depth, sums, qk, draft_rows, cum_emit):
    """What a decode run needs per step from its outcome rows [k, B, 6] (Replica._decode_run's NumPy path
    computes the same): per step the batch's sums of the first five columns (`sums` [k, 5]), its tokens . context
    with each request's context at the step's start (`qk` [k]), the draft rows per depth (`draft_rows` [k,
    depth], float: requests that drafted depth d or deeper times the width at d), and per request its tokens emitted by
    the end of each step (`cum_emit` [k, B], before the output-length cap). Returns the first step at which a
    request has emitted all it had `left0` (k if none)."""
    k, B = rows.shape[0], rows.shape[1]
    k_fin = k
    alive = np.empty(depth, np.int64)
    for i in range(k):
        for c in range(5):
            sums[i, c] = 0
        q = 0
        for d in range(depth):
            alive[d] = 0
        for b in range(B):
            for c in range(5):
                sums[i, c] += rows[i, b, c]
            before = cum_emit[i - 1, b] if i > 0 else 0
            q += rows[i, b, _TOKENS] * (ctx0[b] + before)
            cum_emit[i, b] = before + rows[i, b, _EMIT]
            if k_fin == k and cum_emit[i, b] >= left0[b]:
                k_fin = i
            stop = rows[i, b, 5]
            if stop <= depth:
                for d in range(stop):
                    alive[d] += 1
        qk[i] = q
        for d in range(depth):
            draft_rows[i, d] = alive[d] * width[d]   # as speculation.draft_rows: requests x the width (float)
    return k_fin
