"""The physical attention and all-reduce model: datasheet bounds, GQA terms, the coverage rule, held-out error on
profiles the fit did not see, and `echosim fit --evaluate`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models import FittedCostModel, RooflineCostModel, StepBatch
from cost_models.fitted import ape_stats, attention_rows, fit_params, load_fit, predict_obs
from cost_models.profiles import read_profile
from cost_models.roofline import RooflineParams, _Forward, attention_ms, coverage_weight, critical_path_ms, min_key_ns
from cost_models.specs import load_model
from echosim.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "cost_models" / "profiles"
ATTN_70B = PROFILES / "h100" / "llmservingsim_v0" / "Llama-3.1-70B_tp4_attention.csv.gz"
LAYERS = PROFILES / "h100" / "llmservingsim_v0"
RTX = PROFILES / "rtx-pro-6000" / "llmservingsim"
H100 = RooflineParams.from_hardware("h100-sxm")
PAPER_MODELS = [("qwen3-8b", 1), ("qwen3-32b", 2), ("llama-3.1-8b", 1), ("llama-3.3-70b", 8),
                ("qwen3-235b-a22b", 8), ("vicuna-13b", 1)]


@settings(max_examples=60, deadline=None)
@given(m=st.sampled_from(PAPER_MODELS), batch=st.integers(1, 512), ctx=st.floats(16, 131072),
       tokens=st.integers(1, 64))
def test_no_step_faster_than_datasheet_none_3x_above_outside_coverage(m, batch, ctx, tokens):
    """A whole-model step (target verify + LM head) is never faster than the datasheet roofline; outside the
    profiles' coverage (more total keys or sequences than any profiled attention call) at most 3x above it."""
    name, tp = m
    fit, roof = FittedCostModel(name, tp=tp), RooflineCostModel(name, "h100-sxm", tp=tp)
    sb = StepBatch.uniform(np.array([batch]), np.array([tokens]), np.array([ctx]))
    tf, tr = float(fit.step_time(sb).total_ms[0]), float(roof.step_time(sb).total_ms[0])
    assert tf >= tr * (1 - 1e-9)
    cover_keys, cover_seqs = fit.params.attn_cover_keys, fit.params.attn_cover_seqs
    if batch * (ctx + tokens) > cover_keys or batch > cover_seqs:
        assert tf <= 3.0 * tr


def test_fitted_rates_within_physical_bounds():
    prm, data = load_fit("h100")
    assert prm.attn_gbps <= 3350.0 and prm.attn_tflops <= 989.4 and prm.gemm_tflops <= 989.4
    assert prm.gemm_gbps <= 3350.0 and prm.elem_gbps <= 3350.0
    assert prm.attn_key_ns >= min_key_ns(128, 132, 3.35)
    # not orders of magnitude slower either: the tied memory rate is the measured per-SM rate on all SMs
    assert prm.attn_gbps >= 0.5 * 3350.0
    assert prm.attn_cover_keys == 65536 and prm.attn_cover_seqs == 256


def test_issue_cases_priced_near_physics():
    """Qwen3-8B decode at batch 256 x 1k and batch 25 x 13k: the old fit priced them 134 and 157 ms against a
    ~17 ms roofline; now within 2x of it."""
    fit, roof = FittedCostModel("qwen3-8b"), RooflineCostModel("qwen3-8b", "h100-sxm")
    for b, c in ((256, 1024), (25, 13000)):
        assert fit.ar_step_ms(b, c) < 2.0 * roof.ar_step_ms(b, c)


def test_coverage_weight_rule():
    span = np.log(16.0)  # a profile spanning 16x in keys: trusted 16x past its edge
    assert coverage_weight(1000.0, 4.0, 65536, 256, span) == 0.0
    assert coverage_weight(65536.0, 256.0, 65536, 256, span) == 0.0
    assert coverage_weight(4 * 65536.0, 1.0, 65536, 256, span) == pytest.approx(0.5)
    assert coverage_weight(16 * 65536.0, 1.0, 65536, 256, span) == pytest.approx(1.0)
    assert coverage_weight(1e9, 1.0, 65536, 256, span) == 1.0
    assert coverage_weight(10.0, 1.0, 0.0, 0.0, span) == 1.0  # no profile: the datasheet everywhere
    kv = np.array([1e3, 65536 * 2.0, 65536 * 8.0, 1e8])
    w = coverage_weight(kv, np.ones(4), 65536, 256, span)
    assert w[0] == 0 and np.all(np.diff(w) > 0) and w[-1] == 1.0


def test_blend_reaches_the_datasheet_far_outside_coverage():
    """As far past the coverage as the profile spans inside it, the per-key rate is the datasheet's: a split-KV
    decode then costs the KV bytes at the datasheet bandwidth (plus the per-sequence cost), within tile rounding."""
    prm, _ = load_fit("h100")
    kw = dict(q_heads=8.0, kv_heads=2.0, head_dim=128.0, flop_per_ms=prm.attn_tflops * 1e9,
              byte_per_ms=prm.attn_gbps * 1e6, p=prm.attn_smooth_p, per_seq_ms=0.0, key_ms=prm.attn_key_ns / 1e6,
              units=132.0, kv_block=64.0, gqa_packed=1.0, split_kv=1.0, cover_keys=65536.0, cover_seqs=256.0,
              peak_byte_per_ms=3350e6, peak_flop_per_ms=989.4e9, cover_log_span=prm.attn_cover_log_span)
    seqs, keys = 1024.0, 65536.0 * np.exp(prm.attn_cover_log_span)
    far = attention_ms(seqs, keys, keys, seqs, **kw)
    bytes_ms = 2 * 128 * 2 * keys * 2 / 3350e6
    assert bytes_ms <= far <= 1.3 * bytes_ms
    inside = attention_ms(16.0, 16 * 1024.0, 16 * 1024.0, 16.0, **kw)
    kw_roof = dict(kw, key_ms=0.0)
    assert inside > attention_ms(16.0, 16 * 1024.0, 16 * 1024.0, 16.0, **kw_roof)


def test_simulator_path_matches_fit_path():
    """_Forward.layers_ms (the simulator's folded constants) prices attention as attention_ms does."""
    prm, _ = load_fit("h100")
    fast = replace(prm, gemm_tflops=1e12, gemm_gbps=1e12, elem_gbps=1e12, gemm_launch_us=0.0, elem_launch_us=0.0,
                   attn_launch_us=0.0, gemm_ramp_tokens=0.0)
    spec = load_model("qwen3-8b")
    fw = _Forward(spec, 1, fast)
    hw_bw, hw_fl = 3350e6, 989.4e9
    for t, kv, seqs in ((1.0, 512.0, 1.0), (256.0, 256 * 1024.0, 256.0), (8 * 32.0, 32 * 4096.0, 32.0),
                        (25.0, 25 * 13000.0, 25.0), (512.0, 1e7, 512.0),
                        (2048.0, 3072.0, 1.0), (4096.0, 4 * 4096.0, 4.0)):  # prefill chunks: causal tiles
        qk = t * kv / seqs
        ref = attention_ms(t, kv, qk, seqs, 32.0, 8.0, 128.0, prm.attn_tflops * 1e9, prm.attn_gbps * 1e6,
                           prm.attn_smooth_p, prm.attn_per_seq_us / 1000.0, prm.attn_key_ns / 1e6, prm.attn_units,
                           prm.attn_kv_block, gqa_packed=1.0, split_kv=1.0, cover_keys=prm.attn_cover_keys,
                           cover_seqs=prm.attn_cover_seqs, peak_byte_per_ms=hw_bw, peak_flop_per_ms=hw_fl,
                           cover_log_span=prm.attn_cover_log_span)
        got = fw.layers_ms(t, kv, qk, seqs) / spec.num_layers
        assert got == pytest.approx(ref, rel=1e-3, abs=1e-6)


def test_query_and_kv_head_terms():
    """KV heads set the bytes (doubling them doubles a large bandwidth-bound decode); query heads set the blocks
    of a kernel that does not pack GQA groups (FlashAttention-2), not of one that does."""
    base = dict(head_dim=128.0, flop_per_ms=900e9, byte_per_ms=2500e6, p=8.0, per_seq_ms=0.0,
                key_ms=26e-6, units=132.0, kv_block=64.0)
    seqs, kv = 512.0, 512 * 4096.0
    t8 = attention_ms(seqs, kv, kv, seqs, q_heads=32.0, kv_heads=8.0, **base)
    t16 = attention_ms(seqs, kv, kv, seqs, q_heads=32.0, kv_heads=16.0, **base)
    assert t16 == pytest.approx(2 * t8, rel=0.05)
    one = dict(base)
    q16 = attention_ms(1.0, 8192.0, 8192.0, 1.0, q_heads=16.0, kv_heads=2.0, gqa_packed=0.0, split_kv=0.0, **one)
    q64 = attention_ms(1.0, 8192.0, 8192.0, 1.0, q_heads=64.0, kv_heads=2.0, gqa_packed=0.0, split_kv=0.0, **one)
    assert q64 == pytest.approx(q16, rel=0.01)  # 16 and 64 blocks both fit one wave of 132 SMs
    b4 = dict(tokens=8.0, kv_tokens=8 * 8192.0, qk_pairs=8 * 8192.0, seqs=8.0, kv_heads=2.0, gqa_packed=0.0,
              split_kv=0.0)
    assert attention_ms(q_heads=64.0, **b4, **one) > 3.5 * attention_ms(q_heads=16.0, **b4, **one)
    packed = dict(b4, gqa_packed=1.0)
    assert attention_ms(q_heads=64.0, **packed, **one) == pytest.approx(attention_ms(q_heads=16.0, **packed, **one),
                                                                        rel=0.05)
    # split-KV fills the SMs: a batch of one at 64k keys is far faster than one block per head walking them all
    long = dict(tokens=1.0, kv_tokens=65536.0, qk_pairs=65536.0, seqs=1.0, q_heads=32.0, kv_heads=8.0)
    assert attention_ms(**long, gqa_packed=1.0, split_kv=1.0, **one) < 0.1 * attention_ms(
        **long, gqa_packed=1.0, split_kv=0.0, **one)


@pytest.mark.parametrize("fit_on, score_on", [("llama_3_1_70b_tp4", "Llama-3.1-8B_tp1"),
                                              ("llama_3_1_8b_tp1", "Llama-3.1-70B_tp4")])
def test_heldout_sdpa_attention_other_model_and_tp(fit_on, score_on):
    """The attention op of the LLMServingSim v0 layer profiles (torch's scaled_dot_product_attention, one prompt
    of 1-2048 tokens): the shipped fit of one model's layer profile predicts the other model's, at another TP
    degree and query/KV head count (Llama-3.1-70B TP4: 16/2 per shard, Llama-3.1-8B TP1: 32/8), within the
    issue's 15% median and 35% P90: the causal query tiles and their waves carry across head counts."""
    prm, data = load_fit(f"h100_llmservingsim_{fit_on}")
    assert not any(score_on in p for p in data["profiles"])  # held out: not among the fit's profiles
    table = attention_rows(read_profile(LAYERS / f"{score_on}_layers.csv.gz"))
    assert table.n_obs == 2048
    s = ape_stats(predict_obs(table, prm), table.obs_measured_ms)
    assert s["median_ape_pct"] <= 15.0 and s["p90_ape_pct"] <= 35.0, s


def test_causal_query_tiles():
    """A sequence whose rows span several query tiles walks fewer keys in its early tiles (causal), unless the
    kernel applies an explicit mask; blocks of equal walks (decode) keep the fractional-wave form."""
    for keys, load in ((640.0, 0.4), (640.0, 1.0), (4096.0, 3.7)):
        assert critical_path_ms(keys, 26e-6, load, 0.0, 1.0) == pytest.approx(26e-6 * keys * max(1.0, load))
    kw = dict(q_heads=32.0, kv_heads=8.0, head_dim=128.0, flop_per_ms=900e9, byte_per_ms=2500e6, p=8.0,
              per_seq_ms=0.0, key_ms=26e-6, units=132.0, kv_block=64.0, gqa_packed=0.0, split_kv=0.0)

    def prefill(t, **extra):
        return attention_ms(t, t, t * (t + 1) / 2, 1.0, **kw, **extra)

    # one wave (256 tokens: 32 heads x 2 tiles of 128 rows, 64 blocks): the longest tile sets the time either way
    assert prefill(256.0) == pytest.approx(prefill(256.0, causal_skip=0.0))
    # many waves: the causal kernel walks about half the keys
    assert 0.45 < prefill(16384.0) / prefill(16384.0, causal_skip=0.0) < 0.65
    # a decode batch (one tile per sequence) is not touched by the causal rule
    dec = dict(tokens=64.0, kv_tokens=64 * 4096.0, qk_pairs=64 * 4096.0, seqs=64.0)
    assert attention_ms(**dec, **kw) == attention_ms(**dec, **kw, causal_skip=0.0)


def test_allreduce_with_and_without_cuda_graphs():
    prm, _ = load_fit("h100")
    for w in (2, 4, 8):
        assert prm.allreduce_graph[w][0] <= prm.allreduce[w][0]
        assert prm.allreduce_graph[w][1] == prm.allreduce[w][1]
    graph = FittedCostModel("llama-3.3-70b", tp=8)
    eager = FittedCostModel("llama-3.3-70b", tp=8, params=replace(prm, cuda_graph=False))
    # 160 all-reduces per step at batch 1: (30.2 - 20.5) us each
    diff = eager.ar_step_ms(1, 1024) - graph.ar_step_ms(1, 1024)
    assert diff == pytest.approx(160 * (prm.allreduce[8][0] - prm.allreduce_graph[8][0]) / 1000, rel=0.01)


def test_heldout_h100_attention_beyond_the_fitted_range():
    """Fit on the attention calls up to 16k keys in total, score on the larger ones (up to 65k): the coverage
    rule at work on real H100 data."""
    t = read_profile(ATTN_70B)
    small = t.kv_tokens <= 16384
    res = fit_params(t.subset(small), H100)
    test = t.subset(~small)
    s = ape_stats(predict_obs(test, res.params), test.obs_measured_ms)
    assert s["median_ape_pct"] <= 15.0 and s["p90_ape_pct"] <= 35.0


@pytest.mark.parametrize("src", ["Llama-3.1-8B_tp1", "Qwen3-32B_tp2"])
def test_heldout_decode_attention_other_models_and_tp(src):
    """Decode attention fitted on one model at one TP degree predicts the other models and TP degrees (other
    query/KV heads per shard) of the same GPU (RTX PRO 6000 profiles: the only public set with several)."""
    names = ["Llama-3.1-8B_tp1", "Llama-3.1-8B_tp2", "Qwen3-32B_tp1", "Qwen3-32B_tp2"]
    tabs = {}
    for n in names:
        t = read_profile(RTX / f"{n}_attention.csv.gz")
        tabs[n] = t.subset(t.obs_tokens == t.seqs)  # decode-only calls
    res = fit_params(tabs[src], RooflineParams.from_hardware("rtx-pro-6000"))
    for n in names:
        if n == src:
            continue
        s = ape_stats(predict_obs(tabs[n], res.params), tabs[n].obs_measured_ms)
        assert s["median_ape_pct"] <= 15.0 and s["p90_ape_pct"] <= 35.0, (n, s)


def test_fit_evaluate_cli(tmp_path, capsys):
    out = tmp_path / "eval.json"
    lss = PROFILES / "h100" / "llmservingsim_v0" / "Llama-3.1-8B_tp1_layers.csv.gz"
    ar = PROFILES / "h100" / "vidur" / "h100_dgx_all_reduce.csv.gz"
    assert main(["fit", "--evaluate", "h100", "--profiles", str(lss), str(ar), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "q_proj: median" in text and "all_reduce_tp8_graph" in text
    data = json.loads(out.read_text())
    assert [Path(f["path"]).name for f in data["files"]] == [lss.name, ar.name]
    for f in data["files"]:
        assert {"path", "median_ape_pct", "p90_ape_pct", "n", "operators"} <= set(f)
        assert f["n"] > 0 and 0 <= f["median_ape_pct"] <= f["p90_ape_pct"]
    assert data["files"][0]["n"] == 2048 and "attn" in data["files"][0]["operators"]


def test_fit_evaluate_bad_input(tmp_path, capsys):
    assert main(["fit", "--evaluate", "no_such_fit", "--profiles", str(ATTN_70B)]) == 2
    assert "no_such_fit" in capsys.readouterr().err
    assert main(["fit", "--evaluate", "h100", "--profiles", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    junk = tmp_path / "junk.csv"
    junk.write_text("a,b\n1,2\n")
    assert main(["fit", "--evaluate", "h100", "--profiles", str(junk)]) == 2
    assert "junk.csv" in capsys.readouterr().err
    assert main(["fit", "--profiles", str(junk)]) == 2
    assert "--out" in capsys.readouterr().err
