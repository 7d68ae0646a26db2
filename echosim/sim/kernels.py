"""Compiled kernels of the replica's decode runs (numba), each with a pure-NumPy twin that gives the same outputs.

Why compiled: a decode run prepares ~5-30 steps of a batch of ~5 requests. In NumPy that is a few dozen calls per
run on arrays of tens to a few hundred elements, each call costing its overhead (1-20 us) rather than its work:
goodput ECHO's merge of the batch's priority orders and its budget's argmax per step came to ~150-350 us per
run, more than the ~100 us of CPU a run of ~8 steps may take for the simulator to run at 1000x real time
(docs/SIMULATOR.md, "Goodput ECHO in decode runs"). The same loops compiled take a few us per run.

numba is optional at run time: without it (or with ECHOSIM_NO_JIT=1) the NumPy twins run, with the same outputs
(tests/test_sim_speed.py runs both). Kernels compile on first use and are cached on disk (`cache=True`), so a
process pays the compile once per machine and later ones load it (docs/SIMULATOR.md gives the times).
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


def prefix_steps(neg_merge, gain, acc_flag, n_pos, floor_total, bound_total, drawn, i0, kv, bucket_tokens,
                 curve, left, emitted, out_m, out_acc):
    """Goodput ECHO's choices for the steps i0, i0 + 1, ... of a decode run while the batch's context stays in the
    bucket `curve` belongs to (the budget's step-time curve there), as Speculator._choose_prefix makes them:
    per step, the drawn rows' positive nodes (row r's first n_pos[r] ranks) merged by `neg_merge` (ascending,
    ties in batch then rank order), the cut that maximizes (B + cumulative gain) / curve (first maximum), at
    least the floor; per request the nodes verified and accepted go to out_m / out_acc [k, B], the tokens it
    emitted since the run's start to `emitted` [B].
    Returns (next step, KV sum at its start, status): 0 all k steps done, or a request's tokens `left` are all
    emitted by the last step made (a run ends there); 1 the bucket changed (call again with the next bucket's
    curve); 2 the cut of the returned step falls inside a group of equal keys (the general loop's merge must
    decide that step)."""
    k, B = drawn.shape
    C = neg_merge.shape[1]
    n = B * C
    keys = np.empty(n, np.float64)
    flat = np.empty(n, np.int64)
    bucket = int(kv / B) // bucket_tokens
    i = i0
    while i < k:
        if int(kv / B) // bucket_tokens != bucket:
            return i, kv, 1
        # the batch's positive nodes in flat (request, rank) order, then a stable sort by merge key
        m = 0
        for b in range(B):
            r = drawn[i, b]
            for c in range(n_pos[r]):
                keys[m] = neg_merge[r, c]
                flat[m] = b * C + c
                m += 1
        order = np.argsort(keys[:m], kind="mergesort")
        bound = bound_total[i]
        # Budget.choose: argmax over cuts j = 0..bound of (B + gains[:j].sum()) / curve[j], the sum cumulative
        best_j = 0
        best = (B + 0.0) / curve[0]
        acc_gain = 0.0
        for j in range(1, bound + 1):
            e = flat[order[j - 1]]
            g = gain[drawn[i, e // C], e % C]
            acc_gain += g   # as np.cumsum adds, in order
            val = (B + acc_gain) / curve[j]
            if val > best:
                best, best_j = val, j
        cut = max(best_j, floor_total[i])
        if floor_total[i] < cut < bound and keys[order[cut - 1]] == keys[order[cut]]:
            return i, kv, 2
        accepted = 0
        for b in range(B):
            out_m[i, b] = 0
            out_acc[i, b] = 0
        for j in range(cut):
            e = flat[order[j]]
            b = e // C
            out_m[i, b] += 1
            a = acc_flag[drawn[i, b], e % C]
            out_acc[i, b] += a
            accepted += a
        kv += accepted + B
        i += 1
        finished = False
        for b in range(B):
            emitted[b] += out_acc[i - 1, b] + 1
            finished = finished or emitted[b] >= left[b]
        if finished:
            break
    return i, kv, 0
