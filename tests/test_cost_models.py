"""Step-time models: catalog, roofline and fitted shapes, the vectorized interface, bad input."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from cost_models.fitted import FittedCostModel
from cost_models.interface import StepBatch, StepCostModel, StepTime
from cost_models.roofline import RooflineCostModel, RooflineParams
from cost_models.specs import known_hardware, known_models, load_hardware, load_model
from echosim.errors import UserError


def test_catalog_has_required_entries():
    hw = known_hardware()
    assert {"h100-sxm", "h200", "a100-80gb"} <= set(hw)
    models = set(known_models())
    for name in ["qwen3-8b", "qwen3-32b", "qwen3-235b-a22b", "llama-3.1-8b", "llama-3.3-70b", "vicuna-13b",
                 "echo-target-small", "echo-draft-small"]:
        assert name in models
        if not name.startswith("echo"):
            assert f"eagle3-{name}" in models
    moe = load_model("Qwen/Qwen3-235B-A22B")  # alias
    assert (moe.num_experts, moe.experts_per_token) == (128, 8)
    head = load_model("eagle3-llama-3.1-8b")
    # the LM head of a published EAGLE-3 head spans its 32k draft vocabulary, not the target's 128k
    assert head.num_layers == 1 and head.vocab_size == 32000 and head.qkv_in() == 2 * head.hidden_size
    h200, h100 = load_hardware("H200"), load_hardware("h100")
    assert h200.hbm_tbps > h100.hbm_tbps and h200.peak_bf16_tflops == h100.peak_bf16_tflops


def test_eagle3_head_prices_its_lm_head_over_the_draft_vocabulary():
    """An EAGLE-3 config.json's draft_vocab_size sets its LM head (the published heads: 32000 of the target's
    128k-152k); a draft depth's LM head is a memory-bound GEMM, so its time follows the vocabulary."""
    from cost_models.specs import model_from_config

    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 4096, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_hidden_layers": 1, "intermediate_size": 14336, "vocab_size": 128256}
    full = model_from_config(cfg)
    small = model_from_config({**cfg, "draft_vocab_size": 32000})
    assert (full.vocab_size, small.vocab_size) == (128256, 32000)
    assert all(load_model(f"eagle3-{m}").vocab_size == 32000
               for m in ("qwen3-8b", "qwen3-32b", "qwen3-235b-a22b", "llama-3.1-8b", "llama-3.3-70b", "vicuna-13b"))
    lm = [FittedCostModel("llama-3.1-8b", draft=d).step_time(StepBatch.from_requests([1], [512], draft_rows=[8]))
          .lm_head_ms for d in (full, small)]
    target = FittedCostModel("llama-3.1-8b").step_time(StepBatch.from_requests([1], [512])).lm_head_ms
    draft_full, draft_small = lm[0] - target, lm[1] - target
    assert 2.5 < draft_full / draft_small < 128256 / 32000 + 0.1
    # never faster than reading the head's weights at the datasheet bandwidth
    assert draft_small >= 4096 * 32000 * 2 / (load_hardware("h100").hbm_tbps * 1e12) * 1e3


def test_unknown_names_list_known_ones():
    with pytest.raises(UserError, match="h100-sxm"):
        load_hardware("tpu-v9")
    with pytest.raises(UserError, match="qwen3-8b"):
        load_model("no-such-model")


def test_hf_config_json_on_disk(tmp_path):
    cfg = {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 16,
           "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072, "vocab_size": 151936}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_model(tmp_path)  # a model directory
    assert spec.head_dim == 128 and spec.num_kv_heads == 8 and spec.num_layers == 4
    assert load_model(tmp_path / "config.json") == spec
    m = RooflineCostModel(tmp_path, "h100-sxm")
    assert m.ar_step_ms(1, 100) > 0
    del cfg["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="vocab_size"):
        load_model(tmp_path)


def test_protocol_and_split():
    m = FittedCostModel("qwen3-8b", draft="eagle3-qwen3-8b")
    assert isinstance(m, StepCostModel) and isinstance(RooflineCostModel("qwen3-8b"), StepCostModel)
    b = StepBatch.from_requests([6, 6, 1], [1000, 2000, 500], draft_rows=[3, 24, 24],
                                prefill_chunks=[(256, 0)])
    st = m.step_time(b)
    assert isinstance(st, StepTime)
    for part in (st.draft_ms, st.verify_ms, st.lm_head_ms):
        assert part > 0
    assert st.total_ms == pytest.approx(st.draft_ms + st.verify_ms + st.lm_head_ms + st.overhead_ms)
    with pytest.raises(UserError, match="draft"):
        FittedCostModel("qwen3-8b").step_time(b)


def test_from_requests_lists_and_arrays_agree():
    v, c = [8, 3, 1], [1000, 20, 4096]
    a = StepBatch.from_requests(v, c, draft_rows=[3, 12], prefill_chunks=[(64, 10)])
    b = StepBatch.from_requests(np.array(v), np.array(c), draft_rows=[3, 12], prefill_chunks=[(64, 10)])
    assert a == b
    assert a.target_tokens == 12 + 64 and a.target_seqs == 4 and a.target_lm_rows == 12 + 1
    assert a.target_kv_tokens == sum(c) + 12 + 10 + 64
    assert a.target_qk_pairs == sum(t * k + t * (t + 1) / 2 for t, k in zip(v, c, strict=True)) + 64 * 10 + 64 * 65 / 2
    with pytest.raises(ValueError):
        StepBatch.from_requests([1, 2], [3])


def test_uniform_prefill_matches_from_requests():
    m = FittedCostModel("qwen3-8b")
    u = m.step_time(StepBatch.uniform([4, 4], [3, 3], [100, 100], prefill_tokens=[0, 512], prefill_past=[0, 256]))
    a = m.step_time(StepBatch.from_requests([3] * 4, [100] * 4))
    b = m.step_time(StepBatch.from_requests([3] * 4, [100] * 4, prefill_chunks=[(512, 256)]))
    assert u.total_ms[0] == pytest.approx(a.total_ms) and u.total_ms[1] == pytest.approx(b.total_ms)
    assert b.verify_ms > a.verify_ms


def test_flat_then_linear_shape():
    """Per-layer time barely moves from 1 to ~128 tokens, then grows about linearly (H100 fitted)."""
    m = FittedCostModel("llama-3.1-8b")
    t = np.array([1, 32, 128, 1024, 2048, 4096], dtype=np.float64)
    ms = m.verify_ms(t, np.zeros_like(t) + 1, np.ones_like(t))
    assert ms[2] / ms[0] < 1.35
    assert ms[4] / ms[3] == pytest.approx(2.0, rel=0.2)
    assert ms[5] / ms[4] == pytest.approx(2.0, rel=0.15)


@pytest.mark.parametrize("kind", ["roofline", "fitted"])
def test_monotone_in_every_input(kind):
    cls = RooflineCostModel if kind == "roofline" else FittedCostModel
    m = cls("qwen3-8b", tp=2)
    t = np.arange(1, 4097, dtype=np.float64)
    v = m.verify_ms(t, 4 * 1024.0 + 0 * t, 4 + 0 * t)
    assert np.all(np.diff(v) >= -1e-9)
    kv = np.linspace(0, 1e6, 200)
    v = m.verify_ms(64.0 + 0 * kv, kv, 8 + 0 * kv)
    assert np.all(np.diff(v) >= -1e-9)
    b = np.arange(1, 300, dtype=np.float64)
    ar = m.ar_step_ms(b, 2048.0)
    assert np.all(np.diff(ar) >= -1e-9)


def test_roofline_bounds_and_hardware():
    """Pure roofline on the datasheet is a lower bound of the fitted model; H200 is faster where memory-bound."""
    for b in (1, 64, 512):
        assert RooflineCostModel("llama-3.1-8b").ar_step_ms(b, 1024) < FittedCostModel("llama-3.1-8b").ar_step_ms(
            b, 1024)
    h100, h200 = RooflineCostModel("llama-3.1-8b", "h100-sxm"), RooflineCostModel("llama-3.1-8b", "h200")
    assert h200.ar_step_ms(1, 1024) < 0.8 * h100.ar_step_ms(1, 1024)
    # compute-bound prefill-size forward: same peak FLOP/s, about the same time
    assert h200.verify_ms(8192.0, 0.0, 1) == pytest.approx(h100.verify_ms(8192.0, 0.0, 1), rel=0.1)
    a100 = RooflineCostModel("llama-3.1-8b", "a100-80gb")
    assert a100.verify_ms(8192.0, 0.0, 1) > 2.5 * h100.verify_ms(8192.0, 0.0, 1)
    fitted_h200 = FittedCostModel("llama-3.1-8b", "h200")
    assert fitted_h200.ar_step_ms(1, 1024) < FittedCostModel("llama-3.1-8b").ar_step_ms(1, 1024)


def test_moe_expected_experts_grow_with_tokens():
    """Qwen3-235B-A22B: reading experts dominates small batches; time grows with tokens until all are read."""
    m = RooflineCostModel("qwen3-235b-a22b", tp=1)  # no all-reduce: the experts alone
    t = np.array([1.0, 8.0, 64.0, 512.0])
    v = m.verify_ms(t, t * 0 + 1, t * 0 + 1)
    assert v[1] > 3 * v[0]  # 8 tokens touch ~52 distinct experts on average, one token 8
    assert v[3] < 1.2 * v[2]  # by 64 tokens nearly all 128 are read: 8x the tokens, little more time
    dense_like = RooflineCostModel("qwen3-32b", tp=1)
    assert v[0] < dense_like.verify_ms(1.0, 1.0, 1)  # 22B active vs 32B dense at one token


def test_tp_adds_allreduce_and_divides_work():
    one, eight = FittedCostModel("llama-3.3-70b", tp=1), FittedCostModel("llama-3.3-70b", tp=8)
    assert eight.verify_ms(4096.0, 1.0, 1) < one.verify_ms(4096.0, 1.0, 1) / 4
    with pytest.raises(UserError, match="TP"):
        FittedCostModel("llama-3.3-70b", tp=3)


def test_paper_observation_verify_exceeds_ar_by_batch_128():
    m = FittedCostModel("llama-3.3-70b", tp=8)
    assert m.verify_ms(8 * 128.0, 128 * 1024.0, 128) > m.ar_step_ms(128, 1024.0)
    assert m.verify_ms(8.0, 1024.0, 1) < 1.1 * m.ar_step_ms(1, 1024.0)  # batch 1: verify ~ one AR step


def test_vectorized_matches_scalar_and_is_fast():
    m = FittedCostModel("qwen3-8b", draft="eagle3-qwen3-8b")
    rng = np.random.default_rng(1)
    n = 10_000
    bs, tps, ctx = rng.integers(1, 257, n), rng.integers(1, 65, n), rng.integers(64, 8192, n)
    draft = np.full(5, 4.0)
    batch = StepBatch.uniform(bs, tps, ctx, draft_rows_per_seq=draft)
    t0 = time.perf_counter()
    st = m.step_time(batch)
    assert time.perf_counter() - t0 < 1.0
    assert st.total_ms.shape == (n,)
    for i in (0, 17, 9999):
        one = StepBatch.from_requests([tps[i]] * bs[i], [ctx[i]] * bs[i], draft_rows=list(draft * bs[i]))
        s1 = m.step_time(one)
        assert s1.verify_ms == pytest.approx(st.verify_ms[i], rel=1e-9)
        assert s1.lm_head_ms == pytest.approx(st.lm_head_ms[i], rel=1e-9)
        assert s1.draft_ms == pytest.approx(st.draft_ms[i], rel=1e-9)
    one = StepBatch.from_requests([8] * 16, [1000] * 16, draft_rows=[16, 64, 64])
    t0 = time.perf_counter()
    for _ in range(200):
        m.step_time(one)
    assert (time.perf_counter() - t0) / 200 < 1e-3  # loose: ~40 us on an idle core


def test_params_round_trip_and_bad_params(tmp_path):
    prm = RooflineParams.from_hardware("h100-sxm")
    assert RooflineParams.from_dict(json.loads(json.dumps(prm.to_dict()))) == prm
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"params": {**prm.to_dict(), "warp_speed": 9}}))
    with pytest.raises(UserError, match="warp_speed"):
        FittedCostModel("qwen3-8b", params=bad)
    with pytest.raises(UserError, match="h100"):
        FittedCostModel("qwen3-8b", params=tmp_path / "missing.json")
