"""Roofline step-time model: per layer, time = smooth-max(FLOPs / effective peak, bytes / effective bandwidth)
+ launch overheads, for the GEMMs, the element-wise ops, attention over the KV cache (GQA), the LM head, MoE experts
(the expected number of distinct experts the batch's tokens touch) and the tensor-parallel all-reduce.

RooflineParams.from_hardware gives the pure roofline of a datasheet (peak FLOP/s and HBM bandwidth, no launch
cost); the fitted model (cost_models/fitted.py) is this same code with parameters fitted to kernel profiles.

Every formula uses plain arithmetic only, so it evaluates on Python floats (one iteration in the simulator, a few
microseconds) and on NumPy arrays (thousands of candidate configurations in one call) alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from cost_models.errors import CostModelError
from cost_models.interface import Num, StepBatch, StepTime
from cost_models.specs import HardwareSpec, ModelSpec, load_hardware, load_model

FITTED_DIR = Path(__file__).parent / "fitted"
ALLREDUCE_FIT = FITTED_DIR / "h100_all_reduce.json"


def smax(a: Num, b: Num, p: float) -> Num:
    """Smooth maximum (p-norm): the roofline corner is rounded, as real kernels are; p -> inf is max(a, b)."""
    return (a**p + b**p) ** (1.0 / p)


def gemm_ms(tokens: Num, k: float, n: float, flop_per_ms: float, byte_per_ms: float, p: float, ramp_tokens: float,
            dtype_bytes: float = 2.0, weight_copies: Num = 1.0, flop_mult: float = 1.0) -> Num:
    """[tokens, k] x [k, n]. Compute side: 2 k n (tokens + ramp) FLOPs, the ramp standing for tile under-use at
    small row counts (a linear segment that does not pass through 0). Memory side: the weights (weight_copies of
    them, e.g. the distinct MoE experts touched) plus activations in and out. flop_mult: rows per token (MoE top-k)."""
    comp = 2.0 * k * n * flop_mult * (tokens + ramp_tokens) / flop_per_ms
    mem = dtype_bytes * (k * n * weight_copies + tokens * flop_mult * (k + n)) / byte_per_ms
    return smax(comp, mem, p)


def hmax(a: Num, b: Num) -> Num:
    """max() that works on floats and arrays alike (no NumPy dispatch on floats)."""
    return 0.5 * (a + b + abs(a - b))


HARD_P = 32.0  # the pure roofline's corner (RooflineParams' default smooth_p)
def coverage_weight(kv_tokens: Num, seqs: Num, cover_keys: float, cover_seqs: float, log_span: float) -> Num:
    """How far an attention call lies outside the profiles' range, 0..1: 0 inside (total keys <= cover_keys and
    sequences <= cover_seqs), rising linearly in log distance beyond the edge, 1 once the call is as many
    octaves past the edge as the profiles span inside it (log_span = ln(largest / smallest profiled keys)): the
    fit is trusted as far out again as its data reaches, no further. No profile (cover_keys <= 0): 1."""
    if cover_keys <= 0 or cover_seqs <= 0:
        return 1.0 + 0.0 * kv_tokens
    x = hmax(kv_tokens / cover_keys, seqs / cover_seqs)
    if isinstance(x, np.ndarray):
        return np.clip(np.log(np.maximum(x, 1.0)) / log_span, 0.0, 1.0)
    return 0.0 if x <= 1.0 else min(1.0, math.log(x) / log_span)


def hmin(a: Num, b: Num) -> Num:
    return 0.5 * (a + b - abs(a - b))


def attention_ms(tokens: Num, kv_tokens: Num, qk_pairs: Num, seqs: Num, q_heads: float, kv_heads: float,
                 head_dim: float, flop_per_ms: float, byte_per_ms: float, p: float, per_seq_ms: float,
                 key_ms: float = 0.0, units: float = 132.0, kv_block: float = 1.0, dtype_bytes: float = 2.0,
                 gqa_packed: Num = 1.0, split_kv: Num = 1.0, cover_keys: float = 0.0, cover_seqs: float = 0.0,
                 peak_byte_per_ms: float = 0.0, peak_flop_per_ms: float = 0.0, cover_log_span: float = 1.0,
                 q_tile: Num = 128.0, causal_skip: Num = 1.0) -> Num:
    """Attention of one layer (one TP shard): the smooth max of three bounds plus a per-sequence cost.
    - compute: QK^T and PV FLOPs over the query-key pairs (flop_per_ms: at most the datasheet peak);
    - memory: K and V of every key read once per sequence and KV head (GQA), plus Q in and O out (byte_per_ms: at
      most the datasheet bandwidth);
    - critical path: a thread block walks its keys at key_ms per key (one SM's streaming rate); blocks beyond
      `units` (the SM count) run in waves. A block is (sequence, head, q_tile-row query tile); head = KV head when the
      kernel packs a GQA group into one block (FlashInfer, FlashAttention-3: gqa_packed=1), else query head
      (FlashAttention-2 paged decode). A split-KV kernel (split_kv=1, FlashInfer / FlashDecoding) cuts each
      sequence's keys into enough chunks to fill the SMs. Keys per block round up to whole kv_block tiles. A
      sequence whose rows span several query tiles (a prefill chunk) is causal: its tiles walk fewer keys the
      earlier they sit (causal_skip=1: the kernel skips the tiles above the diagonal; 0: an explicit mask, every
      tile walks all keys), and the longest starts last once the blocks overflow one wave (tile_terms,
      critical_path_ms).
    Coverage rule: outside the profiles' range (coverage_weight w > 0, over cover_log_span) the fitted rates blend
    geometrically into
    the datasheet's (peak_byte_per_ms, the per-key time it implies (min_key_ns), peak_flop_per_ms):
    rate^(1-w) * datasheet^w, and the smooth maximum into the roofline's hard corner (HARD_P), geometrically.
    gqa_packed and split_kv are 0/1 (floats or arrays) so one call can mix kernels."""
    comp = 4.0 * qk_pairs * q_heads * head_dim / flop_per_ms
    mem = dtype_bytes * head_dim * (2.0 * kv_tokens * kv_heads + 2.0 * tokens * q_heads) / byte_per_ms
    if key_ms <= 0:  # pure roofline: no critical path
        return (comp**p + mem**p) ** (1.0 / p) + per_seq_ms * seqs
    heads = gqa_packed * kv_heads + (1.0 - gqa_packed) * q_heads
    group = gqa_packed * q_heads / kv_heads + 1.0 - gqa_packed  # a packed block holds the group's rows
    s1, splits, load, span, tail = tile_terms(tokens, seqs, heads, group, units, split_kv, q_tile, causal_skip)
    keys = -(-(kv_tokens / s1 / splits) // kv_block) * kv_block  # ceil to whole tiles
    serial = critical_path_ms(keys, key_ms, load, span, tail)
    if peak_byte_per_ms > 0:
        w = coverage_weight(kv_tokens, seqs, cover_keys, cover_seqs, cover_log_span)
        floor_ms = 2.0 * head_dim * dtype_bytes * units / peak_byte_per_ms
        serial = serial * hmin(1.0, floor_ms / key_ms) ** w
        mem = mem * hmin(1.0, byte_per_ms / peak_byte_per_ms) ** w
        if peak_flop_per_ms > 0:
            comp = comp * hmin(1.0, flop_per_ms / peak_flop_per_ms) ** w
        # and the rounded corner into the roofline's hard one (geometric, so time still grows with the keys)
        soft = (comp**p + mem**p + serial**p) ** (1.0 / p)
        hard = (comp**HARD_P + mem**HARD_P + serial**HARD_P) ** (1.0 / HARD_P)
        return soft ** (1.0 - w) * hard**w + per_seq_ms * seqs
    return (comp**p + mem**p + serial**p) ** (1.0 / p) + per_seq_ms * seqs


def tile_terms(tokens: Num, seqs: Num, heads: Num, group: Num, units: float, split_kv: Num,
               q_tile: Num = 128.0, causal_skip: Num = 1.0) -> tuple:
    """What the attention critical path takes from (tokens, sequences) alone: (sequences >= 1, KV splits, load,
    causal span, tail weight).
    A block is (sequence, head, q_tile-row query tile); `group` query rows per token share a block (a packed GQA
    group). A split-KV kernel cuts each sequence's keys into `splits` chunks to fill the `units` SMs. `load` is
    blocks x splits / units: the waves the blocks make, fractional. A sequence whose rows span n > 1 query tiles
    (a prefill chunk) is causal: tile m of n walks the cached keys plus the chunk up to its own rows, so the first
    tile walks `span` = t/s x (n-1)/n keys fewer than the last and the mean tile span/2 fewer (per split); a
    kernel that applies an explicit mask instead (causal_skip=0) walks every key in every tile (span 0).
    `tail` weighs the last tile's wait: 0 while the blocks fit one wave, 1 from one block more than the SMs hold
    (blocks start in grid order, each sequence's and head's tiles from the shortest to the longest, so once the
    blocks overflow a wave the longest tile is among the last to start)."""
    s1 = hmax(seqs, 1.0)
    rows = tokens * group
    blocks = heads * hmax(hmax(seqs, rows / q_tile), 1.0)
    splits = 1.0 + split_kv * (hmax(1.0, units / blocks) - 1.0)
    load = blocks * splits / units
    n = hmax(1.0, rows / (q_tile * s1))
    span = causal_skip * tokens / s1 * (n - 1.0) / n / splits
    tail = hmin(1.0, hmax(0.0, (load - 1.0) * units))
    return s1, splits, load, span, tail


def critical_path_ms(keys: Num, key_ms: float, load: Num, span: Num, tail: Num) -> Num:
    """The attention kernel's makespan from its blocks' walks: at least the longest block (keys, rounded to whole
    tiles), else the total walked keys spread over the SMs (the mean block walks span/2 fewer keys than the
    longest) plus the longest block's extra walk over the shortest once it starts last (tail). Blocks of equal
    walks (decode: span 0) give keys x key_ms x max(1, load), the fractional waves."""
    a = keys * key_ms
    b = ((keys - 0.5 * span) * load + span * tail) * key_ms
    return 0.5 * (a + b + abs(a - b))


def min_key_ns(head_dim: float, units: float, hbm_tbps: float, dtype_bytes: float = 2.0) -> float:
    """Physical floor of the critical path's time per key: one block reads a key's K and V (2 head_dim values);
    `units` blocks at once cannot stream faster than the datasheet bandwidth."""
    return 2.0 * head_dim * dtype_bytes * units / (hbm_tbps * 1e12) * 1e9


@dataclass
class RooflineParams:
    """Effective rates and overheads. Units in the names; rates are what a kernel achieves, not the datasheet."""

    hardware: str
    gemm_tflops: float
    gemm_gbps: float
    elem_gbps: float
    attn_tflops: float
    attn_gbps: float
    gemm_ramp_tokens: float = 0.0
    smooth_p: float = 32.0
    attn_smooth_p: float = 32.0
    gemm_launch_us: float = 0.0
    elem_launch_us: float = 0.0
    attn_launch_us: float = 0.0
    attn_per_seq_us: float = 0.0
    attn_key_ns: float = 0.0  # critical path per key of one attention thread block (0 = ignore)
    attn_units: float = 132.0  # thread blocks that run at once (one wave): the SM count (H100 SXM: 132)
    attn_kv_block: float = 1.0  # keys per KV tile the critical path walks whole (the fits use 64)
    attn_q_tile: float = 128.0  # query rows per thread block of the priced kernel (FlashAttention-2, FlashInfer)
    attn_causal_skip: bool = True  # the priced kernel skips the key tiles a causal mask hides (flash kernels do)
    # the attention kernel the model prices (the fit reads each profile's own kernel from the file):
    # FlashInfer as SGLang serves by default: GQA groups packed in one block, KV split across the SMs
    attn_gqa_packed: bool = True
    attn_split_kv: bool = True
    # the profiles' range: total keys and sequences of the largest profiled attention call (0 = no profile)
    attn_cover_keys: float = 0.0
    attn_cover_seqs: float = 0.0
    attn_cover_log_span: float = 2.772588722239781  # ln(largest / smallest profiled keys); default ln 16
    gemm_kernels_per_layer: int = 4  # fused qkv, o, gate+up, down
    elem_kernels_per_layer: int = 5  # 2 norms, rope, activation, residual add
    # world size -> [latency_us, algorithm bandwidth GB/s]: all-reduce time = latency + bytes / bandwidth
    allreduce: dict = field(default_factory=dict)
    # the same, fitted on the profile's fastest repeat per size (no host launch jitter): what a CUDA-graph
    # replay pays; used when cuda_graph is set
    allreduce_graph: dict = field(default_factory=dict)
    cuda_graph: bool = True  # serving engines capture decode steps in CUDA graphs (SGLang does up to batch 256)
    step_overhead_ms: float = 0.0  # per iteration: scheduling, sampling, syncs (profiles do not measure it)
    draft_depth_overhead_ms: float = 0.0  # per drafted depth: launch of the draft forward, top-k

    @classmethod
    def from_hardware(cls, hardware: str | HardwareSpec) -> RooflineParams:
        """The pure datasheet roofline: peak FLOP/s and HBM bandwidth, no launch cost. All-reduce from the H100 DGX
        fit (cost_models/fitted/h100_all_reduce.json) with its bandwidth scaled by the NVLink ratio, else the
        NVLink ring bound."""
        hw = load_hardware(hardware)
        gbps = hw.hbm_tbps * 1000.0
        out = cls(hardware=hw.name, gemm_tflops=hw.peak_bf16_tflops, gemm_gbps=gbps, elem_gbps=gbps,
                  attn_tflops=hw.peak_bf16_tflops, attn_gbps=gbps)
        out.allreduce = default_allreduce(hw)
        out.allreduce_graph = default_allreduce(hw, graph=True)
        out.attn_units = float(hw.sm_count)
        return out

    def scaled_to(self, hardware: str | HardwareSpec) -> RooflineParams:
        """The same efficiencies on other hardware: rates scale with the datasheet ratios."""
        dst_name = hardware.name if isinstance(hardware, HardwareSpec) else str(hardware)
        if dst_name == self.hardware:
            return self
        src, dst = load_hardware(self.hardware), load_hardware(hardware)
        if src.name == dst.name:
            return self
        c, m, n = (dst.peak_bf16_tflops / src.peak_bf16_tflops, dst.hbm_tbps / src.hbm_tbps,
                   dst.nvlink_gbps / src.nvlink_gbps)
        ar = {w: [lat, bw * n] for w, (lat, bw) in self.allreduce.items()}
        arg = {w: [lat, bw * n] for w, (lat, bw) in self.allreduce_graph.items()}
        # the per-SM streaming rate scales with the bandwidth per SM
        key_ns = self.attn_key_ns * (src.hbm_tbps / src.sm_count) / (dst.hbm_tbps / dst.sm_count)
        return replace(self, hardware=dst.name, allreduce_graph=arg, attn_key_ns=key_ns,
                       attn_units=float(dst.sm_count), gemm_tflops=self.gemm_tflops * c,
                       attn_tflops=self.attn_tflops * c,
                       gemm_gbps=self.gemm_gbps * m, elem_gbps=self.elem_gbps * m, attn_gbps=self.attn_gbps * m,
                       allreduce=ar)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["allreduce"] = {str(k): v for k, v in self.allreduce.items()}
        d["allreduce_graph"] = {str(k): v for k, v in self.allreduce_graph.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, path: str | None = None) -> RooflineParams:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise CostModelError(f"unknown parameter(s) {', '.join(unknown)}", path=path)
        try:
            out = cls(**d)
        except TypeError as exc:
            raise CostModelError(f"bad parameters: {exc}", path=path) from None
        out.allreduce = {int(k): [float(v[0]), float(v[1])] for k, v in (d.get("allreduce") or {}).items()}
        out.allreduce_graph = {int(k): [float(v[0]), float(v[1])]
                               for k, v in (d.get("allreduce_graph") or {}).items()}
        return out


def hardware_or_label(name: str) -> HardwareSpec:
    """The catalog entry, or a stand-in for a machine outside the catalog (fitted rates only, no datasheet)."""
    try:
        return load_hardware(name)
    except CostModelError:
        nan = float("nan")
        return HardwareSpec(name=name, peak_bf16_tflops=nan, hbm_tbps=nan, memory_gb=nan, nvlink_gbps=nan,
                            source="not in the catalog: fitted parameters only")


def default_allreduce(hw: HardwareSpec, graph: bool = False) -> dict:
    if ALLREDUCE_FIT.is_file():
        fit = json.loads(ALLREDUCE_FIT.read_text())
        ratio = hw.nvlink_gbps / float(fit["nvlink_gbps"])
        sizes = fit.get("world_sizes_graph", fit["world_sizes"]) if graph else fit["world_sizes"]
        return {int(w): [v["latency_us"], v["gbps"] * ratio] for w, v in sizes.items()}
    # ring all-reduce moves 2 (w-1)/w of the data over each GPU's one-way NVLink bandwidth
    return {w: [0.0, hw.nvlink_gbps / 2 * w / (2 * (w - 1))] for w in (2, 4, 8)}


# _Forward.kernel_constants's scalars, in order ("lm_c" stands for its three coefficients)
PACKED_FIELDS = ("layers", "fixed_ms", "elem_c", "p", "ramp", "experts", "topk", "pa_p", "attn_comp_c", "attn_kv_c",
                 "attn_q_c", "key_ms", "kv_block", "heads_blk", "group", "units", "split", "q_tile", "causal",
                 "seq_ms", "blend", "cover_keys", "cover_seqs", "cover_span", "key_ratio", "bw_ratio", "flop_ratio",
                 "tp", "ar_lat_ms", "ar_c", "lm_c", "lm_fixed_ms")


class _Forward:
    """Per-layer constants of one model at one TP degree, precomputed so each evaluation is a few float ops."""

    def __init__(self, model: ModelSpec, tp: int, prm: RooflineParams):
        if tp < 1 or model.num_heads % tp:
            raise CostModelError(f"TP degree {tp} must divide the {model.num_heads} attention heads of {model.name}")
        d, hd, b = model.hidden_size, model.head_dim, model.dtype_bytes
        self.layers, self.b, self.d = model.num_layers, b, d
        self.hq, self.hkv, self.hd = model.num_heads / tp, max(model.num_kv_heads / tp, 1.0), hd
        up_mult = 2 if model.gated_mlp else 1
        self.dense = [(model.qkv_in(), (self.hq + 2 * self.hkv) * hd), (self.hq * hd, d)]
        self.experts = model.num_experts
        if model.is_moe:
            f = model.moe_intermediate_size / tp
            self.topk = model.experts_per_token
            self.dense.append((d, model.num_experts))  # router
            self.moe = [(d, up_mult * f), (f, d)]
            act = self.topk * f
        else:
            f = model.intermediate_size / tp
            self.dense += [(d, up_mult * f), (f, d)]
            self.moe = []
            act = f
        # element-wise bytes per token: 2 norms (read+write d), rope on q and k, activation (read 2f, write f),
        # 2 residual adds (read 2d, write d)
        self.elem_bytes = b * (4 * d + 2 * (self.hq + self.hkv) * hd + (up_mult + 1) * act + 6 * d)
        self.lm = (d, model.vocab_size / tp)
        self.tp = tp
        self.set_params(prm)

    def set_params(self, prm: RooflineParams) -> None:
        b = self.b
        self.pc, self.bm = prm.gemm_tflops * 1e9, prm.gemm_gbps * 1e6  # per ms
        self.be = prm.elem_gbps * 1e6
        self.pa, self.ba = prm.attn_tflops * 1e9, prm.attn_gbps * 1e6
        self.p, self.pa_p, self.ramp = prm.smooth_p, prm.attn_smooth_p, prm.gemm_ramp_tokens
        self.fixed_ms = (prm.gemm_kernels_per_layer * prm.gemm_launch_us + prm.elem_kernels_per_layer
                         * prm.elem_launch_us + prm.attn_launch_us) / 1000.0
        self.seq_ms = prm.attn_per_seq_us / 1000.0
        self.key_ms, self.units, self.kv_block = prm.attn_key_ns / 1e6, prm.attn_units, prm.attn_kv_block
        self.q_tile, self.causal = prm.attn_q_tile, float(prm.attn_causal_skip)
        self.packed, self.split = float(prm.attn_gqa_packed), float(prm.attn_split_kv)
        self.cover_keys, self.cover_seqs = prm.attn_cover_keys, prm.attn_cover_seqs
        self.cover_span = max(prm.attn_cover_log_span, 1e-9)
        hw = hardware_or_label(prm.hardware)
        peak_gbps = hw.hbm_tbps * 1000.0  # NaN off the catalog: no blend
        self.blend = self.key_ms > 0 and peak_gbps == peak_gbps
        if self.blend:
            floor_ms = min_key_ns(self.hd, self.units, peak_gbps / 1000.0, b) / 1e6
            self.key_ratio = min(1.0, floor_ms / self.key_ms)
            self.bw_ratio = min(1.0, prm.attn_gbps / peak_gbps)
            self.flop_ratio = min(1.0, prm.attn_tflops / hw.peak_bf16_tflops)
        self.lm_fixed_ms = (prm.gemm_launch_us + prm.elem_launch_us) / 1000.0
        if self.tp > 1:
            table = prm.allreduce_graph if (prm.cuda_graph and prm.allreduce_graph) else prm.allreduce
            if self.tp not in table:
                raise CostModelError(f"no all-reduce parameters for TP {self.tp} (have: "
                                f"{', '.join(map(str, sorted(table))) or 'none'})")
            lat_us, gbps = table[self.tp]
            self.ar_lat_ms, self.ar_byte_per_ms = lat_us / 1000.0, gbps * 1e6
        else:
            self.ar_lat_ms, self.ar_byte_per_ms = 0.0, 1.0
        self._constants()

    def _constants(self) -> None:
        """Fold shapes and rates into per-GEMM coefficients: comp = c * (t + ramp), mem = m0 + m1 * t."""
        self._gemm_memo: dict = {}  # t -> _gemms_ms(t), for scalar t (cleared with the constants)
        self._lm_memo: dict = {}    # rows -> lm_head_ms(rows), for scalar rows
        self._shape_memo: dict = {}  # (t, seqs) -> what layers_scalar needs of them alone
        b = self.b
        self.dense_c = [(2.0 * k * n / self.pc, b * k * n / self.bm, b * (k + n) / self.bm) for k, n in self.dense]
        self.moe_c = [(2.0 * k * n / self.pc, b * k * n / self.bm, b * (k + n) / self.bm) for k, n in self.moe]
        k, n = self.lm
        self.lm_c = (2.0 * k * n / self.pc, b * k * n / self.bm, b * (k + n) / self.bm)
        self.elem_c = self.elem_bytes / self.be
        self.attn_comp_c = 4.0 * self.hq * self.hd / self.pa
        self.attn_kv_c = b * self.hd * 2.0 * self.hkv / self.ba
        self.attn_q_c = b * self.hd * 2.0 * self.hq / self.ba
        # critical-path blocks: per sequence, KV heads (packed GQA) or query heads, times q_tile-row query tiles
        self.heads_blk = self.packed * self.hkv + (1.0 - self.packed) * self.hq
        self.group = self.packed * self.hq / self.hkv + 1.0 - self.packed  # query rows per token in a block
        self.ar_c = self.d * b / self.ar_byte_per_ms

    def kernel_constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This forward's constants for a compiled pricer (echosim/sim/kernels.py): the scalars of PACKED_FIELDS in
        that order, and the dense and MoE GEMM coefficients, [n, 3] each (c, m0, m1), in the order _gemms_ms adds
        them. Constants a configuration does not use (the blend's ratios without a datasheet, MoE without experts)
        are 0: the compiled code takes the same branches as layers_scalar."""
        vals = {"blend": float(self.blend), "topk": float(getattr(self, "topk", 0)), "lm_c": None}
        out = [vals[f] if f in vals else float(getattr(self, f, 0.0)) for f in PACKED_FIELDS if f != "lm_c"]
        out[PACKED_FIELDS.index("lm_c"):PACKED_FIELDS.index("lm_c")] = list(self.lm_c)
        return (np.array(out, np.float64), np.array(self.dense_c, np.float64).reshape(-1, 3),
                np.array(self.moe_c, np.float64).reshape(-1, 3))

    def _gemms_ms(self, t: Num) -> Num:
        """One layer's launches, elementwise kernels and GEMMs over t tokens: depends on t alone."""
        p, inv_p, tr = self.p, 1.0 / self.p, t + self.ramp
        layer = self.fixed_ms + t * self.elem_c
        for c, m0, m1 in self.dense_c:
            layer = layer + ((c * tr) ** p + (m0 + m1 * t) ** p) ** inv_p
        if self.moe_c:
            e, k = self.experts, self.topk
            touched = e * (1.0 - (1.0 - k / e) ** t)  # expected distinct experts hit by t tokens
            for c, m0, m1 in self.moe_c:
                layer = layer + ((c * k * tr) ** p + (m0 * touched + m1 * k * t) ** p) ** inv_p
        return layer

    def layers_ms(self, t: Num, kv: Num, qk: Num, seqs: Num) -> Num:
        """All decoder layers of one forward over t tokens (0 tokens -> 0 ms)."""
        # a simulator prices the same few token counts millions of times: the GEMM part is memoized per scalar t
        # (the same value, bit for bit: the same operations in the same order, then attention added as before)
        if type(t) is float or type(t) is int:
            layer = self._gemm_memo.get(t)
            if layer is None:
                if len(self._gemm_memo) > 65536:
                    self._gemm_memo.clear()
                layer = self._gemm_memo[t] = self._gemms_ms(t)
        else:
            layer = self._gemms_ms(t)
        # attention: same formula as attention_ms, on the folded constants
        pa = self.pa_p
        comp = qk * self.attn_comp_c
        mem = kv * self.attn_kv_c + t * self.attn_q_c
        if self.key_ms > 0:
            s1, splits, load, span, tail = tile_terms(t, seqs, self.heads_blk, self.group, self.units, self.split,
                                                       self.q_tile, self.causal)
            blk = self.kv_block
            keys = -(-(kv / s1 / splits) // blk) * blk
            serial = critical_path_ms(keys, self.key_ms, load, span, tail)
            w = coverage_weight(kv, seqs, self.cover_keys, self.cover_seqs, self.cover_span) if self.blend else 0.0
            if isinstance(w, np.ndarray) or w > 0:  # outside the profiles' range: into the datasheet's rates
                serial = serial * self.key_ratio**w
                mem = mem * self.bw_ratio**w
                comp = comp * self.flop_ratio**w
                attn = (comp**pa + mem**pa + serial**pa) ** (1.0 / pa)
                hard = (comp**HARD_P + mem**HARD_P + serial**HARD_P) ** (1.0 / HARD_P)
                attn = attn ** (1.0 - w) * hard**w
            else:
                attn = (comp**pa + mem**pa + serial**pa) ** (1.0 / pa)
        else:
            attn = (comp**pa + mem**pa) ** (1.0 / pa)
        layer = layer + attn + self.seq_ms * seqs
        if self.tp > 1:  # after attention and after the MLP
            layer = layer + 2.0 * (self.ar_lat_ms + t * self.ar_c)
        return self.layers * layer * (t > 0)

    def _shape_terms(self, t: float, seqs: float) -> tuple:
        """What one forward's price takes from (tokens, sequences) alone, computed as layers_ms computes it."""
        layer = self._gemm_memo.get(t)
        if layer is None:
            if len(self._gemm_memo) > 65536:
                self._gemm_memo.clear()
            layer = self._gemm_memo[t] = self._gemms_ms(t)
        if self.key_ms > 0:
            s1, splits, load, span, tail = tile_terms(t, seqs, self.heads_blk, self.group, self.units, self.split,
                                                       self.q_tile, self.causal)
        else:
            s1, splits, load, span, tail = hmax(seqs, 1.0), 0.0, 0.0, 0.0, 0.0
        if len(self._shape_memo) > 65536:
            self._shape_memo.clear()
        terms = self._shape_memo[(t, seqs)] = (layer, t * self.attn_q_c, s1, splits, load, span, tail,
                                               self.seq_ms * seqs,
                                               seqs / self.cover_seqs if self.blend and self.cover_seqs > 0 else 0.0)
        return terms

    def layers_scalar(self, t: float, kv: float, qk: float, seqs: float) -> float:
        """layers_ms on Python floats, the same value bit for bit (the same operations in the same order) at a
        fraction of its cost: what depends on (t, seqs) alone is memoized, the rest is inlined (no helper calls,
        no type checks). The simulator prices every iteration through this."""
        terms = self._shape_memo.get((t, seqs))
        if terms is None:
            terms = self._shape_terms(t, seqs)
        layer, tq, s1, splits, load, span, tail, seq_term, seq_cover = terms
        pa = self.pa_p
        comp = qk * self.attn_comp_c
        mem = kv * self.attn_kv_c + tq
        if self.key_ms > 0:
            blk = self.kv_block
            keys = -(-(kv / s1 / splits) // blk) * blk
            a = keys * self.key_ms   # critical_path_ms, inlined
            b = ((keys - 0.5 * span) * load + span * tail) * self.key_ms
            serial = 0.5 * (a + b + abs(a - b))
            w = 0.0
            if self.blend:
                if self.cover_keys <= 0 or self.cover_seqs <= 0:
                    w = 1.0
                else:   # coverage_weight, inlined
                    a = kv / self.cover_keys
                    x = 0.5 * (a + seq_cover + abs(a - seq_cover))
                    w = 0.0 if x <= 1.0 else min(1.0, math.log(x) / self.cover_span)
            if w > 0:
                serial = serial * self.key_ratio**w
                mem = mem * self.bw_ratio**w
                comp = comp * self.flop_ratio**w
                attn = (comp**pa + mem**pa + serial**pa) ** (1.0 / pa)
                hard = (comp**HARD_P + mem**HARD_P + serial**HARD_P) ** (1.0 / HARD_P)
                attn = attn ** (1.0 - w) * hard**w
            else:
                attn = (comp**pa + mem**pa + serial**pa) ** (1.0 / pa)
        else:
            attn = (comp**pa + mem**pa) ** (1.0 / pa)
        layer = layer + attn + seq_term
        if self.tp > 1:
            layer = layer + 2.0 * (self.ar_lat_ms + t * self.ar_c)
        return self.layers * layer * (t > 0)

    def lm_head_ms(self, rows: Num) -> Num:
        if type(rows) is float or type(rows) is int:
            ms = self._lm_memo.get(rows)
            if ms is None:
                if len(self._lm_memo) > 65536:
                    self._lm_memo.clear()
                ms = self._lm_memo[rows] = self._lm_head_ms(rows)
            return ms
        return self._lm_head_ms(rows)

    def _lm_head_ms(self, rows: Num) -> Num:
        c, m0, m1 = self.lm_c
        p = self.p
        return ((((c * (rows + self.ramp)) ** p + (m0 + m1 * rows) ** p) ** (1.0 / p) + self.lm_fixed_ms)
                * (rows > 0))


class RooflineCostModel:
    """StepCostModel from a model (and optional draft model) on a hardware at a TP degree."""

    kind = "roofline"

    def __init__(self, model: str | ModelSpec, hardware: str | HardwareSpec | None = None, tp: int = 1,
                 draft: str | ModelSpec | None = None, params: RooflineParams | None = None,
                 draft_tp: int | None = None):
        self.model = load_model(model)
        if hardware is None:  # the parameters' own hardware (may be a machine outside the catalog), else H100
            hardware = hardware_or_label(params.hardware) if params is not None else "h100-sxm"
        self.hardware = load_hardware(hardware)
        self.draft = load_model(draft) if draft is not None else None
        self.tp = int(tp)
        self.params = (params or RooflineParams.from_hardware(self.hardware)).scaled_to(self.hardware)
        self._target = _Forward(self.model, self.tp, self.params)
        self._draft = _Forward(self.draft, draft_tp or self.tp, self.params) if self.draft else None

    def __repr__(self) -> str:
        draft = f", draft={self.draft.name}" if self.draft else ""
        return f"{type(self).__name__}({self.model.name}, {self.hardware.name}, tp={self.tp}{draft})"

    def step_time(self, batch: StepBatch) -> StepTime:
        tg = self._target
        verify = tg.layers_ms(batch.target_tokens, batch.target_kv_tokens, batch.target_qk_pairs,
                              batch.target_seqs)
        lm = tg.lm_head_ms(batch.target_lm_rows)
        overhead = self.params.step_overhead_ms + 0.0 * verify
        draft = 0.0 * verify
        rows = batch.draft_tokens
        depths = rows.shape[-1] if isinstance(rows, np.ndarray) else len(rows)
        if depths:
            if self._draft is None:
                raise CostModelError("the batch drafts tokens but the cost model has no draft model")
            dr = self._draft
            per = self.params.draft_depth_overhead_ms
            arr = isinstance(rows, np.ndarray)
            for i in range(depths):
                r = rows[..., i] if arr else rows[i]
                kv = batch.draft_kv_tokens[..., i] if arr else batch.draft_kv_tokens[i]
                qk = batch.draft_qk_pairs[..., i] if arr else batch.draft_qk_pairs[i]
                s = batch.draft_seqs[..., i] if arr else batch.draft_seqs[i]
                draft = draft + dr.layers_ms(r, kv, qk, s)
                lm = lm + dr.lm_head_ms(r)
                overhead = overhead + per * (r > 0)
        return StepTime(draft, verify, lm, overhead)

    def target_parts(self, tokens: float, kv: float, qk: float, seqs: float, lm_rows: float) -> tuple:
        """step_time of a batch that drafts nothing, on Python floats: (verify_ms, lm_head_ms, overhead_ms), the
        same values bit for bit (draft_ms is 0), without the StepBatch / StepTime round trip."""
        tg = self._target
        verify = tg.layers_scalar(tokens, kv, qk, seqs)
        return verify, tg.lm_head_ms(lm_rows), self.params.step_overhead_ms + 0.0 * verify

    def target_scalar_fns(self) -> tuple:
        """(layers_scalar, lm_head_ms) of the target forward: target_parts is
        (layers_scalar(tokens, kv, qk, seqs), lm_head_ms(lm_rows), params.step_overhead_ms + 0.0 * verify_ms), for a
        caller that evaluates it without the extra call (the simulator's per-iteration price)."""
        return self._target.layers_scalar, self._target.lm_head_ms

    def draft_depth_parts(self, rows: float, kv: float, qk: float, seqs: float) -> tuple:
        """step_time of a batch that only drafts one depth (no target tokens), on Python floats: (draft_ms,
        lm_head_ms, overhead_ms), the same values bit for bit."""
        if self._draft is None:
            raise CostModelError("the batch drafts tokens but the cost model has no draft model")
        tg, dr = self._target, self._draft
        verify = tg.layers_scalar(0.0, 0.0, 0.0, 0.0)   # an empty target forward: 0 ms
        return (0.0 * verify + dr.layers_scalar(rows, kv, qk, seqs), tg.lm_head_ms(0.0) + dr.lm_head_ms(rows),
                self.params.step_overhead_ms + 0.0 * verify + self.params.draft_depth_overhead_ms * (rows > 0))

    def verify_ms(self, tokens_total: Num, kv_tokens_total: Num, num_seqs: Num) -> Num:
        t = tokens_total
        s = np.maximum(num_seqs, 1) if isinstance(num_seqs, np.ndarray) else max(num_seqs, 1)
        qk = t * (kv_tokens_total / s) + t * (t / s + 1) / 2  # each sequence's tokens over its mean context
        tg = self._target
        return (tg.layers_ms(t, kv_tokens_total + t, qk, num_seqs) + tg.lm_head_ms(t)
                + self.params.step_overhead_ms)

    def ar_step_ms(self, batch_size: Num, context_len: Num) -> Num:
        return self.verify_ms(batch_size, batch_size * context_len, batch_size)
