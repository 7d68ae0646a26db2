"""Decoder-only transformer of the Llama / Qwen2 / Qwen3 families, written from their published architecture.

Architecture (one class, switches from the config): token embedding -> n_layers x [RMSNorm -> attention
(GQA, RoPE in the Hugging Face rotate_half layout, optional q/k/v bias (Qwen2), optional per-head q/k RMSNorm
(Qwen3)) -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head (tied to the embedding or
not). Parameter names equal the Hugging Face ones (`model.layers.0.self_attn.q_proj.weight`, ...), so an HF
safetensors state dict loads unchanged. Loading: `echo_exec.loader.load_model(dir, dtype=, device=)`; the
shipped byte-level pair is echo_exec/models/tiny-target and tiny-draft (tokenizer: echo_exec/tokenizer.py).

Forward API
-----------
1. Training / reference path, no cache, causal, positions 0..T-1:
       logits = model(tokens)        # tokens [B, T] long -> logits [B, T, V]
2. Engine path, a packed batch of new tokens from several requests, attending to a paged KV cache:
       logits = model.forward_packed(tokens, positions, attn, cache, logits_rows=None)
   - tokens    [T] long: the new tokens of all requests, concatenated request by request (prefill chunks,
               decode tokens, or the nodes of a draft tree in any topological order);
   - positions [T] long: the RoPE position of each token (context length + depth for a tree node);
   - attn      AttnMeta (build it with `make_attn_meta`), see below;
   - cache     KVCache, or None: then the keys are only the new tokens and "slots" index the packed [T];
   - logits_rows  optional [R] long: logits only for these packed rows ([R, V]); default all rows [T, V].
   Each call first WRITES the new tokens' K/V (after RoPE) into `attn.write_slots`, then each request's
   queries attend to the keys at `attn.gather_slots[b]` (its cached context AND its new tokens, just
   written) under the boolean mask `attn.mask[b]` (True = may attend). A tree verify therefore writes every
   node's K/V; the engine keeps the accepted path and reuses or overwrites the other slots
   (`KVCache.copy_slots(src, dst)` moves K/V between slots in every layer, e.g. to compact the accepted path).

Cache layout
------------
KVCache holds, per layer, `k[layer]` and `v[layer]` of shape [num_blocks, block_size, n_kv_heads, head_dim]
(dtype and device of the model). A slot is the flat index `block_id * block_size + offset`; `k_flat(layer)`
is the [num_blocks * block_size, n_kv_heads, head_dim] view that slots index. Block allocation (which blocks
a request owns) is the engine's business; the model only reads and writes slots. The pool is
zero-initialised, so padded gathers never read NaN.

AttnMeta (tensors on the model's device; B requests, T packed tokens, Tq = most new tokens of a request,
L = most keys of a request):
- write_slots  [T]        long: where each new token's K/V is written;
- gather_slots [B, L]     long: the slots of each request's keys (context, then new tokens), padded with 0;
- query_index  [B, Tq]    long: packed row of request b's t-th new token (padding points at row 0);
- out_index    [T]        long: for packed row i, its flat index b * Tq + t in the padded [B, Tq] layout;
- mask         [B, Tq, L] bool: True where query t of request b may attend key l (padding query rows
                          attend key 0 only, so no row is all-False);
- groups       optional: the same layout per group of requests with similar query counts (echo_exec.kv's
                          `attn_meta` splits a ragged batch so), each attended on its own (`packed_attention`).
`make_attn_meta(ctx_slots, new_slots, tree_masks)` builds it from per-request numpy arrays; `tree_masks[b]`
is the [n_new, n_new] bool ancestor-or-self mask among request b's new tokens (None = causal, for prefill
and decode). A row b need not be a whole request: it is any group of queries that share the same cached keys.
To expand a draft tree level by level, make each frontier node its own row whose context is the prefix's
slots plus its ancestors' slots (benchmarks/measure_tiny_pair.py, `build_tree`, does exactly this).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echo_exec.errors import ExecError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
EAGLE3_ARCH = "LlamaForCausalLMEagle3"  # SGLang's (and the EAGLE-3 checkpoints') name for the head


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0 = hidden_size // n_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", ...} or {"rope_type": "llama3", ...}
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (always), Llama/Qwen3 attention_bias
    o_bias: bool = False  # Llama/Qwen3 attention_bias
    mlp_bias: bool = False  # Llama mlp_bias
    qk_norm: bool = False  # Qwen3 per-head RMSNorm on q and k
    model_type: str = "llama"
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)  # other HF fields, written back unchanged by to_hf

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ExecError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @classmethod
    def from_hf(cls, cfg: dict | str | Path) -> ModelConfig:
        """From a Hugging Face config.json (path, or its parsed dict) of model_type llama, qwen2 or qwen3."""
        path = None
        if not isinstance(cfg, dict):
            path = str(cfg)
            try:
                cfg = json.loads(Path(cfg).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ExecError(f"cannot read config: {exc}", path=path) from None
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ExecError(f"model_type {mt!r} is not supported (one of {', '.join(SUPPORTED_MODEL_TYPES)})",
                            path=path, field="model_type")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ExecError(f"hidden_act {cfg['hidden_act']!r} is not supported (silu)", path=path,
                            field="hidden_act")
        if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or []):
            raise ExecError("sliding-window attention is not supported", path=path,
                            field="use_sliding_window")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            # transformers >= 5 nests rope settings in rope_parameters; older configs: rope_theta/scaling.
            rope = dict(cfg.get("rope_parameters") or {})
            rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            scaling = cfg.get("rope_scaling") or rope or None
            if scaling is not None:
                scaling = dict(scaling)
                kind = scaling.get("rope_type", scaling.get("type", "default"))
                if kind == "default":
                    scaling = None
                elif kind not in ("linear", "llama3"):
                    raise ExecError(f"rope scaling {kind!r} is not supported (default, linear, llama3)",
                                    path=path, field="rope_scaling")
                else:
                    scaling["rope_type"] = kind
            bias = bool(cfg.get("attention_bias", False))
            known = {"architectures", "model_type", "hidden_size", "num_attention_heads",
                     "num_key_value_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                     "head_dim", "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
                     "tie_word_embeddings", "attention_bias", "mlp_bias", "max_position_embeddings",
                     "bos_token_id", "eos_token_id", "hidden_act"}
            extra = {k: v for k, v in cfg.items() if k not in known}
            if cfg.get("architectures") == [EAGLE3_ARCH]:  # an EAGLE-3 head (Eagle3Head) keeps its name
                extra["architectures"] = [EAGLE3_ARCH]
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                n_layers=int(cfg["num_hidden_layers"]),
                n_heads=heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                intermediate_size=int(cfg["intermediate_size"]),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=True if mt == "qwen2" else bias,
                o_bias=False if mt == "qwen2" else bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)) if mt == "llama" else False,
                qk_norm=mt == "qwen3",
                model_type=mt,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                extra=extra,
            )
        except KeyError as exc:
            raise ExecError("missing field", path=path, field=exc.args[0]) from None

    def to_hf(self, path: str | Path | None = None) -> dict:
        """The Hugging Face config.json dict (written to `path` if given)."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        out = dict(self.extra)
        out.update({
            "architectures": self.extra.get("architectures", [arch[self.model_type]]),
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        })
        if self.model_type != "qwen2":
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type != "qwen2" and self.qkv_bias != self.o_bias:
            raise ExecError(f"{self.model_type} has one attention_bias flag for q/k/v and o")
        if path is not None:
            Path(path).write_text(json.dumps(out, indent=2) + "\n")
        return out

    def num_params(self) -> int:
        d, f, kv = self.hidden_size, self.intermediate_size, self.n_kv_heads * self.head_dim
        q = self.n_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * per_layer + emb + d

    def as_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as the reference does) then cast back before the scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    sc = cfg.rope_scaling
    if sc is None:
        pass
    elif sc["rope_type"] == "linear":
        inv = inv / float(sc["factor"])
    elif sc["rope_type"] == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between.
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_len = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv = torch.where(medium, blended, scaled)
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin [..., head_dim] for `positions` in the rotate_half layout (both halves share frequencies)."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, D]; cos/sin [..., T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


@dataclass
class AttnGroup:
    """Some requests of a ragged batch, attended on their own: AttnMeta's fields over those requests alone (their
    own Tq and L), and `rows`, the packed rows of their tokens in out_index's order."""
    gather_slots: torch.Tensor  # [Bg, Lg] long
    query_index: torch.Tensor  # [Bg, Tqg] long
    out_index: torch.Tensor  # [Tg] long, into the group's [Bg, Tqg] layout
    mask: torch.Tensor  # [Bg, Tqg, Lg] bool
    rows: torch.Tensor  # [Tg] long


@dataclass
class AttnMeta:
    write_slots: torch.Tensor  # [T] long
    gather_slots: torch.Tensor  # [B, L] long
    query_index: torch.Tensor  # [B, Tq] long
    out_index: torch.Tensor  # [T] long
    mask: torch.Tensor  # [B, Tq, L] bool
    # a ragged batch (ECHO's trees: 1 to 24 tokens a request) split by query count, each group attended on its
    # own (`packed_attention`), so short trees are not padded to the longest: None = the whole batch at once
    groups: tuple[AttnGroup, ...] | None = None


def _attend(q, k, v, gather, query_index, mask, out_index) -> torch.Tensor:
    """q [T, H, D] packed; k, v [slots, KV, D]: each request's queries (query_index) against its keys (gather)
    under its mask, one batched call; [T', H*D] for the packed rows out_index selects."""
    B, L = gather.shape
    flat = gather.flatten()  # index_select on the flat slot axis is several times faster than advanced indexing
    kb = k.index_select(0, flat).view(B, L, *k.shape[1:]).transpose(1, 2)  # [B, KV, L, D]
    vb = v.index_select(0, flat).view(B, L, *v.shape[1:]).transpose(1, 2)
    qb = q.index_select(0, query_index.flatten()).view(B, -1, *q.shape[1:]).transpose(1, 2)
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], enable_gqa=True)
    return o.transpose(1, 2).flatten(2).flatten(0, 1).index_select(0, out_index)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttnMeta) -> torch.Tensor:
    """Attention of packed queries q [T, H, D] over the cache's k, v [slots, KV, D] as `attn` lays it out:
    [T, H * D] in packed order."""
    if attn.groups is None:
        return _attend(q, k, v, attn.gather_slots, attn.query_index, attn.mask, attn.out_index)
    o = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    for g in attn.groups:
        o.index_copy_(0, g.rows, _attend(q, k, v, g.gather_slots, g.query_index, g.mask, g.out_index))
    return o


def _tensor(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def ragged_groups(q_count: np.ndarray, key_len: np.ndarray, gather: np.ndarray, query_index: np.ndarray,
                  mask: np.ndarray, device="cpu") -> tuple[AttnGroup, ...] | None:
    """A ragged batch's requests grouped by query count (1, 2, 3-4, 5-8, ...: at most 2x padding in a group),
    each group cut to its own longest query count and key length; None when that saves less than a third of
    the padded batch's query-key pairs (each group is one more attention call a layer). In one padded call a
    batch of 2-token trees beside one 24-token tree computes 24 query rows for every request: 1.2-1.6x a
    uniform batch's time at batch 8-48 on the tiny target (docs/ADAPTIVE.md)."""
    B = len(q_count)
    if B < 2:
        return None
    Tq, L = query_index.shape[1], gather.shape[1]
    cls = np.ceil(np.log2(np.maximum(q_count, 1))).astype(np.int64)
    order = np.argsort(cls, kind="stable")
    cuts = np.flatnonzero(np.diff(cls[order])) + 1
    if not len(cuts):
        return None
    parts = np.split(order, cuts)
    tq = [int(q_count[p].max()) for p in parts]
    lk = [int(key_len[p].max()) for p in parts]
    if 3 * sum(len(p) * a * b for p, a, b in zip(parts, tq, lk, strict=True)) > 2 * B * Tq * L:
        return None
    groups = []
    for p, tqg, lg in zip(parts, tq, lk, strict=True):
        qi = query_index[p, :tqg]
        real = np.arange(tqg) < q_count[p][:, None]   # the group's real queries, in packed (row-major) order
        groups.append(AttnGroup(gather_slots=_tensor(gather[p, :lg], device), query_index=_tensor(qi, device),
                                out_index=_tensor(np.flatnonzero(real), device),
                                mask=_tensor(mask[p, :tqg, :lg], device), rows=_tensor(qi[real], device)))
    return tuple(groups)


def make_attn_meta(ctx_slots: list[np.ndarray], new_slots: list[np.ndarray],
                   tree_masks: list[np.ndarray | None] | None = None,
                   device: torch.device | str = "cpu") -> AttnMeta:
    """AttnMeta for B requests. ctx_slots[b]: slots of request b's cached context (its keys before this
    call, in any order: RoPE is already applied); new_slots[b]: the slots its new tokens are written to, in
    packed order; tree_masks[b]: [n_new, n_new] bool, True where new token i may attend new token j
    (None = causal)."""
    B = len(new_slots)
    tree_masks = tree_masks or [None] * B
    n_ctx = np.array([len(c) for c in ctx_slots], dtype=np.int64)
    n_new = np.array([len(s) for s in new_slots], dtype=np.int64)
    T, Tq, L = int(n_new.sum()), int(n_new.max(initial=1)), int((n_ctx + n_new).max(initial=1))
    gather = np.zeros((B, L), dtype=np.int64)
    mask = np.zeros((B, Tq, L), dtype=bool)
    query_index = np.zeros((B, Tq), dtype=np.int64)
    out_index = np.empty(T, dtype=np.int64)
    row = 0
    for b in range(B):
        c, n = int(n_ctx[b]), int(n_new[b])
        gather[b, :c] = ctx_slots[b]
        gather[b, c:c + n] = new_slots[b]
        mask[b, :n, :c] = True
        tm = tree_masks[b]
        mask[b, :n, c:c + n] = np.tril(np.ones((n, n), dtype=bool)) if tm is None else tm
        mask[b, n:, 0] = True  # padding query rows: attend something, so softmax stays finite
        query_index[b, :n] = np.arange(row, row + n)
        out_index[row:row + n] = b * Tq + np.arange(n)
        row += n
    write = np.concatenate([np.asarray(s, dtype=np.int64) for s in new_slots]) if B else np.zeros(0, np.int64)

    def t(a):
        return torch.from_numpy(a).to(device)

    return AttnMeta(t(write), t(gather), t(query_index), t(out_index), t(mask),
                    ragged_groups(n_new, n_ctx + n_new, gather, query_index, mask, device))


class KVCache:
    """Paged KV pool: k[layer], v[layer] of [num_blocks, block_size, n_kv_heads, head_dim].
    Slot = block * block_size + offset."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def k_flat(self, layer: int) -> torch.Tensor:
        return self.k[layer].view(self.num_slots, *self.k[layer].shape[2:])

    def v_flat(self, layer: int) -> torch.Tensor:
        return self.v[layer].view(self.num_slots, *self.v[layer].shape[2:])

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """K/V of slots `src` copied to slots `dst` in every layer (e.g. compacting an accepted tree path)."""
        for layer in range(len(self.k)):
            k, v = self.k_flat(layer), self.v_flat(layer)
            k[dst] = k[src]
            v[dst] = v[src]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [..., T, hidden] -> q [..., T, H, D], k and v [..., T, KV, D], RoPE applied to q and k."""
        c = self.cfg
        q = self.q_proj(x).unflatten(-1, (c.n_heads, c.head_dim))
        k = self.k_proj(x).unflatten(-1, (c.n_kv_heads, c.head_dim))
        v = self.v_proj(x).unflatten(-1, (c.n_kv_heads, c.head_dim))
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin):
        """Causal self-attention over x [B, T, hidden] (training / reference path)."""
        q, k, v = self.qkv(x, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).flatten(2))

    def forward_packed(self, x, cos, sin, attn: AttnMeta, cache: KVCache | None, layer: int):
        """x [T, hidden] packed; see the module docstring."""
        q, k, v = self.qkv(x, cos, sin)  # [T, H, D], [T, KV, D]
        if cache is not None:
            kp, vp = cache.k_flat(layer), cache.v_flat(layer)
            kp.index_copy_(0, attn.write_slots, k.to(kp.dtype))
            vp.index_copy_(0, attn.write_slots, v.to(vp.dtype))
            k, v = kp, vp
        return self.o_proj(packed_attention(q, k, v, attn))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE frequencies stay fp32 whatever the model dtype (a plain attribute, so .to(bf16) leaves it).
        self._inv_freq = rope_inv_freq(cfg)
        # EAGLE-3: forward_packed keeps the residual stream after these layers (0-based) in `aux_hidden`
        # ([T, len * hidden], concatenated in this order) for a head that reads them (Eagle3Head).
        self.capture_layers: tuple[int, ...] = ()
        self.aux_hidden: torch.Tensor | None = None

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Fresh weights for training: normal(0, std) matrices, residual output projections scaled by
        1/sqrt(2 n_layers), norms at 1, biases at 0."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            else:
                s = std
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    s = std / math.sqrt(2 * self.cfg.n_layers)
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * s)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (causal, positions 0..T-1)."""
        return self.forward_aux(tokens, ())[0]

    def forward_aux(self, tokens: torch.Tensor, layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [B, T] -> (logits [B, T, V], the residual stream after `layers` concatenated [B, T, n * hidden],
        None when no layers)."""
        x = self.model.embed_tokens(tokens)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = rope_cos_sin(self.inv_freq(x.device), pos, x.dtype)
        aux = {}
        for i, blk in enumerate(self.model.layers):
            x = x + blk.self_attn(blk.input_layernorm(x), cos, sin)
            x = x + blk.mlp(blk.post_attention_layernorm(x))
            if i in layers:
                aux[i] = x
        feats = torch.cat([aux[i] for i in layers], dim=-1) if layers else None
        return self.lm_head(self.model.norm(x)), feats

    def forward_packed(self, tokens: torch.Tensor, positions: torch.Tensor, attn: AttnMeta,
                       cache: KVCache | None, logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [T], positions [T] -> logits [T, V] (or [R, V] for `logits_rows`); see the module doc."""
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq(x.device), positions, x.dtype)
        aux = []
        for i, blk in enumerate(self.model.layers):
            x = x + blk.self_attn.forward_packed(blk.input_layernorm(x), cos, sin, attn, cache, i)
            x = x + blk.mlp(blk.post_attention_layernorm(x))
            if i in self.capture_layers:
                aux.append(x)
        if self.capture_layers:
            self.aux_hidden = torch.cat(aux, dim=-1)
        if logits_rows is not None:
            x = x[logits_rows]
        return self.lm_head(self.model.norm(x))


# ---- EAGLE-3 head ------------------------------------------------------------------------------------------------


class Eagle3Layer(nn.Module):
    """The head's one decoder layer. Its attention reads [RMSNorm(token embedding) ; RMSNorm(feature)], twice the
    hidden width; the residual stream starts from the feature itself."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, kv, hd = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.self_attn.q_proj = nn.Linear(2 * d, h * hd, bias=False)
        self.self_attn.k_proj = nn.Linear(2 * d, kv * hd, bias=False)
        self.self_attn.v_proj = nn.Linear(2 * d, kv * hd, bias=False)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def attn_input(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], dim=-1)

    def finish(self, attn_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Residual + attention, then residual + MLP: the layer's output (the next draft step's feature)."""
        r = h + attn_out
        return r + self.mlp(self.post_attention_layernorm(r))


class Eagle3Head(nn.Module):
    """An EAGLE-3 draft head (Li et al. 2025, "EAGLE-3"), in the layout SGLang's LlamaForCausalLMEagle3 loads
    (config.json + model.safetensors, architectures ["LlamaForCausalLMEagle3"], one layer).

    It drafts from the TARGET's states: `fc` maps the target's residual stream after the layers
    `aux_layers` (low, middle, high; concatenated) to hidden width. Row t of a draft pass reads the feature of
    position t and the embedding of the token at t + 1, sits at RoPE position t, and predicts the token at t + 2;
    its output (pre-norm) is the feature of the next draft step, which is fed back without `fc`. The embedding
    is the target's (SGLang replaces it with the target's at load; training keeps it frozen); `lm_head` is the
    head's own over `draft_vocab_size` tokens (the whole byte vocabulary here, so no d2t map).

    The target captures those layers with `Transformer.capture_layers = head.aux_layers` (forward_packed) or
    `forward_aux(tokens, head.aux_layers)` (training)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_layers != 1:
            raise ExecError(f"an EAGLE-3 head has one layer, not {cfg.n_layers}", field="num_hidden_layers")
        try:
            layers = tuple(int(i) for i in cfg.extra["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
        except (KeyError, TypeError, ValueError):
            raise ExecError("an EAGLE-3 head needs eagle_config.eagle_aux_hidden_state_layer_ids",
                            field="eagle_config") from None
        vocab = int(cfg.extra.get("draft_vocab_size") or cfg.vocab_size)
        if vocab != cfg.vocab_size:
            raise ExecError("a reduced draft vocabulary (d2t map) is not supported", field="draft_vocab_size")
        self.cfg, self.aux_layers = cfg, layers
        d = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.fc = nn.Linear(len(layers) * int(cfg.extra.get("target_hidden_size", d)), d, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self._inv_freq = rope_inv_freq(cfg)

    inv_freq = Transformer.inv_freq

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """Target features [..., n * target hidden] through fc; a draft output (hidden wide) unchanged."""
        return self.fc(h) if h.shape[-1] != self.cfg.hidden_size else h

    def forward_packed(self, h: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, attn: AttnMeta,
                       cache: KVCache | None, logits_rows: torch.Tensor | None = None):
        """Packed draft rows (as Transformer.forward_packed): h [T, n * target hidden] target features or [T, hidden]
        draft outputs, tokens [T] (the token after each feature's position), positions [T] -> (logits [R, V],
        outputs [R, hidden]) for `logits_rows` (default all rows)."""
        h = self.features(h)
        emb = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq(h.device), positions, h.dtype)
        ml = self.midlayer
        out = ml.finish(ml.self_attn.forward_packed(ml.attn_input(emb, h), cos, sin, attn, cache, 0), h)
        if logits_rows is not None:
            out = out[logits_rows]
        return self.lm_head(self.norm(out)), out

    def forward_train(self, feats: torch.Tensor, tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test: `steps` draft passes over a batch, each fed the previous pass's outputs.
        feats [B, T, n * target hidden] (positions 0..T-1); tokens [B, T + steps] (the sequence from position 0).
        Pass k's row t reads token t + k + 1 at RoPE position t + k and predicts token t + k + 2; it attends to
        pass 0's rows 0..t (the target-fed context) and to row t of passes 1..k (its own draft chain), exactly
        the keys it sees at inference. Returns the logits of each pass, [B, T, V]."""
        B, T = feats.shape[:2]
        ml, attn = self.midlayer, self.midlayer.self_attn
        h = self.fc(feats)
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        diag = torch.eye(T, dtype=torch.bool, device=h.device)
        keys, values, logits = [], [], []
        for k in range(steps):
            pos = torch.arange(k, T + k, device=h.device)
            cos, sin = rope_cos_sin(self.inv_freq(h.device), pos, h.dtype)
            q, kk, v = attn.qkv(ml.attn_input(self.embed_tokens(tokens[:, k + 1:k + 1 + T]), h), cos, sin)
            keys.append(kk)
            values.append(v)
            mask = torch.cat([causal] + [diag] * k, dim=1)  # [T, T * (k + 1)]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), torch.cat(keys, 1).transpose(1, 2),
                                               torch.cat(values, 1).transpose(1, 2), attn_mask=mask,
                                               enable_gqa=True)
            h = ml.finish(attn.o_proj(o.transpose(1, 2).flatten(2)), h)
            logits.append(self.lm_head(self.norm(h)))
        return logits
