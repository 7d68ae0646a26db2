"""The profiler: timing harness, `echosim profile` on the CPU with the project's small draft shape, fit round trip."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cost_models.fitted import FittedCostModel
from cost_models.profiles import PROFILE_COLUMNS, read_profile
from echosim.cli import main


def test_time_forward_counts_calls():
    from echo_exec.profiler import time_forward

    calls = []
    tm = time_forward(lambda: calls.append(1), warmup=3, repeats=7)
    assert len(calls) == 10 and tm.repeats == 7
    assert 0 <= tm.p10_ms <= tm.median_ms <= tm.p90_ms


def test_profile_cli_round_trip(tmp_path, capsys):
    out = tmp_path / "p.csv"
    rc = main(["profile", "--model", "echo-draft-small", "--device", "cpu", "--out", str(out),
               "--batch-sizes", "1,4", "--tokens-per-seq", "1,8", "--kv-lens", "0,64", "--warmup", "1",
               "--repeats", "2", "--threads", "1"])
    assert rc == 0
    df = pd.read_csv(out)
    assert list(df.columns) == PROFILE_COLUMNS and len(df) == 8 and set(df.timing) == {"wall"}
    assert (df.time_ms > 0).all() and set(df.num_tokens) == {1, 8, 4, 32}
    t = read_profile(out)
    assert t.fmt == "echo" and t.n_obs == 8 and t.model_name == "echo-draft-small"
    fit = tmp_path / "fit.json"
    assert main(["fit", "--profiles", str(out), "--out", str(fit), "--hardware", "cpu", "--no-heldout"]) == 0
    assert json.loads(fit.read_text())["hardware"] == "cpu"
    assert FittedCostModel("echo-draft-small", params=fit).ar_step_ms(4, 64) > 0
    capsys.readouterr()


def test_profile_cli_bad_input(tmp_path, capsys):
    out = str(tmp_path / "p.csv")
    assert main(["profile", "--model", "nope", "--out", out]) == 2
    assert "echo-target-small" in capsys.readouterr().err
    assert main(["profile", "--model", "echo-draft-small", "--device", "cpu", "--cuda-graph", "--out", out]) == 2
    assert "--cuda-graph: needs --device cuda" in capsys.readouterr().err
    assert main(["profile", "--model", "qwen3-235b-a22b", "--out", out]) == 2
    assert "mixture of experts" in capsys.readouterr().err
    assert main(["profile", "--model", "echo-draft-small", "--device", "tpu", "--out", out]) == 2
    with pytest.raises(SystemExit):
        main(["profile", "--model", "echo-draft-small", "--out", out, "--kv-lens", "a,b"])


def test_profile_without_timing_column_still_reads(tmp_path):
    """Profiles written before the `timing` column read as before."""
    out = tmp_path / "p.csv"
    assert main(["profile", "--model", "echo-draft-small", "--device", "cpu", "--out", str(out),
                 "--batch-sizes", "1", "--tokens-per-seq", "1,8", "--kv-lens", "0", "--warmup", "0",
                 "--repeats", "1", "--threads", "1"]) == 0
    old = tmp_path / "old.csv"
    pd.read_csv(out).drop(columns="timing").to_csv(old, index=False)
    assert read_profile(old).n_obs == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profile_cuda_graph_replays_faster_than_eager():
    """On a GPU the graph-captured forward gives the kernels' time; the eager one adds Python's launch gaps,
    which dominate a small model."""
    from cost_models.specs import load_model
    from echo_exec.profiler import profile_model

    spec = load_model("echo-draft-small")
    grid = dict(batch_sizes=(1, 4), tokens_per_seq=(1, 16), kv_lens=(0, 512), warmup=2, repeats=5)
    graph = profile_model(spec, device="cuda", dtype="bfloat16", cuda_graph=True, **grid)
    eager = profile_model(spec, device="cuda", dtype="bfloat16", cuda_graph=False, **grid)
    assert {r["timing"] for r in graph} == {"cuda_graph"} and {r["timing"] for r in eager} == {"cuda_events"}
    g = np.array([r["time_ms"] for r in graph])
    e = np.array([r["time_ms"] for r in eager])
    assert (g > 0).all() and np.median(g / e) < 0.8
