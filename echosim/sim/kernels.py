"""Compiled kernels of the replica's decode runs (numba), each with a pure-NumPy twin that gives the same outputs.

Why compiled: a decode run prepares ~5-30 steps of a batch of ~5 requests. In NumPy that is a few dozen calls per
run on arrays of tens to a few hundred elements, each call costing its overhead (1-20 us) rather than its work:
goodput ECHO's merge of the batch's priority orders and its budget's argmax per step came to ~150-350 us per
run, more than the ~100 us of CPU a run of ~8 steps may take for the simulator to run at 1000x real time
(docs/SIMULATOR.md, "Goodput ECHO in decode runs"). The same loops compiled take a few us per run.

numba is optional at run time: without it (or with ECHOSIM_NO_JIT=1) the NumPy twins run, with the same outputs
(tests/test_sim_speed.py runs both). Kernels compile on first use and are cached on disk (`cache=True`), so a
process pays the compile once per machine and later ones load it (docs/SIMULATOR.md gives the times). Loading
numba costs ~0.9 s of CPU and ~110 MB of memory a process, so by default only goodput ECHO (table core) uses the
kernels; ECHOSIM_JIT=1 runs every policy's decode runs through the compiled loop (`decode_steps`, the step's price
included), which pays on long traces.
"""

from __future__ import annotations

import os

import numpy as np

from cost_models.roofline import HARD_P, PACKED_FIELDS

_KERNELS: dict = {}


def jit_enabled() -> bool:
    if os.environ.get("ECHOSIM_NO_JIT", "") not in ("", "0"):
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _compiled(fn):
    """`fn` compiled (once a process, loaded from numba's disk cache after the first), or None where the JIT is off
    (no numba, or ECHOSIM_NO_JIT set): the caller then uses its NumPy twin."""
    name = fn.__name__
    if name not in _KERNELS:
        if jit_enabled():
            import numba

            _KERNELS[name] = numba.njit(cache=True, nogil=True)(fn)
        else:
            _KERNELS[name] = None
    return _KERNELS[name]


def prefix_steps_kernel():
    """The compiled `prefix_steps`, or None."""
    return _compiled(prefix_steps)


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
    return _compiled(run_sums)


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


# --- decode runs priced and stepped in one compiled loop ---------------------------------------------------------

def _field_index() -> dict:
    names: list[str] = []
    for f in PACKED_FIELDS:
        names += ["lm_c0", "lm_c1", "lm_c2"] if f == "lm_c" else [f]
    return {n: i for i, n in enumerate(names)}


_F = _field_index()
# (module constants: numba freezes them into the compiled code)
F_LAYERS, F_FIXED, F_ELEM, F_P, F_RAMP, F_EXPERTS, F_TOPK = (_F[n] for n in (
    "layers", "fixed_ms", "elem_c", "p", "ramp", "experts", "topk"))
F_PA, F_COMP, F_KVC, F_QC, F_KEY, F_BLK, F_HEADS, F_GROUP, F_UNITS, F_SPLIT, F_QTILE, F_CAUSAL, F_SEQ = (
    _F[n] for n in ("pa_p", "attn_comp_c", "attn_kv_c", "attn_q_c", "key_ms", "kv_block", "heads_blk", "group",
                    "units", "split", "q_tile", "causal", "seq_ms"))
F_BLEND, F_CKEYS, F_CSEQS, F_CSPAN, F_KRATIO, F_BWRATIO, F_FLRATIO, F_TP, F_ARLAT, F_ARC = (_F[n] for n in (
    "blend", "cover_keys", "cover_seqs", "cover_span", "key_ratio", "bw_ratio", "flop_ratio", "tp", "ar_lat_ms",
    "ar_c"))
F_LM0, F_LM1, F_LM2, F_LMFIX = (_F[n] for n in ("lm_c0", "lm_c1", "lm_c2", "lm_fixed_ms"))
_HARD_P = HARD_P   # the roofline's hard corner

# the pricer's own constants (StepPricer.kernel_constants)
P_STEP_OVERHEAD, P_BASE_OVERHEAD, P_DEPTH_OVERHEAD, P_PER_TOKEN, P_PER_REQUEST, P_PER_DRAFT_ROW, P_EXTRA, \
    P_CTX_BUCKET = range(8)

# decode_steps' statuses: where it stopped, and why
STOP_GENERAL, STOP_YIELD, STOP_END = 0, 1, 2


def jit_everywhere() -> bool:
    """ECHOSIM_JIT=1: every policy's decode runs go through the compiled loop. By default only goodput ECHO's do
    (its merge loads numba anyway): loading numba costs ~0.9 s of CPU and ~110 MB a process, which the compiled
    loop repays only after ~150,000 decode steps (the Azure hour; docs/SIMULATOR.md), so a short run would pay
    for it twice over."""
    return os.environ.get("ECHOSIM_JIT", "") not in ("", "0") and jit_enabled()


def decode_run_kernel():
    """The compiled `decode_steps`, or None (the caller then runs its own per-step loop)."""
    return _compiled(decode_steps)


def decode_steps(sums, qk_dot, tau, drows, k, k_end, k_fin, kv, n_bias, block, kv_blocks, max_tokens, max_prefill,
                 n_wait, admit_ok, head_blocks, now, next_due, tf, tdense, tmoe, df, ddense, dmoe, pc, memo_keys,
                 memo_vals, memo_used, parts, times, kv_after, acc, counts):
    """Steps k, k + 1, ... of a replica's decode run (Replica._decode_run's per-step loop, the same floats bit for
    bit): per step the general loop's KV bound and admission check, the price (StepPricer.price_parts through the
    roofline's layers_scalar and lm_head_ms, and the draft part as StepPricer._draft_part lays it out), and the
    clock moved to the step's end. `sums` [k, 5] the steps' outcome sums (tokens, accepted, decoding, emitted,
    tokens^2), `qk_dot` [k] their tokens . context (unused where `tau` > 0: a fixed tree, tau x the KV sum), `drows`
    [k, depth] the draft rows per depth; tf / tdense / tmoe and df / ddense / dmoe the target's and the draft's
    _Forward.kernel_constants, pc the pricer's; memo_keys [n, 4] / memo_vals [n, 3] / memo_used [1] its memo of
    draft depths' parts (kept across calls: `depth_memo`). Each step made here writes its parts [4], (start, end)
    times and KV sum after it, adds its parts to `acc` [4] (the metrics' sums, in order) and its batch, tokens
    verified and drafts accepted to `counts` [3].
    Returns (status, step, kv, now): STOP_GENERAL at a step the general loop must make (KV bound or admission),
    STOP_YIELD at a step that ends at or after `next_due` or finishes a request (its parts written, not made: the
    caller yields its timeout), STOP_END at `k_end` (the prepared steps used up: the arrays may hold more)."""

    def forward_ms(F, dense, moe, t, kv_t, qk, seqs):   # _Forward.layers_scalar
        p = F[F_P]
        inv_p = 1.0 / p
        tr = t + F[F_RAMP]
        layer = F[F_FIXED] + t * F[F_ELEM]
        for i in range(dense.shape[0]):
            layer = layer + ((dense[i, 0] * tr) ** p + (dense[i, 1] + dense[i, 2] * t) ** p) ** inv_p
        if moe.shape[0]:
            e, kk = F[F_EXPERTS], F[F_TOPK]
            touched = e * (1.0 - (1.0 - kk / e) ** t)
            for i in range(moe.shape[0]):
                layer = layer + ((moe[i, 0] * kk * tr) ** p + (moe[i, 1] * touched + moe[i, 2] * kk * t) ** p) ** inv_p
        key_ms = F[F_KEY]
        if key_ms > 0:   # tile_terms
            s1 = 0.5 * (seqs + 1.0 + abs(seqs - 1.0))
            rows = t * F[F_GROUP]
            a = rows / F[F_QTILE]
            m = 0.5 * (seqs + a + abs(seqs - a))
            blocks = F[F_HEADS] * (0.5 * (m + 1.0 + abs(m - 1.0)))
            a = F[F_UNITS] / blocks
            splits = 1.0 + F[F_SPLIT] * (0.5 * (1.0 + a + abs(1.0 - a)) - 1.0)
            load = blocks * splits / F[F_UNITS]
            a = rows / (F[F_QTILE] * s1)
            n = 0.5 * (1.0 + a + abs(1.0 - a))
            span = F[F_CAUSAL] * t / s1 * (n - 1.0) / n / splits
            a = (load - 1.0) * F[F_UNITS]
            a = 0.5 * (0.0 + a + abs(0.0 - a))
            tail = 0.5 * (1.0 + a - abs(1.0 - a))
        else:
            s1, splits, load, span, tail = 0.5 * (seqs + 1.0 + abs(seqs - 1.0)), 0.0, 0.0, 0.0, 0.0
        tq = t * F[F_QC]
        seq_term = F[F_SEQ] * seqs
        seq_cover = seqs / F[F_CSEQS] if F[F_BLEND] > 0 and F[F_CSEQS] > 0 else 0.0
        pa = F[F_PA]
        comp = qk * F[F_COMP]
        mem = kv_t * F[F_KVC] + tq
        if key_ms > 0:
            blk = F[F_BLK]
            keys = -(-(kv_t / s1 / splits) // blk) * blk
            a = keys * key_ms
            b = ((keys - 0.5 * span) * load + span * tail) * key_ms
            serial = 0.5 * (a + b + abs(a - b))
            w = 0.0
            if F[F_BLEND] > 0:
                if F[F_CKEYS] <= 0 or F[F_CSEQS] <= 0:
                    w = 1.0
                else:
                    a = kv_t / F[F_CKEYS]
                    x = 0.5 * (a + seq_cover + abs(a - seq_cover))
                    w = 0.0 if x <= 1.0 else min(1.0, np.log(x) / F[F_CSPAN])
            if w > 0:
                serial = serial * F[F_KRATIO] ** w
                mem = mem * F[F_BWRATIO] ** w
                comp = comp * F[F_FLRATIO] ** w
                attn = (comp ** pa + mem ** pa + serial ** pa) ** (1.0 / pa)
                hard = (comp ** _HARD_P + mem ** _HARD_P + serial ** _HARD_P) ** (1.0 / _HARD_P)
                attn = attn ** (1.0 - w) * hard ** w
            else:
                attn = (comp ** pa + mem ** pa + serial ** pa) ** (1.0 / pa)
        else:
            attn = (comp ** pa + mem ** pa) ** (1.0 / pa)
        layer = layer + attn + seq_term
        if F[F_TP] > 1:
            layer = layer + 2.0 * (F[F_ARLAT] + t * F[F_ARC])
        return F[F_LAYERS] * layer * (t > 0)

    def lm_head_ms(F, rows):   # _Forward._lm_head_ms
        p = F[F_P]
        return ((((F[F_LM0] * (rows + F[F_RAMP])) ** p + (F[F_LM1] + F[F_LM2] * rows) ** p) ** (1.0 / p)
                 + F[F_LMFIX]) * (rows > 0))

    depth = drows.shape[1]
    mask = memo_keys.shape[0] - 1
    bucket_tokens = pc[P_CTX_BUCKET]
    while k < k_end:
        T, acc_sum, n_dec, tok_sq = sums[k, 0], sums[k, 1], sums[k, 2], sums[k, 4]
        need = (kv + n_bias) // block + T // block + n_dec
        if need > kv_blocks:
            return STOP_GENERAL, k, kv, now
        if n_wait and admit_ok and min(max_tokens - T, max_prefill) > 0 and head_blocks <= kv_blocks - need:
            return STOP_GENERAL, k, kv, now
        qk = float(qk_dot[k] if tau == 0 else tau * kv) + 0.5 * (tok_sq + T)
        tokens = float(T)
        seqs = float(n_dec)
        # StepPricer.price_parts
        verify = forward_ms(tf, tdense, tmoe, tokens, float(kv + T), qk, seqs)
        lm = lm_head_ms(tf, tokens)
        overhead = pc[P_STEP_OVERHEAD] + 0.0 * verify
        if pc[P_EXTRA] > 0:
            extra = pc[P_PER_TOKEN] * tokens + pc[P_PER_REQUEST] * seqs
            if pc[P_PER_DRAFT_ROW] != 0 and depth:
                rsum = 0.0
                for d in range(depth):
                    rsum += drows[k, d]
                extra += pc[P_PER_DRAFT_ROW] * rsum
            if extra != 0:
                overhead += extra
        if depth:   # StepPricer._draft_part at the batch's context bucket
            bucket = int(int(kv / n_dec) // bucket_tokens)
            ctx = bucket * bucket_tokens + bucket_tokens / 2
            n_req = max(drows[k, 0], 1.0)
            dm = dl = do = 0.0
            for d in range(depth):
                r = drows[k, d]
                s = min(r, n_req)
                # a depth's parts are a pure function of (depth, rows, sequences, bucket): an open-addressing memo
                slot = (((d * 1000003 + int(r * 8.0)) * 999983 + int(s * 8.0)) * 1000033 + bucket) & mask
                while memo_keys[slot, 0] >= 0 and not (memo_keys[slot, 0] == d and memo_keys[slot, 1] == r
                                                       and memo_keys[slot, 2] == s and memo_keys[slot, 3] == bucket):
                    slot = (slot + 1) & mask
                if memo_keys[slot, 0] < 0:
                    if memo_used[0] >= (mask + 1) // 2:   # half full: start afresh (never full: probes end)
                        memo_keys[:, 0] = -1.0
                        memo_used[0] = 0
                        slot = (((d * 1000003 + int(r * 8.0)) * 999983 + int(s * 8.0)) * 1000033 + bucket) & mask
                    c = ctx + d + 1
                    memo_vals[slot, 0] = 0.0 * 0.0 + forward_ms(df, ddense, dmoe, r, s * c, r * c, s)
                    memo_vals[slot, 1] = lm_head_ms(tf, 0.0) + lm_head_ms(df, r)
                    memo_vals[slot, 2] = (pc[P_STEP_OVERHEAD] + 0.0 * 0.0 + pc[P_DEPTH_OVERHEAD] * (r > 0)
                                          - pc[P_BASE_OVERHEAD])
                    memo_keys[slot, 0], memo_keys[slot, 1], memo_keys[slot, 2], memo_keys[slot, 3] = d, r, s, bucket
                    memo_used[0] += 1
                dm += memo_vals[slot, 0]
                dl += memo_vals[slot, 1]
                do += memo_vals[slot, 2]
            draft, lm, overhead = dm, lm + dl, overhead + do
        else:
            draft = 0.0 * verify
        parts[k, 0], parts[k, 1], parts[k, 2], parts[k, 3] = draft, verify, lm, overhead
        step_s = (draft + verify + lm + overhead) / 1000.0
        end = now + step_s
        times[k, 0], times[k, 1] = now, end
        if k == k_fin or end >= next_due:
            return STOP_YIELD, k, kv, now
        now = end
        kv += acc_sum + n_dec
        kv_after[k] = kv
        acc[0] += draft
        acc[1] += verify
        acc[2] += lm
        acc[3] += overhead
        counts[0] += n_dec
        counts[1] += T
        counts[2] += acc_sum
        k += 1
    return STOP_END, k, kv, now


def depth_memo(slots: int = 1 << 14) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An empty memo for decode_steps' draft depths, (keys [slots, 4], values [slots, 3], entries [1]): (depth,
    rows, sequences, context bucket) -> (draft ms, LM head ms, overhead ms); a free slot's depth is -1. `slots`
    a power of 2."""
    keys = np.empty((slots, 4), np.float64)
    keys[:, 0] = -1.0
    return keys, np.zeros((slots, 3), np.float64), np.zeros(1, np.int64)
