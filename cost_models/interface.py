"""The step-time interface: one Protocol, interchangeable implementations (roofline, fitted).

A StepBatch describes the work of one decode iteration as a few aggregates per candidate configuration, so that
10,000 configurations evaluate as NumPy arrays of shape [n] (draft fields [n, D]) in one call, while the simulator's
single-iteration call stays on plain Python floats (no NumPy dispatch cost).

Aggregates, per configuration:
- target_tokens: tokens through the target forward (verify tree nodes incl. roots, plus prefill chunk tokens);
- target_kv_tokens: keys attention reads, summed over sequences (cached context + the new tokens);
- target_qk_pairs: query-key pairs, summed over sequences (attention FLOPs);
- target_seqs: sequences in the forward (decode requests + prefill chunks);
- target_lm_rows: rows through the LM head (every verify token; one per prefill chunk);
- draft_tokens [D]: rows the draft model runs at each depth (all requests together); draft_kv_tokens,
  draft_qk_pairs, draft_seqs likewise per depth. Every drafted row also goes through the draft's LM head.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

Num = float | np.ndarray


@dataclass
class StepTime:
    """Time of one iteration in ms, split by where it goes. Fields are floats or arrays of shape [n]."""

    draft_ms: Num
    verify_ms: Num
    lm_head_ms: Num
    overhead_ms: Num

    @property
    def total_ms(self) -> Num:
        return self.draft_ms + self.verify_ms + self.lm_head_ms + self.overhead_ms


@dataclass
class StepBatch:
    target_tokens: Num
    target_kv_tokens: Num
    target_qk_pairs: Num
    target_seqs: Num
    target_lm_rows: Num
    draft_tokens: tuple | np.ndarray = ()  # per depth: tuple of floats, or array [n, D]
    draft_kv_tokens: tuple | np.ndarray = ()
    draft_qk_pairs: tuple | np.ndarray = ()
    draft_seqs: tuple | np.ndarray = ()

    @classmethod
    def from_requests(cls, verify_tokens, context_lens, draft_rows=(), prefill_chunks=()) -> StepBatch:
        """One iteration from per-request lists (the simulator's path).

        verify_tokens[i]: tokens request i verifies (tree size incl. the root; 1 for plain decoding);
        context_lens[i]: its KV length before this step; draft_rows[d]: rows drafted at depth d, all requests
        together; prefill_chunks: (chunk_tokens, past_kv_tokens) pairs batched into the same target forward."""
        if len(verify_tokens) != len(context_lens):
            raise ValueError("verify_tokens and context_lens must have one entry per request")
        n_req = len(verify_tokens)
        if isinstance(verify_tokens, np.ndarray) or isinstance(context_lens, np.ndarray):
            t = np.asarray(verify_tokens, dtype=np.float64)
            c = np.asarray(context_lens, dtype=np.float64)
            tokens, ctx, tc, tt = float(t.sum()), float(c.sum()), float(t @ c), float(t @ t)
        else:  # small Python lists: plain sums beat NumPy's per-call cost
            tokens, ctx = float(sum(verify_tokens)), float(sum(context_lens))
            tc = float(sum(map(operator.mul, verify_tokens, context_lens)))
            tt = float(sum(map(operator.mul, verify_tokens, verify_tokens)))
        kv = ctx + tokens
        qk = tc + (tt + tokens) / 2  # sum of t * c + t (t + 1) / 2
        seqs, lm_rows = float(n_req), tokens
        for chunk, past in prefill_chunks:
            tokens += chunk
            seqs += 1
            kv += past + chunk
            qk += chunk * past + chunk * (chunk + 1) / 2
            lm_rows += 1
        if not len(draft_rows):
            return cls(tokens, kv, qk, seqs, lm_rows)
        rows = tuple(float(r) for r in draft_rows)
        mean_ctx = ctx / max(n_req, 1)
        d_seqs = tuple(min(r, float(max(n_req, 1))) for r in rows)
        d_kv = tuple(s * (mean_ctx + d) for d, s in enumerate(d_seqs, 1))
        d_qk = tuple(r * (mean_ctx + d) for d, r in enumerate(rows, 1))
        return cls(tokens, kv, qk, seqs, lm_rows, rows, d_kv, d_qk, d_seqs)

    @classmethod
    def uniform(cls, batch_size, tokens_per_seq, context_len, draft_rows_per_seq=None, prefill_tokens=0,
                prefill_past=0) -> StepBatch:
        """Vectorized: B sequences that each verify `tokens_per_seq` tokens over `context_len` cached tokens, plus
        optionally one prefill chunk of `prefill_tokens` after `prefill_past` cached tokens in the same forward.
        Arguments broadcast to arrays [n]; draft_rows_per_seq is [D] or [n, D] (rows per sequence per depth)."""
        b, t, c, pt, pp = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (
            batch_size, tokens_per_seq, context_len, prefill_tokens, prefill_past)))
        has_pf = (pt > 0).astype(np.float64)
        tokens = b * t + pt
        kv = b * (c + t) + has_pf * (pp + pt)
        qk = b * (t * c + t * (t + 1) / 2) + pt * pp + pt * (pt + 1) / 2
        out = cls(tokens, kv, qk, b + has_pf, b * t + has_pf)
        if draft_rows_per_seq is not None:
            r = np.asarray(draft_rows_per_seq, dtype=np.float64)
            r = np.broadcast_to(r, b.shape + r.shape[-1:])
            depth = np.arange(1, r.shape[-1] + 1, dtype=np.float64)
            rows = r * b[..., None]
            seqs = np.where(r > 0, b[..., None], 0.0)
            out.draft_tokens = rows
            out.draft_seqs = seqs
            out.draft_kv_tokens = seqs * (c[..., None] + depth)
            out.draft_qk_pairs = rows * (c[..., None] + depth)
        return out


@runtime_checkable
class StepCostModel(Protocol):
    """What the simulator and the budget policies call. Implementations: RooflineCostModel, FittedCostModel."""

    def step_time(self, batch: StepBatch) -> StepTime:
        """Time of one iteration (draft, verify, LM head, overhead), floats or arrays like the batch's fields."""
        ...

    def verify_ms(self, tokens_total: Num, kv_tokens_total: Num, num_seqs: Num) -> Num:
        """One target forward over `tokens_total` tokens of `num_seqs` sequences with `kv_tokens_total` cached
        tokens in all (layers + LM head + per-step overhead): the cost of verifying at this batch."""
        ...

    def ar_step_ms(self, batch_size: Num, context_len: Num) -> Num:
        """One plain autoregressive decode step of `batch_size` sequences of `context_len` cached tokens."""
        ...
