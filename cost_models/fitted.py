"""Fitted step-time model: the roofline's shape with its rates and overheads fitted to kernel profiles by scipy
least squares (relative error), plus held-out statistics and the all-reduce fit.

    tables = [read_profile(p) for p in paths]
    result = fit_params(concat(tables), base=RooflineParams.from_hardware("h100-sxm"))
    model = FittedCostModel("qwen3-8b", params="cost_models/fitted/h100.json")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cost_models.errors import CostModelError
from cost_models.profiles import AllReduceProfile, OpTable
from cost_models.roofline import FITTED_DIR, RooflineCostModel, RooflineParams, attention_ms, gemm_ms, min_key_ns
from cost_models.specs import HardwareSpec, ModelSpec, load_hardware

DEFAULT_FIT = FITTED_DIR / "h100.json"
# FlashAttention walks the KV cache in tiles: with keys per sequence rounded up to 64, the Llama-3.1-70B attention
# profile fits with 2.8% median error instead of 7.2% (benchmarks/bench_cost_models.py)
FIT_KV_BLOCK = 64.0

# name -> (log-scaled?, lower, upper); rates in TFLOP/s and GB/s, times in us (ms for the step overhead)
PARAM_SPACE = {
    "gemm_tflops": (True, 1e-3, 5e3),
    "gemm_gbps": (True, 1e-1, 2e4),
    "gemm_ramp_tokens": (False, 0.0, 2000.0),
    "smooth_p": (True, 1.0, 32.0),
    "gemm_launch_us": (False, 0.0, 5e3),
    "elem_gbps": (True, 1e-1, 2e4),
    "elem_launch_us": (False, 0.0, 5e3),
    "attn_tflops": (True, 1e-3, 5e3),
    "attn_gbps": (True, 1e-1, 2e4),
    "attn_smooth_p": (True, 1.0, 32.0),
    "attn_launch_us": (False, 0.0, 5e3),
    "attn_per_seq_us": (False, 0.0, 1e3),
    "attn_key_ns": (False, 0.0, 1e3),
    "attn_units": (True, 8.0, 4096.0),  # fitted only off the catalog (a CPU has no SM count)
    "step_overhead_ms": (False, 0.0, 1e3),
}


def physical_bounds(base: RooflineParams, table: OpTable) -> dict[str, tuple[float, float]]:
    """Bounds a datasheet puts on the fitted rates: no rate above the hardware's peak FLOP/s or HBM bandwidth, no
    attention critical path faster than the SMs can stream K and V (cost_models.roofline.min_key_ns); empty for a
    machine outside the catalog."""
    try:
        hw = load_hardware(base.hardware)
    except CostModelError:
        return {}
    gbps = hw.hbm_tbps * 1000.0
    a = table.op_kind == "attn"
    hd = float(table.head_dim[a].min()) if a.any() else 128.0
    return {"gemm_tflops": (1e-3, hw.peak_bf16_tflops), "attn_tflops": (1e-3, hw.peak_bf16_tflops),
            "gemm_gbps": (1e-1, gbps), "elem_gbps": (1e-1, gbps), "attn_gbps": (1e-1, gbps),
            "attn_key_ns": (min_key_ns(hd, hw.sm_count, hw.hbm_tbps), 1e3)}


def tied_attention_rate(base: RooflineParams, table: OpTable):
    """The attention memory bound's rate as the critical path implies it: every SM streaming K and V at the rate
    one block does (2 head_dim values per key_ns), capped by the datasheet. A decode profile identifies key_ns (a
    batch of one at long context) but rarely the aggregate rate (the critical path explains the rest), which left
    free drifts to any value below it; tied, it stays the physical consequence of the measured per-SM rate.
    None for a machine outside the catalog (the rate stays a free parameter)."""
    try:
        hw = load_hardware(base.hardware)
    except CostModelError:
        return None
    a = table.op_kind == "attn"
    hd = float(table.head_dim[a].min()) if a.any() else 128.0
    cap = hw.hbm_tbps * 1000.0

    def rate(key_ns: float) -> float:
        return min(cap, 2.0 * hd * 2.0 * hw.sm_count / max(key_ns, 1e-9))  # bytes per ns = GB/s

    return rate


def coverage(table: OpTable) -> tuple[float, float, float]:
    """The largest attention call the table times (total keys, sequences) and the log span of its keys,
    ln(largest / smallest); (0, 0, ln 16) without attention rows."""
    a = (table.op_kind == "attn") & (table.kv_tokens > 0)
    if not a.any():
        return 0.0, 0.0, float(np.log(16.0))
    kv = table.kv_tokens[a]
    return float(kv.max()), float(table.seqs[a].max()), float(np.log(kv.max() / max(kv.min(), 1.0)))


def params_for(kinds: set[str]) -> list[str]:
    """The parameters a table of these operator kinds can identify (attn_gbps: tied to attn_key_ns on catalog
    hardware, see tied_attention_rate)."""
    names = []
    if "gemm" in kinds:
        names += ["gemm_tflops", "gemm_gbps", "gemm_ramp_tokens", "smooth_p", "gemm_launch_us"]
    if "elem" in kinds:
        names += ["elem_gbps", "elem_launch_us"]
    if "attn" in kinds:
        names += ["attn_tflops", "attn_gbps", "attn_smooth_p", "attn_launch_us", "attn_per_seq_us",
                  "attn_key_ns"]
    if "step" in kinds:
        names += ["step_overhead_ms"]
    return names


def peak_gbps(prm: RooflineParams) -> float:
    """The datasheet bandwidth of the parameters' hardware, 0 off the catalog (no coverage blend)."""
    try:
        return load_hardware(prm.hardware).hbm_tbps * 1000.0
    except CostModelError:
        return 0.0


def peak_tflops(prm: RooflineParams) -> float:
    try:
        return load_hardware(prm.hardware).peak_bf16_tflops
    except CostModelError:
        return 0.0


def predict_ops(t: OpTable, prm: RooflineParams) -> np.ndarray:
    """Predicted ms of every operator row (its count included)."""
    out = np.zeros(len(t.op_kind))
    g = t.op_kind == "gemm"
    if g.any():
        out[g] = (gemm_ms(t.tokens[g], t.k[g], t.n[g], prm.gemm_tflops * 1e9, prm.gemm_gbps * 1e6, prm.smooth_p,
                          prm.gemm_ramp_tokens, 2.0, t.weight_copies[g], t.flop_mult[g])
                  + prm.gemm_launch_us / 1000.0) * (t.tokens[g] > 0)
    e = t.op_kind == "elem"
    if e.any():
        out[e] = t.tokens[e] * t.elem_bytes[e] / (prm.elem_gbps * 1e6) + prm.elem_launch_us / 1000.0
    a = t.op_kind == "attn"
    if a.any():
        out[a] = (attention_ms(t.tokens[a], t.kv_tokens[a], t.qk_pairs[a], t.seqs[a], t.q_heads[a], t.kv_heads[a],
                              t.head_dim[a], prm.attn_tflops * 1e9, prm.attn_gbps * 1e6, prm.attn_smooth_p,
                              prm.attn_per_seq_us / 1000.0, prm.attn_key_ns / 1e6, prm.attn_units, prm.attn_kv_block,
                              gqa_packed=t.gqa_packed[a], split_kv=t.split_kv[a], cover_keys=prm.attn_cover_keys,
                              cover_seqs=prm.attn_cover_seqs, peak_byte_per_ms=peak_gbps(prm) * 1e6,
                              peak_flop_per_ms=peak_tflops(prm) * 1e9, cover_log_span=prm.attn_cover_log_span,
                              q_tile=t.q_tile[a], causal_skip=t.causal_skip[a])
                  + prm.attn_launch_us / 1000.0)
    s = t.op_kind == "step"
    out[s] = prm.step_overhead_ms
    return out * t.count


def predict_obs(t: OpTable, prm: RooflineParams) -> np.ndarray:
    return np.bincount(t.op_obs, weights=predict_ops(t, prm), minlength=t.n_obs)


def ape_stats(pred: np.ndarray, meas: np.ndarray) -> dict:
    ape = np.abs(pred - meas) / meas * 100.0
    return {"n": int(len(ape)), "median_ape_pct": round(float(np.median(ape)), 2),
            "p90_ape_pct": round(float(np.percentile(ape, 90)), 2), "max_ape_pct": round(float(ape.max()), 2)}


@dataclass
class FitResult:
    params: RooflineParams
    fitted: list[str]
    train: dict
    cost: float


def fit_params(table: OpTable, base: RooflineParams, names: list[str] | None = None,
               op_weight: float = 0.1, kv_block: float = FIT_KV_BLOCK) -> FitResult:
    """Least squares on log(predicted / measured): every observation's total, plus every timed operator with
    weight `op_weight` (it pins the launch costs, which the totals alone cannot separate). kv_block: the KV tile
    of the attention critical path (fixed, not fitted: a kernel constant).
    Attention is fitted first and on its own where the profile times it on its own (a per-operator layer
    profile): its parameters move only the attention operator, so its timings identify them, while fitted
    jointly against the layer totals they absorb other operators' errors at the same token count, which does
    not carry to a model whose attention takes another share of the layer (Llama-3.1-70B TP4 layer profile
    fitted, Llama-3.1-8B TP1's attention scored: docs/COST_MODELS.md)."""
    from scipy.optimize import least_squares

    names = names or params_for(table.kinds())
    a = table.op_kind == "attn"
    own = [n for n in names if n in ATTN_PARAMS]
    timed_attn = a.any() and bool(np.all(np.isfinite(table.measured_ms[a]) & (table.measured_ms[a] > 0)))
    if own and len(own) < len(names) and (~a).any() and timed_attn:
        first = fit_params(attention_rows(table), base, own, op_weight, kv_block)
        rest = fit_params(table, first.params, [n for n in names if n not in ATTN_PARAMS], op_weight, kv_block)
        return FitResult(rest.params, first.fitted + rest.fitted, rest.train, first.cost + rest.cost)
    tie = tied_attention_rate(base, table) if "attn_key_ns" in names else None
    if tie is not None:
        names = [n for n in names if n != "attn_gbps"]
    elif "attn_key_ns" in names:  # a machine outside the catalog: its parallel width is unknown, fit it
        names = names + ["attn_units"]
    cover_keys, cover_seqs, span = coverage(table)
    base = replace(base, gemm_kernels_per_layer=table.gemm_kernels_per_layer,
                   elem_kernels_per_layer=table.elem_kernels_per_layer, attn_kv_block=float(kv_block),
                   attn_cover_keys=max(cover_keys, base.attn_cover_keys),
                   attn_cover_seqs=max(cover_seqs, base.attn_cover_seqs), attn_cover_log_span=span)
    phys = physical_bounds(base, table)
    logs = np.array([PARAM_SPACE[n][0] for n in names])
    lo = np.array([max(PARAM_SPACE[n][1], phys.get(n, (-np.inf,))[0]) for n in names], dtype=np.float64)
    hi = np.array([min(PARAM_SPACE[n][2], phys.get(n, (0, np.inf))[1]) for n in names], dtype=np.float64)
    lo = np.where(logs, np.log(np.maximum(lo, 1e-12)), lo)
    hi = np.where(logs, np.log(hi), hi)
    start = np.array([float(getattr(base, n)) for n in names])
    start = np.clip(start, np.where(logs, np.exp(np.minimum(lo, 700)), lo),
                    np.where(logs, np.exp(np.minimum(hi, 700)), hi))
    # launch-type parameters start from a small positive guess so the gradient is informative
    start = np.where((start == 0) & ~logs, np.minimum(1.0, hi), start)
    x0 = np.clip(np.where(logs, np.log(np.maximum(start, 1e-12)), start), lo + 1e-9, hi - 1e-9)
    timed = np.isfinite(table.measured_ms) & (table.measured_ms > 0)
    meas_obs = table.obs_measured_ms
    meas_op = table.measured_ms[timed]

    def unpack(x):
        vals = x.copy()
        vals[logs] = np.exp(x[logs])  # only the log-scaled ones: exp of a linear one (2000 tokens) overflows
        prm = replace(base, **{n: float(v) for n, v in zip(names, vals, strict=True)})
        if tie is not None:
            prm.attn_gbps = tie(prm.attn_key_ns)
        return prm

    def resid(x):
        prm = unpack(x)
        ops = predict_ops(table, prm)
        obs = np.bincount(table.op_obs, weights=ops, minlength=table.n_obs)
        r = [np.log(np.maximum(obs, 1e-12) / meas_obs)]
        if timed.any() and op_weight > 0:
            r.append(op_weight * np.log(np.maximum(ops[timed], 1e-12) / meas_op))
        return np.concatenate(r)

    sol = least_squares(resid, x0, bounds=(lo, hi), loss="soft_l1", f_scale=0.05, max_nfev=400)
    prm = unpack(sol.x)
    fitted = names + (["attn_gbps (tied)"] if tie is not None else [])
    a = table.op_kind == "attn"
    if a.any() and np.all(table.q_tile[a] == table.q_tile[a][0]):
        # the per-key time is a tile's: keep the tile it was fitted on (64 for torch SDPA, 128 for FlashAttention)
        prm = replace(prm, attn_q_tile=float(table.q_tile[a][0]))
    if a.any() and set(table.fmt.split("+")) == {"echo"}:
        # our engine's own forward: the fit simulates that engine, so it keeps the profiled attention kernel
        # (echo_exec's attention packs no GQA group, splits no KV and applies an explicit mask) instead of the
        # serving default (FlashInfer)
        prm = replace(prm, attn_gqa_packed=bool(table.gqa_packed[a].max()), attn_split_kv=bool(table.split_kv[a].max()),
                      attn_causal_skip=bool(table.causal_skip[a].max()))
    return FitResult(prm, fitted, ape_stats(predict_obs(table, prm), meas_obs), float(sol.cost))


ATTN_PARAMS = {"attn_tflops", "attn_gbps", "attn_smooth_p", "attn_launch_us", "attn_per_seq_us", "attn_key_ns",
               "attn_units"}


def attention_rows(table: OpTable) -> OpTable:
    """The attention operator's rows alone, each its own observation (its measured time the total)."""
    a = table.op_kind == "attn"
    kw = {}
    for name in table.__dataclass_fields__:
        v = getattr(table, name)
        if name.startswith("obs_"):
            kw[name] = v[table.op_obs[a]]
        elif isinstance(v, np.ndarray):
            kw[name] = v[a]
        else:
            kw[name] = v
    kw["op_obs"] = np.arange(int(a.sum()))
    kw["obs_measured_ms"] = table.measured_ms[a]
    return OpTable(**kw)


def split_half(table: OpTable) -> tuple[np.ndarray, np.ndarray]:
    """Observation masks: train on every other value of the split key (token count), test on the rest."""
    values = np.unique(table.obs_split)
    train_values = values[::2]
    train = np.isin(table.obs_split, train_values)
    return train, ~train


def heldout_stats(table: OpTable, base: RooflineParams, kv_block: float = FIT_KV_BLOCK) -> dict:
    train, test = split_half(table)
    res = fit_params(table.subset(train), base, kv_block=kv_block)
    sub = table.subset(test)
    return {"train": res.train, "test": ape_stats(predict_obs(sub, res.params), sub.obs_measured_ms)}


SMALL_MESSAGE_BYTES = 65536.0  # all-reduces of decode steps: batch x hidden x 2 bytes, 16 KiB at batch 1 (d 8192)


def fit_allreduce(prof: AllReduceProfile, graph: bool = False) -> dict:
    """Per world size: time = latency + bytes / bandwidth, least squares on the relative error of the median
    times. graph=True: what a CUDA-graph replay pays instead. Vidur launches each call eagerly, so its small
    messages cost ~30 us at the median but 6-20 us at the fastest repeat (H100 DGX): the host's launch and
    scheduling jitter. The graph latency is the median of the fastest repeats of messages <= 64 KiB (no host
    in the loop), at most the eager latency; the bandwidth stays the eager fit's (large messages are
    bandwidth-bound either way)."""
    from scipy.optimize import least_squares

    if graph and prof.min_ms is None:
        raise CostModelError("the all-reduce profile has no time_stats.all_reduce.min column", path=prof.path,
                             field="time_stats.all_reduce.min")
    out = {}
    for w in sorted(set(prof.world_size.tolist())):
        m = prof.world_size == w
        size, ms = prof.size_bytes[m], prof.time_ms[m]

        def resid(x, size=size, ms=ms):
            lat_ms, gbps = np.exp(x)
            return np.log((lat_ms + size / (gbps * 1e6)) / ms)

        sol = least_squares(resid, np.log([0.02, 200.0]), loss="soft_l1", f_scale=0.1)
        lat_ms, gbps = np.exp(sol.x)
        if graph:
            small = size <= SMALL_MESSAGE_BYTES
            if small.any():  # never above the eager latency (TP4's fastest repeats are slower than its fit)
                lat_ms = min(lat_ms, float(np.median(prof.min_ms[m][small])))
            ms = prof.min_ms[m]
        pred = lat_ms + size / (gbps * 1e6)
        out[int(w)] = {"latency_us": round(float(lat_ms * 1000), 3), "gbps": round(float(gbps), 2),
                       **ape_stats(pred, ms)}
    return out


def evaluate_table(table: OpTable, prm: RooflineParams) -> dict:
    """How well parameters predict a profile they may not have seen: APE of each observation's total (the
    whole layer, or the kernel for an attention file) and of each timed operator."""
    ops = predict_ops(table, prm)
    obs = np.bincount(table.op_obs, weights=ops, minlength=table.n_obs)
    out = {"path": table.path, "format": table.fmt, "model": table.model_name,
           **ape_stats(obs, table.obs_measured_ms), "operators": {}}
    timed = np.isfinite(table.measured_ms) & (table.measured_ms > 0)
    for name in dict.fromkeys(table.op_name[timed].tolist()):
        m = timed & (table.op_name == name)
        out["operators"][name] = ape_stats(ops[m] / table.count[m], table.measured_ms[m] / table.count[m])
    return out


def evaluate_allreduce(prof: AllReduceProfile, prm: RooflineParams) -> dict:
    """APE of the all-reduce model (latency + bytes / bandwidth per world size) on an all-reduce profile; the
    eager parameters against the median times, the CUDA-graph ones against the fastest repeats."""
    pred = np.full(len(prof.time_ms), np.nan)
    out = {"path": prof.path, "format": "allreduce", "operators": {}}
    for graph, table in ((False, prm.allreduce), (True, prm.allreduce_graph)):
        if graph and prof.min_ms is None:
            continue
        meas = prof.min_ms if graph else prof.time_ms
        for w in sorted(set(prof.world_size.tolist())):
            if int(w) not in table:
                continue
            m = prof.world_size == w
            lat_us, gbps = table[int(w)]
            p = lat_us / 1000.0 + prof.size_bytes[m] / (gbps * 1e6)
            if not graph:
                pred[m] = p
            out["operators"][f"all_reduce_tp{w}" + ("_graph" if graph else "")] = ape_stats(p, meas[m])
    ok = np.isfinite(pred)
    if not ok.any():
        raise CostModelError("the fit has no all-reduce parameters for the profile's world sizes", path=prof.path)
    out.update(ape_stats(pred[ok], prof.time_ms[ok]))
    return out


def load_fit(path: str | Path = DEFAULT_FIT) -> tuple[RooflineParams, dict]:
    path = Path(path)
    if not path.is_file() and not path.suffix and (FITTED_DIR / f"{path}.json").is_file():
        path = FITTED_DIR / f"{path}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        known = ", ".join(sorted(p.stem for p in FITTED_DIR.glob("*.json")))
        raise CostModelError(f"cannot read fitted parameters: {exc} (shipped: {known})", path=str(path)) from None
    if "params" not in data:
        raise CostModelError("not a fitted step-time model (no 'params')", path=str(path), field="params")
    return RooflineParams.from_dict(data["params"], path=str(path)), data


class FittedCostModel(RooflineCostModel):
    """The roofline shape with fitted parameters (default: cost_models/fitted/h100.json). On other hardware than
    the fit's, the fitted efficiencies carry over: rates scale with the datasheet ratios."""

    kind = "fitted"

    def __init__(self, model: str | ModelSpec, hardware: str | HardwareSpec | None = None, tp: int = 1,
                 draft: str | ModelSpec | None = None, params: str | Path | RooflineParams = DEFAULT_FIT,
                 draft_tp: int | None = None, step_overhead_ms: float | None = None):
        if isinstance(params, RooflineParams):
            prm, self.fit_info = params, {}
        else:
            prm, self.fit_info = load_fit(params)
        if step_overhead_ms is not None:
            prm = replace(prm, step_overhead_ms=float(step_overhead_ms))
        super().__init__(model, hardware, tp=tp, draft=draft, params=prm, draft_tp=draft_tp)
