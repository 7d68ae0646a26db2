"""The profiler: timing harness, `echosim profile` on the CPU with the project's small draft shape, fit round trip."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cost_models.fitted import FittedCostModel
from cost_models.profiles import PROFILE_COLUMNS, read_profile
from echosim.cli import main


def test_time_forward_counts_calls():
    from cost_models.profiler import time_forward

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
    assert list(df.columns) == PROFILE_COLUMNS and len(df) == 8
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
    assert main(["profile", "--model", "qwen3-235b-a22b", "--out", out]) == 2
    assert "mixture of experts" in capsys.readouterr().err
    assert main(["profile", "--model", "echo-draft-small", "--device", "tpu", "--out", out]) == 2
    with pytest.raises(SystemExit):
        main(["profile", "--model", "echo-draft-small", "--out", out, "--kv-lens", "a,b"])
