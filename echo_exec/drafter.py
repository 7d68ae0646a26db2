"""ModelDrafter: an independent small draft model behind the scheduler core's Drafter protocol (drafting.py).

One draft forward per depth, over every frontier node of every request at once:
- depth 1: each request feeds the tokens its draft cache lacks, i.e. the drafts accepted last step plus the new
  root (causal, ragged), so the draft's KV of committed tokens stays in sync without copying; the root's logits
  give its children;
- depth d >= 2: each frontier node (a depth d-1 beam node) is fed at RoPE position kv_len + d - 1 and written to
  a scratch position past the root (kv_len + 1 + (d-2)*k + j); it attends to the committed context, the root and
  its own ancestors' scratch positions (tree attention), and its logits give its k children.
Children are the top-k of the draft's distribution (distinct tokens, sorted), as lossless sampling requires.
The draft cache shares the target's block table (kv.BlockManager); scratch lies past the committed length.

The draft runs several times per step and is tiny, so the cost of a draft forward is almost all per-op dispatch.
`LeanForward` computes the same function as Transformer.forward_packed with a fraction of the ops (fused q/k/v and
gate/up projections, one RoPE over q and k together, a RoPE table, F.rms_norm); tests check it against the model.
Drafts never affect what is emitted (verification is lossless), only how much is accepted.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from echo_exec.errors import ExecError
from echo_exec.kv import BlockManager, attn_meta
from echo_exec.model import AttnMeta, Eagle3Head, KVCache, Transformer, packed_attention, rope_cos_sin
from echosim.spec.forest import DraftForest


def in_request_order(expand, forest: DraftForest, depth: int, rows: np.ndarray, parents: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """`expand` over rows sorted by request (a drafter's packed batch goes request by request), its answers put
    back in the caller's order."""
    order = np.argsort(rows, kind="stable")
    tok, lp = expand(forest, depth, rows[order], parents[order], k)
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    return tok[inv], lp[inv]


class LeanForward:
    """Transformer.forward_packed of `model` (same weights, same results up to float rounding), in fewer ops."""

    def __init__(self, model: Transformer, max_positions: int):
        c = model.cfg
        self.cfg, self.model = c, model
        dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
        cos, sin = rope_cos_sin(model.inv_freq(dev), torch.arange(max_positions, device=dev), dt)
        self.cos, self.sin = cos[:, None, :], sin[:, None, :]  # [P, 1, D]: broadcast over heads
        self.layers = []
        for blk in model.model.layers:
            a, m = blk.self_attn, blk.mlp
            qkv_b = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]) if a.q_proj.bias is not None else None
            gu_b = torch.cat([m.gate_proj.bias, m.up_proj.bias]) if m.gate_proj.bias is not None else None
            self.layers.append(dict(
                ln1=blk.input_layernorm.weight, ln2=blk.post_attention_layernorm.weight,
                qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), qkv_b=qkv_b,
                q_norm=a.q_norm.weight if c.qk_norm else None, k_norm=a.k_norm.weight if c.qk_norm else None,
                o=a.o_proj.weight, o_b=a.o_proj.bias,
                gu=torch.cat([m.gate_proj.weight, m.up_proj.weight]), gu_b=gu_b,
                down=m.down_proj.weight, down_b=m.down_proj.bias))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, attn: AttnMeta, cache: KVCache,
                 logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cfg
        H, KV, D, eps = c.n_heads, c.n_kv_heads, c.head_dim, c.rms_norm_eps
        T = tokens.shape[0]
        x = self.model.model.embed_tokens(tokens)
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        half = D // 2
        for i, ly in enumerate(self.layers):  # index_select / index_copy_: the cheapest gathers on a CPU
            h = F.rms_norm(x, (x.shape[-1],), ly["ln1"], eps)
            qkv = F.linear(h, ly["qkv"], ly["qkv_b"]).view(T, H + 2 * KV, D)
            qk, v = qkv[:, :H + KV], qkv[:, H + KV:]
            if ly["q_norm"] is not None:
                qk = torch.cat([F.rms_norm(qk[:, :H], (D,), ly["q_norm"], eps),
                                F.rms_norm(qk[:, H:], (D,), ly["k_norm"], eps)], dim=1)
            qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
            kp, vp = cache.k_flat(i), cache.v_flat(i)
            kp.index_copy_(0, attn.write_slots, qk[:, H:])
            vp.index_copy_(0, attn.write_slots, v.contiguous())
            x = x + F.linear(packed_attention(qk[:, :H], kp, vp, attn), ly["o"], ly["o_b"])
            gate, up = F.linear(F.rms_norm(x, (x.shape[-1],), ly["ln2"], eps), ly["gu"], ly["gu_b"]).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, ly["down"], ly["down_b"])
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
        return self.model.lm_head(F.rms_norm(x, (x.shape[-1],), self.model.model.norm.weight, eps))


class ModelDrafter:
    def __init__(self, model: Transformer, cache: KVCache, blocks: BlockManager, device, max_positions: int):
        self.model, self.cache, self.blocks, self.device = model, cache, blocks, torch.device(device)
        self.forward = LeanForward(model, max_positions)
        self.kv_len = np.zeros(blocks.table.shape[0], np.int64)  # per table row: positions in the draft cache
        self.draft_ms = 0.0

    @staticmethod
    def scratch_tokens(depth: int, k: int) -> int:
        """Cache positions one request needs past its committed length while drafting: root + beam nodes."""
        return 1 + max(depth - 1, 0) * k

    def begin_step(self, rows: np.ndarray, kv_len: np.ndarray, tokens: list[list[int]]) -> None:
        """The batch about to draft: table rows, committed KV lengths (the root sits at kv_len) and every
        request's tokens (context + root)."""
        self._rows, self._kv_len, self._tokens = rows, kv_len, tokens
        self._scratch: np.ndarray | None = None

    def _forward(self, tokens: np.ndarray, rope_pos: np.ndarray, meta, logits_rows: np.ndarray | None) -> torch.Tensor:
        dev = self.device
        rows = None if logits_rows is None else torch.from_numpy(logits_rows).to(dev)
        logits = self.forward(torch.from_numpy(tokens).to(dev), torch.from_numpy(rope_pos).to(dev), meta, self.cache,
                              rows)
        return torch.log_softmax(logits.float(), dim=-1)

    def expand(self, forest: DraftForest, depth: int, rows: np.ndarray, parents: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        parents = np.asarray(parents, np.int64)
        if len(rows) == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        if len(rows) > 1 and (np.diff(rows) < 0).any():
            return in_request_order(self.expand, forest, depth, rows, parents, k)
        trow = self._rows[rows]
        kv = self._kv_len[rows]
        if depth == 1:
            start = self.kv_len[trow]
            n_new = kv + 1 - start
            toks = np.concatenate([np.asarray(self._tokens[r][s:], np.int64) for r, s in zip(rows, start, strict=True)])
            pos = np.concatenate([np.arange(s, e) for s, e in zip(start, kv + 1, strict=True)])
            meta = attn_meta(self.blocks, trow, kv + 1, n_new, pos, causal_qpos=pos, device=self.device)
            logp = self._forward(toks, pos, meta, np.cumsum(n_new) - 1)
            self.kv_len[trow] = kv + 1
        else:
            B, S = forest.token.shape
            if self._scratch is None:
                self._scratch = np.full((B, S), -1, np.int64)
            first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            count = np.diff(np.r_[first, len(rows)])
            j = np.arange(len(rows)) - np.repeat(first, count)        # index within the request's frontier
            base = kv + 1 + (depth - 2) * k
            write = base + j
            self._scratch[rows, parents] = write
            # Tree attention: each node sees the context and root (< kv + 1), itself and its ancestors.
            pair_q, pair_k = [np.arange(len(rows))], [write]
            cur = forest.parent[rows, parents].astype(np.int64)
            while (cur >= 0).any():
                live = np.nonzero(cur >= 0)[0]
                pair_q.append(live)
                pair_k.append(self._scratch[rows[live], cur[live]])
                cur[live] = forest.parent[rows[live], cur[live]]
            pk = np.concatenate(pair_k)
            if (pk < 0).any():
                raise RuntimeError("a frontier node's ancestor was never fed to the draft model")
            key_len = base[first] + count
            meta = attn_meta(self.blocks, trow[first], key_len, count, write, visible_len=kv[first] + 1,
                             pair_q=np.concatenate(pair_q), pair_k=pk, device=self.device)
            toks = forest.token[rows, parents]
            logp = self._forward(toks, kv + depth - 1, meta, None)
        lp, tok = logp.topk(k, dim=-1)
        return tok.cpu().numpy().astype(np.int64), lp.cpu().numpy()

    def prefill(self, meta, tokens: torch.Tensor, positions: torch.Tensor, **_) -> None:
        """Write the draft's KV of a prefill chunk (same metadata as the target's prefill)."""
        self.forward(tokens, positions, meta, self.cache, tokens.new_zeros(0))

    def after_verify(self, rows: np.ndarray, kv: np.ndarray, accept_index: np.ndarray) -> None:
        """A standalone draft reads nothing of the target's forward."""



class Eagle3Drafter:
    """An EAGLE-3 head (model.Eagle3Head) behind the same Drafter protocol as ModelDrafter.

    The head's cache holds one entry per "pair" (target feature of position t, token at t + 1) at position t, so a
    request whose root sits at kv_len has pairs 0..kv_len-1 once its context is fed. The target records its
    captured layers (Transformer.capture_layers) on every forward; the engine hands them over after a prefill
    (`prefill`: the chunk's positions) and after a verify (`after_verify`: the root and the accepted nodes, which
    become positions kv_len..kv_len+a). They wait in `_pending` until the next draft:
    - depth 1: each request feeds its pending pairs (causal, ragged: the whole prompt after a prefill, a + 1 pairs
      after a verify); the last pair (feature of kv_len - 1, the root) gives the root's children and its output is
      the feature of the root's children;
    - depth d >= 2: each frontier node is fed as (output of the pass that drafted it, its token) at RoPE position
      kv_len + d - 2, written to scratch past the committed pairs (kv_len + (d-2)*k + j), attending to the
      committed pairs, its ancestors' scratch entries and itself; its output feeds its own children.
    Scratch never exceeds ModelDrafter.scratch_tokens, which the engine reserves."""

    scratch_tokens = staticmethod(ModelDrafter.scratch_tokens)

    def __init__(self, head: Eagle3Head, target: Transformer, cache: KVCache, blocks: BlockManager, device):
        tc, width = target.cfg, head.fc.in_features // len(head.aux_layers)
        if max(head.aux_layers) >= tc.n_layers or width != tc.hidden_size:
            raise ExecError(f"the EAGLE-3 head reads layers {list(head.aux_layers)} of a {width}-wide target; this "
                            f"target has {tc.n_layers} layers of width {tc.hidden_size}", field="eagle_config")
        self.head, self.target, self.cache, self.blocks = head, target, cache, blocks
        self.device = torch.device(device)
        target.capture_layers = head.aux_layers
        n_rows = blocks.table.shape[0]
        self.kv_len = np.zeros(n_rows, np.int64)  # the engine's view (ModelDrafter protocol); unused here
        self.fed = np.zeros(n_rows, np.int64)     # per table row: pairs in the head's cache
        self._pending: list[list[torch.Tensor]] = [[] for _ in range(n_rows)]  # features of positions fed..
        self.draft_ms = 0.0

    def _add_pending(self, rows: np.ndarray, feats: torch.Tensor, counts: np.ndarray) -> None:
        for r, f in zip(rows.tolist(), torch.split(feats, counts.tolist()), strict=True):
            self._pending[r].append(f)

    def prefill(self, meta, tokens: torch.Tensor, positions: torch.Tensor, rows=None, start=None, n=None) -> None:
        """Keep the chunk's target features (rows/start/n: the chunks' table rows, first positions and lengths)."""
        rows, start, n = np.asarray(rows, np.int64), np.asarray(start, np.int64), np.asarray(n, np.int64)
        fresh = rows[start == 0]  # a new (or resumed) request: its cache starts empty
        self.fed[fresh] = 0
        for r in fresh.tolist():
            self._pending[r] = []
        self._add_pending(rows, self.target.aux_hidden, n)

    def after_verify(self, rows: np.ndarray, kv: np.ndarray, accept_index: np.ndarray) -> None:
        """Keep the target features of each request's root and accepted nodes (accept_index: their packed rows)."""
        keep = accept_index >= 0
        idx = torch.from_numpy(accept_index[keep]).to(self.device)
        self._add_pending(np.asarray(rows, np.int64), self.target.aux_hidden.index_select(0, idx), keep.sum(1))

    def begin_step(self, rows: np.ndarray, kv_len: np.ndarray, tokens: list[list[int]]) -> None:
        self._rows, self._kv_len, self._tokens = rows, kv_len, tokens
        self._scratch: np.ndarray | None = None
        self._out: torch.Tensor | None = None   # [B, S, hidden]: each expanded node's output
        self._root_out: torch.Tensor | None = None  # [B, hidden]

    def expand(self, forest: DraftForest, depth: int, rows: np.ndarray, parents: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        parents = np.asarray(parents, np.int64)
        if len(rows) == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        if len(rows) > 1 and (np.diff(rows) < 0).any():
            return in_request_order(self.expand, forest, depth, rows, parents, k)
        dev, trow, kv = self.device, self._rows[rows], self._kv_len[rows]
        B, S = forest.token.shape
        if depth == 1:
            start = self.fed[trow]
            n_new = kv - start
            feats = torch.cat([f for r in trow.tolist() for f in self._pending[r]])
            if feats.shape[0] != int(n_new.sum()):
                raise RuntimeError("the EAGLE-3 head's pending target features do not match the requests' contexts")
            toks = np.concatenate([np.asarray(self._tokens[r][s + 1:e + 1], np.int64)
                                   for r, s, e in zip(rows, start, kv, strict=True)])
            pos = np.concatenate([np.arange(s, e) for s, e in zip(start, kv, strict=True)])
            meta = attn_meta(self.blocks, trow, kv, n_new, pos, causal_qpos=pos, device=dev)
            logits, out = self.head.forward_packed(feats, torch.from_numpy(toks).to(dev), torch.from_numpy(pos).to(dev),
                                                   meta, self.cache, torch.from_numpy(np.cumsum(n_new) - 1).to(dev))
            self.fed[trow] = kv
            for r in trow.tolist():
                self._pending[r] = []
            self._root_out = out.new_zeros(B, out.shape[-1])
            self._root_out[torch.from_numpy(rows).to(dev)] = out
            self._out = out.new_zeros(B, S, out.shape[-1])
        else:
            if self._scratch is None:
                self._scratch = np.full((B, S), -1, np.int64)
            first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            count = np.diff(np.r_[first, len(rows)])
            j = np.arange(len(rows)) - np.repeat(first, count)        # index within the request's frontier
            base = kv + (depth - 2) * k
            write = base + j
            self._scratch[rows, parents] = write
            # Tree attention: each node sees the committed pairs (< kv), itself and its ancestors.
            pair_q, pair_k = [np.arange(len(rows))], [write]
            up = forest.parent[rows, parents].astype(np.int64)
            cur = up.copy()
            while (cur >= 0).any():
                live = np.nonzero(cur >= 0)[0]
                pair_q.append(live)
                pair_k.append(self._scratch[rows[live], cur[live]])
                cur[live] = forest.parent[rows[live], cur[live]]
            pk = np.concatenate(pair_k)
            if (pk < 0).any():
                raise RuntimeError("a frontier node's ancestor was never fed to the EAGLE-3 head")
            meta = attn_meta(self.blocks, trow[first], base[first] + count, count, write, visible_len=kv[first],
                             pair_q=np.concatenate(pair_q), pair_k=pk, device=dev)
            rt, up_t = torch.from_numpy(rows).to(dev), torch.from_numpy(up).to(dev)
            # the feature of a node is the output of the pass that drafted it: its parent's (the root's at depth 2)
            h = torch.where((up_t >= 0)[:, None], self._out[rt, up_t.clamp(min=0)], self._root_out[rt])
            toks = torch.from_numpy(forest.token[rows, parents].astype(np.int64)).to(dev)
            logits, out = self.head.forward_packed(h, toks, torch.from_numpy(kv + depth - 2).to(dev), meta,
                                                   self.cache)
            self._out[rt, torch.from_numpy(parents).to(dev)] = out
        lp, tok = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        return tok.cpu().numpy().astype(np.int64), lp.cpu().numpy()
