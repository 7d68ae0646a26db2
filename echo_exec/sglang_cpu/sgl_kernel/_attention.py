"""SGLang's CPU attention ops (intel_amx backend: torch.ops.sgl_kernel.{extend,decode}_attention_cpu) in torch.

The whole batch is one scaled_dot_product_attention call: each request's keys (its prefix read from the KV pool
through req_to_token, then its new tokens) are gathered into a [B, L] block padded to the longest request, and a
boolean mask hides the padding, the future (causal extend) or non-ancestors (a speculative verify's tree mask,
QLEN_ONLY layout: per request n x n over its new tokens). GQA through enable_gqa. Not supported (raise): logit
capping, attention sinks, sliding windows, cross attention, fp8 KV.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LIB = torch.library.Library("sgl_kernel", "DEF")  # noqa: TOR901 - the namespace SGLang's backend calls into
_LIB.define(
    "decode_attention_cpu(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, float k_scale, float v_scale, "
    "Tensor(c!) output, Tensor? key, Tensor? value, Tensor loc, Tensor attn_logits, Tensor req_to_token, "
    "Tensor req_pool_indices, Tensor seq_lens, float sm_scale, float logit_cap, bool is_cross_attention, "
    "int sliding_window_size, Tensor? encoder_lens, Tensor? sinks) -> ()")
_LIB.define(
    "extend_attention_cpu(Tensor q_extend, Tensor? k_extend, Tensor? v_extend, Tensor(a!) o_extend, "
    "Tensor k_buffer, Tensor v_buffer, float k_scale, float v_scale, Tensor req_to_token, "
    "Tensor req_pool_indices, Tensor seq_lens, Tensor extend_seq_lens, Tensor extend_start_loc, "
    "int max_len_extend, float sm_scale, float logit_cap, bool is_cross_attention, int sliding_window_size, "
    "Tensor? encoder_lens, Tensor? sinks, Tensor? tree_mask, bool is_causal) -> ()")


def _unsupported(logit_cap: float, is_cross: bool, window: int, sinks, k_buffer: torch.Tensor, op: str) -> None:
    why = ("logit_cap" if logit_cap > 0 else "cross attention" if is_cross else "a sliding window" if window > 0
           else "attention sinks" if sinks is not None
           else "an fp8 KV cache" if k_buffer.dtype == torch.float8_e4m3fn else None)
    if why:
        raise NotImplementedError(f"sgl_kernel.{op} (echo's torch CPU kernel) does not implement {why}")


def _prefix_locs(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, lens: torch.Tensor):
    """KV slots of each request's first lens[b] tokens, [B, max(lens)], and their validity mask (None when every
    request has max(lens) tokens: no padding to hide)."""
    L = int(lens.max()) if lens.numel() else 0
    rows = req_to_token.index_select(0, req_pool_indices.long())[:, :L].long()
    if bool((lens == L).all()):
        return rows, None
    valid = torch.arange(L, device=lens.device)[None, :] < lens[:, None]
    return rows.masked_fill_(~valid, 0), valid


def _gather(buf: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
    """buf rows at locs [B, L] -> [B, L, *row] (index_select: much cheaper than advanced indexing on a CPU)."""
    return buf.index_select(0, locs.reshape(-1)).view(*locs.shape, *buf.shape[1:])


def decode_attention_cpu(query, k_cache, v_cache, k_scale, v_scale, output, key, value, loc, attn_logits,
                         req_to_token, req_pool_indices, seq_lens, sm_scale, logit_cap, is_cross_attention,
                         sliding_window_size, encoder_lens, sinks) -> None:
    """One new token per sequence: write its K/V at loc, then attend to the sequence's seq_lens[b] cached tokens."""
    _unsupported(logit_cap, is_cross_attention, sliding_window_size, sinks, k_cache, "decode_attention_cpu")
    if key is not None:
        k_cache.index_copy_(0, loc.long(), key.view(-1, *k_cache.shape[1:]).to(k_cache.dtype))
        v_cache.index_copy_(0, loc.long(), value.view(-1, *v_cache.shape[1:]).to(v_cache.dtype))
    B, H, _ = query.shape
    locs, valid = _prefix_locs(req_to_token, req_pool_indices, seq_lens.long())
    k = _gather(k_cache, locs).transpose(1, 2)          # [B, KVH, L, D]
    v = _gather(v_cache, locs).transpose(1, 2)
    mask = None if valid is None else valid[:, None, None, :]
    o = F.scaled_dot_product_attention(query[:, :, None, :], k.to(query.dtype), v.to(query.dtype),
                                       attn_mask=mask, scale=sm_scale, enable_gqa=True)
    output.view(B, H, -1).copy_(o[:, :, 0, :])


class _ExtendLayout:
    """Index tensors and the attention mask of one extend batch. Every layer of a forward passes the same lengths
    and tree mask, so the last layout is kept and reused while they are equal (checked, not assumed)."""

    def __init__(self, seq, ext, start, tree_mask, is_causal, kv_shared):
        self.key = (seq.clone(), ext.clone(), start.clone(), None if tree_mask is None else tree_mask.clone(),
                    is_causal, kv_shared)
        B = len(ext)
        Lq = int(ext.max())
        ar = torch.arange(Lq, device=ext.device)
        self.qvalid = qvalid = ar[None, :] < ext[:, None]                                    # [B, Lq]
        self.qidx = torch.where(qvalid, start[:, None] + ar[None, :], 0)
        self.qsel = self.qidx[qvalid]
        self.pre = pre = seq - ext
        if kv_shared:  # keys: the whole sequence from the pool; the new tokens are its last ext[b]
            L = int(seq.max())
            rel = torch.arange(L, device=ext.device)[None, None, :] - pre[:, None, None]
            kvalid = (torch.arange(L, device=ext.device)[None, :] < seq[:, None])[:, None, :]
        else:          # keys: the prefix from the pool, then the new tokens
            P = int(pre.max())
            rel = torch.cat([torch.full((1, 1, P), -1, device=ext.device), ar[None, None, :]], dim=2).expand(B, 1, -1)
            pvalid = torch.arange(P, device=ext.device)[None, :] < pre[:, None]
            kvalid = torch.cat([pvalid, qvalid], dim=1)[:, None, :]
        new = rel >= 0
        if tree_mask is not None:
            tm = torch.zeros(B, Lq, Lq, dtype=torch.bool, device=ext.device)
            n2 = ext * ext
            off = torch.cumsum(n2, 0) - n2
            rr, cc = torch.meshgrid(ar, ar, indexing="ij")
            inside = (rr[None] < ext[:, None, None]) & (cc[None] < ext[:, None, None])
            flat = off[:, None, None] + rr[None] * ext[:, None, None] + cc[None]
            tm[inside] = tree_mask.reshape(-1)[flat[inside]].bool()
            see_new = torch.gather(tm, 2, rel.clamp(0, Lq - 1).expand(B, Lq, -1))
        elif is_causal:
            see_new = rel <= ar[None, :, None]
        else:
            see_new = torch.ones_like(new)
        mask = kvalid & torch.where(new, see_new, True)
        mask = mask | ~qvalid[:, :, None]  # padded query rows see everything (their outputs are dropped)
        self.mask = mask[:, None]

    def same(self, seq, ext, start, tree_mask, is_causal, kv_shared) -> bool:
        s, e, st, tm, c, kv = self.key
        if (c, kv) != (is_causal, kv_shared) or (tm is None) != (tree_mask is None):
            return False
        if s.shape != seq.shape or not (torch.equal(s, seq) and torch.equal(e, ext) and torch.equal(st, start)):
            return False
        return tm is None or (tm.shape == tree_mask.shape and torch.equal(tm, tree_mask))


_last_layout: list[_ExtendLayout] = []


def extend_attention_cpu(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, k_scale, v_scale, req_to_token,
                         req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, max_len_extend, sm_scale,
                         logit_cap, is_cross_attention, sliding_window_size, encoder_lens, sinks, tree_mask,
                         is_causal) -> None:
    """Each request's extend_seq_lens[b] new tokens (rows extend_start_loc[b]... of q/k/v_extend) attend to its
    cached prefix (seq_lens - extend_seq_lens tokens, read through req_to_token) and to its new tokens: causally,
    all of them (is_causal False), or as tree_mask says (a bool per new-token pair, request after request)."""
    _unsupported(logit_cap, is_cross_attention, sliding_window_size, sinks, k_buffer, "extend_attention_cpu")
    ext = extend_seq_lens.long()
    if len(ext) == 0:
        return
    seq, start = seq_lens.long(), extend_start_loc.long()
    tm = tree_mask if tree_mask is not None and tree_mask.numel() > 0 else None
    shared = k_extend is None  # a KV-shared layer: its new tokens' K/V are in the pool already
    if _last_layout and _last_layout[0].same(seq, ext, start, tm, is_causal, shared):
        lay = _last_layout[0]
    else:
        lay = _ExtendLayout(seq, ext, start, tm, is_causal, shared)
        _last_layout[:] = [lay]
    if shared:
        locs, _ = _prefix_locs(req_to_token, req_pool_indices, seq)
        k, v = _gather(k_buffer, locs), _gather(v_buffer, locs)
    else:
        locs, _ = _prefix_locs(req_to_token, req_pool_indices, lay.pre)
        k = torch.cat([_gather(k_buffer, locs).to(q_extend.dtype), _gather(k_extend, lay.qidx)], dim=1)
        v = torch.cat([_gather(v_buffer, locs).to(q_extend.dtype), _gather(v_extend, lay.qidx)], dim=1)
    q = _gather(q_extend, lay.qidx).transpose(1, 2)                                   # [B, H, Lq, D]
    o = F.scaled_dot_product_attention(q, k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                                       attn_mask=lay.mask, scale=sm_scale, enable_gqa=True)
    o_extend.view(o_extend.shape[0], -1, o.shape[-1])[lay.qsel] = o.transpose(1, 2)[lay.qvalid].to(o_extend.dtype)


_LIB.impl("decode_attention_cpu", decode_attention_cpu, "CPU")
_LIB.impl("extend_attention_cpu", extend_attention_cpu, "CPU")
