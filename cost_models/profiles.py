"""Readers for kernel profiles, all turned into one OpTable the fitter works on.

Formats (detected from the header):
- vidur_mlp:   Vidur per-operator CSV (one layer's linear and element-wise ops, ms, by num_tokens and TP);
- vidur_attn:  Vidur attention CSV (`time_stats.attn_{prefill,decode}.*`, by batch, chunk, KV size);
- llmservingsim: LLMServingSim v0 per-layer CSV (`layer_name,input,kv_cache,tp_size,latency(ns)`); the model shape
                 comes from the file name (e.g. Llama-3.1-8B_tp1_layers.csv) or `model=`;
- echo:        our profiler's CSV (echosim profile), one row per timed full forward (see PROFILE_COLUMNS);
- all-reduce:  Vidur all-reduce CSV, read by read_allreduce (not an OpTable).

An OpTable has one row per timed or modelled operator. Each row belongs to an observation (one point of the
grid: a token count at a TP degree, or one full forward); the observation's measured time is what the fit and
the error statistics compare against: the per-layer time for per-operator profiles, the forward for ours.
"""

from __future__ import annotations

import csv
import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cost_models.errors import CostModelError
from cost_models.specs import ModelSpec, load_model, model_from_config

KINDS = ("gemm", "elem", "attn", "step")

# our profiler's columns, in order (echosim profile writes them; read_profile needs all but the last:
# `timing`, how time_ms was measured (wall, cuda_events or cuda_graph), came later)
PROFILE_COLUMNS = [
    "model", "device", "dtype", "batch_size", "tokens_per_seq", "kv_len", "num_tokens", "time_ms", "time_ms_p10",
    "time_ms_p90", "repeats", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "intermediate_size", "vocab_size", "timing",
]

VIDUR_MLP_SHAPE = ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp", "num_tokens",
                   "num_tensor_parallel_workers"]
VIDUR_MLP_OPS = ["input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
                 "mlp_up_proj", "mlp_act", "mlp_down_proj", "add"]
VIDUR_ATTN_COLS = ["time_stats.attn_prefill.median", "time_stats.attn_decode.median", "n_embd", "n_q_head",
                   "n_kv_head", "num_tensor_parallel_workers", "batch_size", "prefill_chunk_size", "kv_cache_size",
                   "is_prefill"]
# torch's scaled_dot_product_attention as the LLMServingSim v0 layer profiles time it: 64-row query tiles describe
# it (Llama-3.1-70B TP4 fitted alone: 9.6% median / 17.9% P90 against 12.0% / 27.1% with 128-row tiles; the same
# test on vLLM's FlashAttention prefill rows picks 128: P90 3.8% against 15.6%)
SDPA_Q_TILE = 64.0
LSS_COLS = ["layer_name", "input", "kv_cache", "tp_size", "latency(ns)"]
ALLREDUCE_COLS = ["time_stats.all_reduce.median", "num_workers", "size"]


@dataclass
class OpTable:
    """Column arrays, one entry per operator row; obs_* arrays, one entry per observation."""

    path: str
    fmt: str
    model_name: str
    op_obs: np.ndarray  # observation index of each row
    op_name: np.ndarray  # str
    op_kind: np.ndarray  # one of KINDS
    count: np.ndarray  # how many times the op runs in the observation (layers)
    tokens: np.ndarray
    k: np.ndarray  # GEMM in / out features
    n: np.ndarray
    weight_copies: np.ndarray  # distinct weight matrices read (MoE experts touched)
    flop_mult: np.ndarray
    elem_bytes: np.ndarray  # element-wise bytes per token
    kv_tokens: np.ndarray
    qk_pairs: np.ndarray
    seqs: np.ndarray
    q_heads: np.ndarray
    kv_heads: np.ndarray
    head_dim: np.ndarray
    gqa_packed: np.ndarray  # attention kernel: 1 = a block holds a GQA group's query heads, 0 = one query head
    split_kv: np.ndarray  # attention kernel: 1 = keys split across the SMs (FlashDecoding / FlashInfer), 0 = not
    q_tile: np.ndarray  # attention kernel: query rows per thread block
    causal_skip: np.ndarray  # attention kernel: 1 = skips the key tiles a causal mask hides, 0 = explicit mask
    measured_ms: np.ndarray  # NaN when the op is not timed on its own
    obs_measured_ms: np.ndarray  # per observation: the time the fit matches (layer sum, or forward)
    obs_tokens: np.ndarray
    obs_tp: np.ndarray
    obs_split: np.ndarray  # value the held-out split alternates on (token count, or KV length)
    gemm_kernels_per_layer: int = 4
    elem_kernels_per_layer: int = 5

    @property
    def n_obs(self) -> int:
        return len(self.obs_measured_ms)

    def kinds(self) -> set[str]:
        return set(self.op_kind.tolist())

    def subset(self, obs_mask: np.ndarray) -> OpTable:
        """The rows of the selected observations, renumbered."""
        keep_obs = np.flatnonzero(obs_mask)
        remap = -np.ones(self.n_obs, dtype=np.int64)
        remap[keep_obs] = np.arange(len(keep_obs))
        rows = obs_mask[self.op_obs]
        kw = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if name.startswith("obs_"):
                kw[name] = v[keep_obs]
            elif isinstance(v, np.ndarray):
                kw[name] = v[rows]
            else:
                kw[name] = v
        kw["op_obs"] = remap[self.op_obs[rows]]
        return OpTable(**kw)


def concat(tables: list[OpTable]) -> OpTable:
    if len(tables) == 1:
        return tables[0]
    kw, offset = {}, 0
    obs = []
    for t in tables:
        obs.append(t.op_obs + offset)
        offset += t.n_obs
    for name in OpTable.__dataclass_fields__:
        v0 = getattr(tables[0], name)
        if name == "op_obs":
            kw[name] = np.concatenate(obs)
        elif isinstance(v0, np.ndarray):
            kw[name] = np.concatenate([getattr(t, name) for t in tables])
        elif name in ("path", "fmt", "model_name"):
            kw[name] = "+".join(dict.fromkeys(str(getattr(t, name)) for t in tables))
        else:
            kw[name] = v0
    return OpTable(**kw)


class _Rows:
    """Accumulates operator rows; missing fields default to 0 (1 for count, copies, flop_mult, seqs)."""

    DEFAULTS = dict(count=1.0, tokens=0.0, k=0.0, n=0.0, weight_copies=1.0, flop_mult=1.0, elem_bytes=0.0,
                    kv_tokens=0.0, qk_pairs=0.0, seqs=1.0, q_heads=0.0, kv_heads=0.0, head_dim=0.0,
                    gqa_packed=0.0, split_kv=0.0, q_tile=128.0, causal_skip=1.0,
                    measured_ms=np.nan)

    def __init__(self):
        self.cols: dict[str, list] = {k: [] for k in ["op_obs", "op_name", "op_kind", *self.DEFAULTS]}

    def add(self, obs, name: str, kind: str, **vals):
        """obs and vals may be arrays (one row per element) or scalars."""
        obs = np.atleast_1d(np.asarray(obs))
        m = len(obs)
        self.cols["op_obs"].append(obs.astype(np.int64))
        self.cols["op_name"].append(np.full(m, name, dtype=object))
        self.cols["op_kind"].append(np.full(m, kind, dtype=object))
        for key, default in self.DEFAULTS.items():
            v = vals.pop(key, default)
            self.cols[key].append(np.broadcast_to(np.asarray(v, dtype=np.float64), (m,)).copy())
        if vals:
            raise TypeError(f"unknown op fields {sorted(vals)}")

    def table(self, path, fmt, model_name, obs_measured, obs_tokens, obs_tp, obs_split, **kw) -> OpTable:
        arrays = {k: np.concatenate(v) for k, v in self.cols.items()}
        arrays["op_name"] = arrays["op_name"].astype(str)
        arrays["op_kind"] = arrays["op_kind"].astype(str)
        return OpTable(path=str(path), fmt=fmt, model_name=model_name, **arrays,
                       obs_measured_ms=np.asarray(obs_measured, np.float64),
                       obs_tokens=np.asarray(obs_tokens, np.float64), obs_tp=np.asarray(obs_tp, np.float64),
                       obs_split=np.asarray(obs_split, np.float64), **kw)


def _read_csv(path: str | Path, required: list[str]):
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise CostModelError(f"cannot read CSV: {exc}", path=str(path)) from None
    for col in required:
        if col not in df.columns:
            raise CostModelError(f"missing column '{col}'", path=str(path), field=col)
    if len(df) == 0:
        raise CostModelError("no rows", path=str(path))
    return df


def _open_text(path: str | Path):
    """A profile as text: plain, or gzip-compressed (.gz; the shipped profiles are)."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt")
    return open(path)


def detect_format(path: str | Path) -> str:
    try:
        with _open_text(path) as fh:
            header = fh.readline()
    except OSError as exc:
        raise CostModelError(f"cannot read profile: {exc}", path=str(path)) from None
    cols = {c.strip() for c in header.split(",")}
    if "time_stats.all_reduce.median" in cols:
        return "allreduce"
    if "layer_name" in cols:
        return "llmservingsim"
    if any(c.startswith("time_stats.attn_prefill") or c.startswith("time_stats.attn_decode") for c in cols):
        return "vidur_attn"
    if any(c.startswith("time_stats.") for c in cols):
        return "vidur_mlp"
    if "time_ms" in cols and "num_tokens" in cols:
        return "echo"
    if {"prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us"} <= cols:
        return "lss_attn"
    raise CostModelError("unrecognized profile format (expected a Vidur, LLMServingSim or echosim profile CSV; "
                    f"header starts {header[:80]!r})", path=str(path))


def read_profile(path: str | Path, model: str | ModelSpec | None = None) -> OpTable:
    fmt = detect_format(path)
    if fmt == "vidur_mlp":
        return read_vidur_mlp(path)
    if fmt == "vidur_attn":
        return read_vidur_attention(path)
    if fmt == "llmservingsim":
        return read_llmservingsim(path, model)
    if fmt == "echo":
        return read_echo_profile(path)
    if fmt == "lss_attn":
        return read_lss_attention(path, model)
    raise CostModelError("an all-reduce profile, not an operator profile (use read_allreduce)", path=str(path))


def read_vidur_mlp(path: str | Path) -> OpTable:
    cols = VIDUR_MLP_SHAPE + [f"time_stats.{op}.median" for op in VIDUR_MLP_OPS]
    df = _read_csv(path, cols)
    t = df["num_tokens"].to_numpy(np.float64)
    tp = df["num_tensor_parallel_workers"].to_numpy(np.float64)
    hq_all, hkv_all = df["n_head"].to_numpy(np.float64), df["n_kv_head"].to_numpy(np.float64)
    d = df["n_embd"].to_numpy(np.float64)
    f = df["n_expanded_embd"].to_numpy(np.float64) / tp
    gated = df["use_gated_mlp"].astype(str).str.lower().eq("true").to_numpy()
    hd = d / hq_all
    hq, hkv = hq_all / tp, np.maximum(hkv_all / tp, 1.0)
    obs = np.arange(len(df))
    r = _Rows()
    up = np.where(gated, 2.0, 1.0)
    specs = {
        "input_layernorm": ("elem", dict(elem_bytes=2 * 2 * d)),
        "attn_pre_proj": ("gemm", dict(k=d, n=(hq + 2 * hkv) * hd)),
        "attn_rope": ("elem", dict(elem_bytes=2 * 2 * (hq + hkv) * hd)),
        "attn_post_proj": ("gemm", dict(k=hq * hd, n=d)),
        "post_attention_layernorm": ("elem", dict(elem_bytes=2 * 2 * d)),
        "mlp_up_proj": ("gemm", dict(k=d, n=up * f)),
        "mlp_act": ("elem", dict(elem_bytes=2 * (up + 1) * f)),
        "mlp_down_proj": ("gemm", dict(k=f, n=d)),
        "add": ("elem", dict(elem_bytes=2 * 3 * d)),
    }
    total = np.zeros(len(df))
    for op, (kind, vals) in specs.items():
        ms = df[f"time_stats.{op}.median"].to_numpy(np.float64)
        total += ms
        r.add(obs, op, kind, tokens=t, measured_ms=ms, **vals)
    name = Path(path).name.replace("_mlp.csv", "")
    return r.table(path, "vidur_mlp", name, total, t, tp, t, gemm_kernels_per_layer=4, elem_kernels_per_layer=5)


def read_vidur_attention(path: str | Path) -> OpTable:
    df = _read_csv(path, VIDUR_ATTN_COLS)
    pre = df["is_prefill"].astype(str).str.lower().eq("true").to_numpy()
    tp = df["num_tensor_parallel_workers"].to_numpy(np.float64)
    hq_all, hkv_all = df["n_q_head"].to_numpy(np.float64), df["n_kv_head"].to_numpy(np.float64)
    hd = df["n_embd"].to_numpy(np.float64) / hq_all
    b = df["batch_size"].to_numpy(np.float64)
    chunk = df["prefill_chunk_size"].to_numpy(np.float64)
    # prefill: KV of the one sequence, the chunk included; decode: KV of the whole batch (per sequence: kv / batch)
    kv = df["kv_cache_size"].to_numpy(np.float64)
    ms = np.where(pre, df["time_stats.attn_prefill.median"], df["time_stats.attn_decode.median"]).astype(np.float64)
    ok = np.isfinite(ms) & (ms > 0) & (pre | (kv >= b))  # a decode batch needs at least one key per sequence
    past = np.maximum(kv - chunk, 0)
    tokens = np.where(pre, chunk, b)
    seqs = np.where(pre, 1.0, b)
    kv_read = kv
    qk = np.where(pre, chunk * past + chunk * (chunk + 1) / 2, kv)
    sel = np.flatnonzero(ok)
    # FlashInfer packs GQA groups and splits KV; FLASH_ATTENTION (FlashAttention-2 paged) does neither
    backend = (df["attention_backend"].astype(str).str.upper() if "attention_backend" in df.columns
               else None)
    flashinfer = backend.str.contains("FLASHINFER").to_numpy(np.float64) if backend is not None else 0.0
    flashinfer = np.broadcast_to(flashinfer, kv.shape)
    r = _Rows()
    r.add(np.arange(len(sel)), "attention", "attn", tokens=tokens[sel], kv_tokens=kv_read[sel], qk_pairs=qk[sel],
          seqs=seqs[sel], q_heads=hq_all[sel] / tp[sel], kv_heads=np.maximum(hkv_all[sel] / tp[sel], 1.0),
          head_dim=hd[sel], gqa_packed=flashinfer[sel], split_kv=flashinfer[sel], measured_ms=ms[sel])
    name = Path(path).stem
    return r.table(path, "vidur_attn", name, ms[sel], tokens[sel], tp[sel], kv[sel])


def _model_from_filename(path: Path) -> str:
    stem = path.name.removesuffix(".gz").removesuffix(".csv")
    for sep in ("_tp", "_layers", "_attention"):
        if sep in stem:
            stem = stem.split(sep)[0]
    return stem


def read_llmservingsim(path: str | Path, model: str | ModelSpec | None = None) -> OpTable:
    """LLMServingSim v0 per-layer CSV (its llm-profile tool: Hugging Face modules in fp16 under record_function
    hooks, one prompt of `input` tokens after `kv_cache` cached ones). Its `attn` op is the hook around
    torch's scaled_dot_product_attention, i.e. a fused tiled kernel (the profile steps every 64 tokens and is
    fastest at multiples of 128: FlashAttention-2's 128 x 64 tiles), not Hugging Face's eager attention, which
    would write the 32-head score matrix (268 MB at 2048 tokens, 80 us at the datasheet bandwidth) and read it
    back several times where the whole call takes 177 us. One query head per block, no KV split (the row's
    defaults), 64-row query tiles (SDPA_Q_TILE)."""
    path = Path(path)
    df = _read_csv(path, LSS_COLS)
    spec = load_model(model if model is not None else _model_from_filename(path))
    piv = df.pivot_table(index=["input", "kv_cache", "tp_size"], columns="layer_name", values="latency(ns)",
                         aggfunc="median").reset_index()
    t = piv["input"].to_numpy(np.float64)
    kvc = piv["kv_cache"].to_numpy(np.float64)
    tp = piv["tp_size"].to_numpy(np.float64)
    d, hd = float(spec.hidden_size), float(spec.head_dim)
    hq, hkv = spec.num_heads / tp, np.maximum(spec.num_kv_heads / tp, 1.0)
    moe = "expert.w1" in piv.columns
    f = (spec.moe_intermediate_size if moe else spec.intermediate_size) / tp
    specs = {
        "input_layernorm": ("elem", dict(elem_bytes=2 * 2 * d)),
        "q_proj": ("gemm", dict(k=d, n=hq * hd)),
        "k_proj": ("gemm", dict(k=d, n=hkv * hd)),
        "v_proj": ("gemm", dict(k=d, n=hkv * hd)),
        "rope": ("elem", dict(elem_bytes=2 * 2 * (hq + hkv) * hd)),
        "attn": ("attn", dict(kv_tokens=kvc + t, qk_pairs=t * kvc + t * (t + 1) / 2, q_heads=hq, kv_heads=hkv,
                              head_dim=hd, q_tile=SDPA_Q_TILE)),
        "o_proj": ("gemm", dict(k=hq * hd, n=d)),
        "post_layernorm": ("elem", dict(elem_bytes=2 * 2 * d)),
        "gate_proj": ("gemm", dict(k=d, n=f)),
        "up_proj": ("gemm", dict(k=d, n=f)),
        "act_fn": ("elem", dict(elem_bytes=2 * 2 * f)),
        "down_proj": ("gemm", dict(k=f, n=d)),
        # Mixtral: the router, then ONE expert's w1/w3/w2 over all the tokens (how LLMServingSim v0 profiles it)
        "gate": ("gemm", dict(k=d, n=float(spec.num_experts or 1))),
        "expert.w1": ("gemm", dict(k=d, n=f)),
        "expert.w3": ("gemm", dict(k=d, n=f)),
        "expert.w2": ("gemm", dict(k=f, n=d)),
    }
    present = [op for op in specs if op in piv.columns]
    needed = {"input_layernorm", "post_layernorm", "o_proj"}
    for op in needed - set(present):
        raise CostModelError(f"missing layer '{op}' in column layer_name", path=str(path), field="layer_name")
    obs = np.arange(len(piv))
    r = _Rows()
    total = np.zeros(len(piv))
    n_gemm = n_elem = 0
    for op in present:
        kind, vals = specs[op]
        ms = piv[op].to_numpy(np.float64) / 1e6
        total += ms
        n_gemm += kind == "gemm"
        n_elem += kind == "elem"
        r.add(obs, op, kind, tokens=t, measured_ms=ms, **vals)
    return r.table(path, "llmservingsim", spec.name, total, t, tp, t, gemm_kernels_per_layer=n_gemm,
                   elem_kernels_per_layer=n_elem)


def _tp_from_filename(path: Path) -> float:
    m = re.search(r"(?:^|[_/])tp(\d+)", str(path))
    if m is None:
        raise CostModelError("cannot tell the TP degree: name the file <Model>_tp<N>_attention.csv",
                             path=str(path))
    return float(m.group(1))


def read_lss_attention(path: str | Path, model: str | ModelSpec | None = None) -> OpTable:
    """LLMServingSim's current attention profile (profiler/perf/<GPU>/<model>/<dtype>/tp<N>/attention.csv):
    one attention call over a prefill chunk (prefill_chunk new tokens after kv_prefill cached ones) batched with
    n_decode decode sequences of kv_decode keys each; time_us. vLLM v1's FlashAttention kernel: GQA packed (its
    decode time follows the KV heads, not the query heads), KV split in decode-only calls (a batch with a prefill
    chunk walks each sequence's keys in one block: a 32-token chunk over 4096 keys takes 97 us on the RTX PRO
    6000). Model and TP from the file name
    (<Model>_tp<N>_attention.csv) unless given."""
    path = Path(path)
    df = _read_csv(path, ["prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us"])
    spec = load_model(model if model is not None else _model_from_filename(path))
    tp = _tp_from_filename(path)
    chunk = df["prefill_chunk"].to_numpy(np.float64)
    past = df["kv_prefill"].to_numpy(np.float64)
    nd = df["n_decode"].to_numpy(np.float64)
    kvd = df["kv_decode"].to_numpy(np.float64)
    ms = df["time_us"].to_numpy(np.float64) / 1000.0
    ok = np.isfinite(ms) & (ms > 0) & ((chunk > 0) | (nd > 0))
    tokens = chunk + nd
    seqs = (chunk > 0) + nd
    kv = past + chunk + nd * kvd
    qk = chunk * past + chunk * (chunk + 1) / 2 + nd * kvd
    sel = np.flatnonzero(ok)
    hq, hkv = spec.num_heads / tp, max(spec.num_kv_heads / tp, 1.0)
    r = _Rows()
    r.add(np.arange(len(sel)), "attention", "attn", tokens=tokens[sel], kv_tokens=kv[sel], qk_pairs=qk[sel],
          seqs=seqs[sel], q_heads=hq, kv_heads=hkv, head_dim=float(spec.head_dim), gqa_packed=1.0,
          split_kv=(chunk[sel] == 0).astype(np.float64), measured_ms=ms[sel])
    split_key = np.where(nd[sel] > 0, kvd[sel], past[sel] + chunk[sel])
    return r.table(path, "lss_attn", spec.name, ms[sel], tokens[sel], np.full(len(sel), tp), split_key)


def model_ops(r: _Rows, obs, spec: ModelSpec, tp: float, tokens, kv_tokens, qk_pairs, seqs, lm_rows) -> None:
    """The operator rows of a full forward of `spec` (each layer op counted num_layers times, LM head, step)."""
    d, hd, L = float(spec.hidden_size), float(spec.head_dim), float(spec.num_layers)
    hq, hkv = spec.num_heads / tp, max(spec.num_kv_heads / tp, 1.0)
    f = spec.intermediate_size / tp
    r.add(obs, "qkv_proj", "gemm", count=L, tokens=tokens, k=float(spec.qkv_in()), n=(hq + 2 * hkv) * hd)
    r.add(obs, "o_proj", "gemm", count=L, tokens=tokens, k=hq * hd, n=d)
    r.add(obs, "gate_up_proj", "gemm", count=L, tokens=tokens, k=d, n=2 * f)
    r.add(obs, "down_proj", "gemm", count=L, tokens=tokens, k=f, n=d)
    r.add(obs, "elementwise", "elem", count=L, tokens=tokens,
          elem_bytes=2 * (4 * d + 2 * (hq + hkv) * hd + 3 * f + 6 * d))
    # echo_exec's forward_packed: scaled_dot_product_attention with an explicit mask (no causal tile skipping)
    r.add(obs, "attention", "attn", count=L, tokens=tokens, kv_tokens=kv_tokens, qk_pairs=qk_pairs, seqs=seqs,
          q_heads=hq, kv_heads=hkv, head_dim=hd, causal_skip=0.0)
    r.add(obs, "lm_head", "gemm", tokens=lm_rows, k=d, n=spec.vocab_size / tp)
    r.add(obs, "step", "step")


def read_echo_profile(path: str | Path) -> OpTable:
    df = _read_csv(path, PROFILE_COLUMNS[:-1])
    r = _Rows()
    first = df.iloc[0]
    spec = model_from_config({
        "name": str(first["model"]), "hidden_size": int(first["hidden_size"]),
        "num_hidden_layers": int(first["num_layers"]), "num_attention_heads": int(first["num_heads"]),
        "num_key_value_heads": int(first["num_kv_heads"]), "head_dim": int(first["head_dim"]),
        "intermediate_size": int(first["intermediate_size"]), "vocab_size": int(first["vocab_size"]),
    }, path=str(path))
    b = df["batch_size"].to_numpy(np.float64)
    tps = df["tokens_per_seq"].to_numpy(np.float64)
    kv = df["kv_len"].to_numpy(np.float64)
    tokens = b * tps
    obs = np.arange(len(df))
    model_ops(r, obs, spec, 1.0, tokens, b * (kv + tps), b * (tps * kv + tps * (tps + 1) / 2), b, tokens)
    ms = df["time_ms"].to_numpy(np.float64)
    return r.table(path, "echo", spec.name, ms, tokens, np.ones(len(df)), tokens)


@dataclass
class AllReduceProfile:
    path: str
    world_size: np.ndarray
    size_bytes: np.ndarray
    time_ms: np.ndarray  # median of the repeats
    min_ms: np.ndarray | None = None  # fastest repeat (no host-side launch jitter); None when not in the file


def read_allreduce(path: str | Path) -> AllReduceProfile:
    """Vidur all-reduce CSV; `size` is the buffer size in bytes (fp16 tokens x hidden x 2)."""
    df = _read_csv(path, ALLREDUCE_COLS)
    if "rank" in df.columns:
        df = df[df["rank"] == 0]
    mins = (df["time_stats.all_reduce.min"].to_numpy(np.float64) if "time_stats.all_reduce.min" in df.columns
            else None)
    return AllReduceProfile(str(path), df["num_workers"].to_numpy(np.int64), df["size"].to_numpy(np.float64),
                            df["time_stats.all_reduce.median"].to_numpy(np.float64), mins)


def write_profile(rows: list[dict], path: str | Path) -> None:
    """Our profile CSV (PROFILE_COLUMNS), as `echosim profile` writes it and read_echo_profile reads it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PROFILE_COLUMNS)
        w.writeheader()
        w.writerows(rows)
