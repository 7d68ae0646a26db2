"""Pricing one iteration with a step-time model (cost_models' StepCostModel).

The target forward (verify trees + prefill chunks) is priced exactly every iteration. The draft part depends only
on the rows drafted per depth and the batch's mean context; it is memoized per (rows per depth, mean context in
buckets of CTX_BUCKET tokens) and always evaluated at the bucket's centre, so results never depend on the order
of calls. The draft model is one layer whose attention reads that context: a bucket of 16 tokens moves the step
time by far less than 0.01%, and the memo saves five of the six model evaluations of an EAGLE step.

Optional overhead terms stand for what kernel profiles do not see (a serving engine's CPU work per token, per
drafted row and per decoding request: tree masks, sampling, bookkeeping, streaming); they are added to the
overhead part. benchmarks/sim_paper_shape.py
fits them to a published throughput column.
"""

from __future__ import annotations

import numpy as np

from cost_models.interface import StepBatch, StepTime
from cost_models.roofline import RooflineCostModel

CTX_BUCKET = 16


class StepPricer:
    def __init__(self, cost, per_token_ms: float = 0.0, per_draft_row_ms: float = 0.0, per_request_ms: float = 0.0):
        self.cost = cost
        self.per_token_ms, self.per_draft_row_ms = per_token_ms, per_draft_row_ms
        self.per_request_ms = per_request_ms
        self._draft: dict[tuple, tuple[float, float, float]] = {}   # (rows per depth, bucket) -> parts
        self._budget: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # budget candidates -> step ms
        self._depth: dict[tuple, tuple[float, float, float]] = {}   # (depth, rows, seqs, bucket) -> parts
        # the per-iteration overhead an empty batch still pays (counted once, with the target forward)
        self._base_overhead = float(cost.step_time(StepBatch(0.0, 0.0, 0.0, 0.0, 0.0)).overhead_ms)
        # the roofline's scalar fast path, unless a subclass prices steps its own way
        scalar = isinstance(cost, RooflineCostModel) and type(cost).step_time is RooflineCostModel.step_time
        self._target_parts = cost.target_parts if scalar else None
        # target_parts' pieces, called directly (price_parts runs once per simulated iteration); the LM head's
        # price memoized here per row count (a pure function of it), one dict lookup instead of a call
        self._layers, self._lm_head = cost.target_scalar_fns() if scalar else (None, None)
        self._lm: dict[float, float] = {}
        # no optional overhead terms: price_parts skips them (they would add 0.0, which changes nothing)
        self._extra = bool(per_token_ms or per_draft_row_ms or per_request_ms)
        self._depth_parts = cost.draft_depth_parts if scalar and cost.draft is not None else None
        self._kernel: tuple | None = None   # kernel_constants, made on first use

    def price(self, tokens: float, kv: float, qk: float, seqs: float, lm_rows: float, draft_rows: tuple,
              mean_ctx: float, decoding: float = 0.0, prefill: tuple | None = None) -> StepTime:
        """One iteration: `decoding` of its `seqs` sequences are decode requests (the rest prefill chunks).
        `prefill` (tokens, kv, qk, seqs, lm_rows): chunks that run as a target forward of their own."""
        st = self.cost.step_time(StepBatch(tokens, kv, qk, seqs, lm_rows))
        if prefill is not None:
            pre = self.cost.step_time(StepBatch(*prefill))
            st.verify_ms += pre.verify_ms
            st.lm_head_ms += pre.lm_head_ms
            tokens += prefill[0]
        extra = self.per_token_ms * tokens + self.per_request_ms * decoding
        if self.per_draft_row_ms and draft_rows:
            extra += self.per_draft_row_ms * sum(draft_rows)
        if extra:
            st.overhead_ms += extra
        if not draft_rows:
            return st
        d = self._draft_cached(draft_rows, mean_ctx)
        return StepTime(d[0], st.verify_ms, st.lm_head_ms + d[1], st.overhead_ms + d[2])

    def price_parts(self, tokens: float, kv: float, qk: float, seqs: float, lm_rows: float, draft_rows: tuple,
                    mean_ctx: float, decoding: float = 0.0) -> tuple[float, float, float, float]:
        """`price` of an iteration in one forward, as (draft_ms, verify_ms, lm_head_ms, overhead_ms): the same
        floats bit for bit, through the cost model's scalar path where it has one (the roofline's
        `target_parts`: no StepBatch / StepTime objects, the attention term's shape part memoized)."""
        layers = self._layers
        if layers is None:
            st = self.price(tokens, kv, qk, seqs, lm_rows, draft_rows, mean_ctx, decoding)
            return st.draft_ms, st.verify_ms, st.lm_head_ms, st.overhead_ms
        # = self._target_parts(tokens, kv, qk, seqs, lm_rows), the same operations
        verify = layers(tokens, kv, qk, seqs)
        lm = self._lm.get(lm_rows)
        if lm is None:
            if len(self._lm) > 65536:
                self._lm.clear()
            lm = self._lm[lm_rows] = self._lm_head(lm_rows)
        overhead = self.cost.params.step_overhead_ms + 0.0 * verify
        if self._extra:
            extra = self.per_token_ms * tokens + self.per_request_ms * decoding
            if self.per_draft_row_ms and draft_rows:
                extra += self.per_draft_row_ms * sum(draft_rows)
            if extra:
                overhead += extra
        if not draft_rows:
            return 0.0 * verify, verify, lm, overhead
        d = self._draft.get((draft_rows, int(mean_ctx) // CTX_BUCKET))
        if d is None:
            d = self._draft_cached(draft_rows, mean_ctx)
        return d[0], verify, lm + d[1], overhead + d[2]

    def kernel_constants(self, drafts: bool) -> tuple | None:
        """What the compiled decode loop (echosim/sim/kernels.py `decode_steps`) prices steps with: the target's
        and the draft's roofline constants and the pricer's own, or None where it cannot price as `price_parts`
        does (a cost model without the roofline's scalar path; a batch that drafts with no draft model)."""
        if self._layers is None or (drafts and self._depth_parts is None):
            return None
        if self._kernel is None:
            from echosim.sim import kernels as K

            tg, dr = self.cost._target, self.cost._draft
            target = tg.kernel_constants()
            draft = dr.kernel_constants() if dr is not None else (np.zeros_like(target[0]),) + target[1:]
            pc = np.zeros(8, np.float64)
            prm = self.cost.params
            pc[[K.P_STEP_OVERHEAD, K.P_BASE_OVERHEAD, K.P_DEPTH_OVERHEAD, K.P_PER_TOKEN, K.P_PER_REQUEST,
                K.P_PER_DRAFT_ROW, K.P_EXTRA, K.P_CTX_BUCKET]] = (
                prm.step_overhead_ms, self._base_overhead, prm.draft_depth_overhead_ms, self.per_token_ms,
                self.per_request_ms, self.per_draft_row_ms, float(self._extra), CTX_BUCKET)
            self._kernel = (*target, *draft, pc, *K.depth_memo())
        return self._kernel

    def observed_ms(self, parts: tuple, tokens: float, draft_rows: tuple, mean_ctx: float,
                    decoding: float = 0.0) -> tuple[float, float, float]:
        """A decode-only iteration's priced parts (price_parts' order) as the engine times its own step, for an
        adaptive budget's observe_step: (verify_ms, draft_ms, other_ms). The engine's draft time (every draft
        forward with its LM head and top-k, select, pack) holds what the step model prices per draft depth and per
        draft row; its verify time (the tree forward, verification, commit) the target's LM head and the
        per-token and per-request overheads (the engine's per-request work, tree masks, acceptance walk, commit,
        runs in its verify phase: its measured remainder does not grow with the batch, docs/ADAPTIVE.md); the rest
        (per step) is other. Handing the budget the draft forward alone, with those costs in `other`, showed it
        drafting 2-4x cheaper than the engine measured it."""
        draft_ms, verify_ms, lm_ms, overhead_ms = parts
        d_lm = d_over = rows = 0.0
        if draft_rows:
            _, d_lm, d_over = self._draft_cached(draft_rows, mean_ctx)
            rows = self.per_draft_row_ms * sum(draft_rows)
        verify_side = self.per_token_ms * tokens + self.per_request_ms * decoding
        return (verify_ms + lm_ms - d_lm + verify_side, draft_ms + d_lm + d_over + rows,
                overhead_ms - d_over - rows - verify_side)

    def budget_step_ms(self, tokens, batch_size: int, mean_ctx: float, draft_rows: tuple) -> np.ndarray:
        """Step time (ms) for each candidate total of verified tokens (roots included, array) of a batch of
        `batch_size` decoding requests with `mean_ctx` cached tokens each, after drafting `draft_rows`: what
        goodput budgets maximize against. Same terms as `price`, vectorized over the candidates."""
        t = np.asarray(tokens, dtype=np.float64)
        b = max(int(batch_size), 1)
        # budgets ask for the same candidates iteration after iteration: memoize by batch, context bucket and
        # candidate range, evaluated at the bucket's centre (as the draft part is)
        bucket = int(mean_ctx) // CTX_BUCKET
        key = (b, bucket, float(t[0]), len(t), draft_rows) if t.ndim == 1 and len(t) else None
        hit = self._budget.get(key) if key is not None else None
        if hit is not None and np.array_equal(hit[0], t):
            return hit[1]
        total = self._budget_ms(t, b, (bucket + 0.5) * CTX_BUCKET, draft_rows)
        if key is not None:
            if len(self._budget) > 4096:
                self._budget.clear()
            self._budget[key] = (t.copy(), total)
        return total

    def _budget_ms(self, t: np.ndarray, b: int, mean_ctx: float, draft_rows: tuple) -> np.ndarray:
        total = np.asarray(self.cost.step_time(StepBatch.uniform(b, t / b, mean_ctx)).total_ms, dtype=np.float64)
        total = total + self.per_token_ms * t + self.per_request_ms * b
        if draft_rows:
            total = total + sum(self._draft_cached(draft_rows, mean_ctx)) + self.per_draft_row_ms * sum(draft_rows)
        return total

    def _draft_cached(self, draft_rows: tuple, mean_ctx: float) -> tuple[float, float, float]:
        bucket = int(mean_ctx) // CTX_BUCKET
        key = (draft_rows, bucket)
        d = self._draft.get(key)
        if d is None:
            d = self._draft[key] = self._draft_part(draft_rows, bucket)
        return d

    def _draft_part(self, rows: tuple, bucket: int) -> tuple[float, float, float]:
        """Draft forward, draft LM head and per-depth overhead, as StepBatch.from_requests lays drafting out,
        summed over depths; each depth is memoized on its own (rows, sequences, depth, context bucket)."""
        ctx = bucket * CTX_BUCKET + CTX_BUCKET / 2
        n_req = max(rows[0], 1.0)  # every drafting request runs depth 1 on its root
        total = [0.0, 0.0, 0.0]
        for d, r in enumerate(rows):
            s = min(r, n_req)
            key = (d, r, s, bucket)
            part = self._depth.get(key)
            if part is None:
                c = ctx + d + 1
                if self._depth_parts is not None:
                    dm, lm, om = self._depth_parts(r, s * c, r * c, s)
                else:
                    st = self.cost.step_time(StepBatch(0.0, 0.0, 0.0, 0.0, 0.0, (r,), (s * c,), (r * c,), (s,)))
                    dm, lm, om = st.draft_ms, st.lm_head_ms, st.overhead_ms
                part = self._depth[key] = (float(dm), float(lm), float(om) - self._base_overhead)
            total[0] += part[0]
            total[1] += part[1]
            total[2] += part[2]
        return total[0], total[1], total[2]
