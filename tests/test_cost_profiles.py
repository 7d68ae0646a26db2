"""Profile readers on the real H100 profiles, fit quality on held-out token counts, transfer, bad CSVs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cost_models.fitted import FittedCostModel, ape_stats, fit_allreduce, fit_params, heldout_stats, predict_obs
from cost_models.profiles import PROFILE_COLUMNS, detect_format, read_allreduce, read_profile
from cost_models.roofline import RooflineParams
from echosim.cli import main
from echosim.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "cost_models" / "profiles" / "h100"  # shipped (gzip) copies of the public H100 profiles
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="cost_models/profiles/h100 not present")
BASE = RooflineParams.from_hardware("h100-sxm")


@needs_data
def test_readers_on_real_files():
    t = read_profile(DATA / "vidur/Llama-2-7b-hf_mlp.csv.gz")
    assert t.fmt == "vidur_mlp" and t.n_obs == 1044
    assert set(np.unique(t.obs_tp)) == {1, 2, 4, 8}
    assert t.obs_tokens.min() == 1 and t.obs_tokens.max() == 4096
    # per-layer time is the sum of the nine per-layer operators (embedding excluded)
    assert len(t.op_kind) == 9 * t.n_obs
    lss = read_profile(DATA / "llmservingsim_v0/Llama-3.1-8B_tp1_layers.csv.gz")
    assert lss.fmt == "llmservingsim" and lss.model_name == "llama-3.1-8b" and lss.n_obs == 2048
    assert lss.gemm_kernels_per_layer == 7  # q, k, v, o, gate, up, down: unfused HF eager
    assert 0.2 < lss.obs_measured_ms[0] < 0.3  # ns converted to ms: one layer at 1 token ~ 0.24 ms
    attn = read_profile(DATA / "llmservingsim_v0/Llama-3.1-70B_tp4_attention.csv.gz")
    assert attn.fmt == "vidur_attn" and attn.kinds() == {"attn"} and attn.n_obs > 20000
    ar = read_allreduce(DATA / "vidur/h100_dgx_all_reduce.csv.gz")
    assert set(ar.world_size.tolist()) == {2, 4, 8}
    assert detect_format(DATA / "vidur/h100_dgx_all_reduce.csv.gz") == "allreduce"


@needs_data
@pytest.mark.parametrize("rel", ["vidur/Llama-2-7b-hf_mlp.csv.gz", "vidur/CodeLlama-34b-Instruct-hf_mlp.csv.gz",
                                 "llmservingsim_v0/Llama-3.1-8B_tp1_layers.csv.gz",
                                 "llmservingsim_v0/Llama-3.1-70B_tp4_layers.csv.gz",
                                 "llmservingsim_v0/Llama-3.1-70B_tp4_attention.csv.gz"])
def test_heldout_fit_quality(rel):
    """Fit on every other token count, test on the rest: goals <= 5% median and <= 15% P90 per-layer error."""
    h = heldout_stats(read_profile(DATA / rel), BASE)
    assert h["test"]["median_ape_pct"] <= 5.0
    assert h["test"]["p90_ape_pct"] <= 15.0


@needs_data
def test_transfer_llama2_7b_to_codellama_34b():
    prm = fit_params(read_profile(DATA / "vidur/Llama-2-7b-hf_mlp.csv.gz"), BASE).params
    dst = read_profile(DATA / "vidur/CodeLlama-34b-Instruct-hf_mlp.csv.gz")
    for tp in (1, 2, 4):
        sub = dst.subset(dst.obs_tp == tp)
        assert ape_stats(predict_obs(sub, prm), sub.obs_measured_ms)["median_ape_pct"] <= 10.0


@needs_data
def test_allreduce_fit_is_sane():
    fit = fit_allreduce(read_allreduce(DATA / "vidur/h100_dgx_all_reduce.csv.gz"))
    for w in (2, 4, 8):
        assert 1 < fit[w]["latency_us"] < 100 and 50 < fit[w]["gbps"] < 900
        assert fit[w]["median_ape_pct"] < 10


def test_shipped_fit_files_load():
    shipped = sorted((Path(__file__).resolve().parents[1] / "cost_models" / "fitted").glob("h100*.json"))
    assert any(p.name == "h100.json" for p in shipped)
    for p in shipped:
        data = json.loads(p.read_text())
        if "params" in data:
            m = FittedCostModel("llama-3.1-8b", params=p, tp=2)
            assert 0 < m.ar_step_ms(1, 512) < m.ar_step_ms(256, 512)


def test_missing_column_names_column_and_file(tmp_path):
    bad = tmp_path / "Llama-3.1-8B_tp1_layers.csv"
    bad.write_text("layer_name,input,kv_cache,latency(ns)\nq_proj,1,0,100\n")
    with pytest.raises(UserError) as exc:
        read_profile(bad)
    assert "tp_size" in str(exc.value) and str(bad) in str(exc.value)
    vidur = tmp_path / "x_mlp.csv"
    vidur.write_text("time_stats.attn_pre_proj.median,n_head\n0.1,32\n")
    with pytest.raises(UserError, match="n_kv_head"):
        read_profile(vidur)
    echo = tmp_path / "echo.csv"
    echo.write_text(",".join(c for c in PROFILE_COLUMNS if c != "kv_len") + "\n")
    with pytest.raises(UserError, match="kv_len"):
        read_profile(echo)
    junk = tmp_path / "junk.csv"
    junk.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="unrecognized"):
        read_profile(junk)


def _synthetic_echo_profile(path: Path) -> None:
    """A profile in our own format whose times come from a known parameter set (the fit must recover them)."""
    from cost_models.roofline import RooflineCostModel
    from cost_models.specs import load_model

    spec = load_model("echo-target-small")
    prm = RooflineParams(hardware="test-cpu", gemm_tflops=0.5, gemm_gbps=20.0, elem_gbps=10.0, attn_tflops=0.2,
                         attn_gbps=15.0, gemm_launch_us=20.0, elem_launch_us=10.0, step_overhead_ms=0.3,
                         smooth_p=4.0, attn_smooth_p=4.0)
    m = RooflineCostModel(spec, params=prm)
    rows = [",".join(PROFILE_COLUMNS)]
    for b in (1, 2, 4, 8):
        for t in (1, 4, 16, 64):
            for kv in (0, 128, 512):
                ms = float(m.verify_ms(float(b * t), float(b * kv), b))
                rows.append(",".join(map(str, [
                    spec.name, "cpu", "float32", b, t, kv, b * t, ms, ms * 0.95, ms * 1.05, 5, spec.hidden_size,
                    spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size,
                    spec.vocab_size, "wall"])))
    path.write_text("\n".join(rows) + "\n")


def test_echo_profile_round_trip_through_cli(tmp_path, capsys):
    prof = tmp_path / "profile.csv"
    _synthetic_echo_profile(prof)
    out = tmp_path / "fit.json"
    rc = main(["fit", "--profiles", str(prof), "--out", str(out), "--hardware", "test-cpu"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["hardware"] == "test-cpu" and "step_overhead_ms" in data["fitted_parameters"]
    st = data["stats"][str(prof)]
    assert st["full_fit"]["median_ape_pct"] < 3.0
    assert "heldout" in st
    m = FittedCostModel("echo-target-small", params=out)
    assert m.ar_step_ms(4, 128) > 0
    assert "wrote" in capsys.readouterr().out


def test_fit_cli_bad_input(tmp_path, capsys):
    assert main(["fit", "--profiles", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o.json")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    bad = tmp_path / "bad_layers.csv"
    bad.write_text("layer_name,input,kv_cache,tp_size\nq_proj,1,0,1\n")
    assert main(["fit", "--profiles", str(bad), "--out", str(tmp_path / "o.json"), "--model", "llama-3.1-8b"]) == 2
    err = capsys.readouterr().err
    assert "latency(ns)" in err and "bad_layers.csv" in err


@needs_data
def test_fit_cli_on_real_profiles(tmp_path):
    out = tmp_path / "fit.json"
    rc = main(["fit", "--profiles", str(DATA / "vidur/Llama-2-7b-hf_mlp.csv.gz"),
               str(DATA / "vidur/h100_dgx_all_reduce.csv.gz"), "--out", str(out), "--no-heldout"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["params"]["allreduce"]) == {"2", "4", "8"}
    m = FittedCostModel("codellama-34b", params=out, tp=4)
    assert m.verify_ms(512.0, 1.0, 1) > m.verify_ms(1.0, 1.0, 1)


def test_h200_profile_checks_the_carried_h100_fit():
    """The committed H200 profile (8 Qwen3-8B layers, eager, bf16): where the GPU is busy the H100 fit carried by
    datasheet ratios is within 30% (measured 1.18-1.28x since the causal attention tiles of issue 16; 1.14-1.19x
    before, when the fit's soft attention corner added most of the compute bound to the critical path), the
    datasheet roofline about 2x fast; the H200 eager fit follows the whole grid. cost_model "auto" therefore uses
    the H100 fit on the H200 too."""
    from dataclasses import replace

    from cost_models.fitted import load_fit
    from cost_models.roofline import RooflineCostModel
    from echosim.sim.config import ClusterConfig, build_cost_model

    path = ROOT / "cost_models" / "profiles" / "h200_qwen3_8b_eager.csv"
    t = read_profile(path)
    df = pd.read_csv(path)
    busy = (df.tokens_per_seq >= 1024).to_numpy()
    assert t.n_obs == 60 and busy.sum() == 10 and set(df.timing) == {"cuda_events"}

    def ratio(prm):
        prm = replace(prm, gemm_kernels_per_layer=t.gemm_kernels_per_layer,
                      elem_kernels_per_layer=t.elem_kernels_per_layer)
        return df.time_ms.to_numpy() / predict_obs(t, prm)

    carried = ratio(load_fit("h100")[0].scaled_to("h200"))[busy]
    assert 1.0 < carried.min() and carried.max() < 1.3
    assert ratio(RooflineParams.from_hardware("h200"))[busy].min() > 1.7
    eager = ratio(load_fit("h200_qwen3_8b_eager")[0])
    assert np.median(np.abs(eager - 1)) < 0.1
    assert isinstance(build_cost_model(ClusterConfig(model="qwen3-8b", hardware="h200")), FittedCostModel)
    a100 = build_cost_model(ClusterConfig(model="qwen3-8b", hardware="a100-80gb"))
    assert isinstance(a100, RooflineCostModel) and not isinstance(a100, FittedCostModel)
