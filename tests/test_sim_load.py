"""The run's word on load (offered vs an estimated capacity, backlog), TPOT for 1-token outputs, and the CLI's
number checks: each one line, never a traceback or a NaN table."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from echosim.cli import main

SAMPLE = "traces/azure_conv_2023_5min.jsonl"


def test_overload_is_warned_and_recorded(tmp_path, capsys):
    out = tmp_path / "hot"
    assert main(["run", "--trace", SAMPLE, "--requests", "400", "--time-scale", "0.02", "--policy", "ar",
                 "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("echosim: warning: overloaded: the workload offers")
    load = json.loads((out / "summary.json").read_text())["load"]
    assert load["overloaded"] and load["load_ratio"] > 5 and load["waiting_at_last_arrival"] > 100
    assert load["warning"] in err
    # a saturated run serves about what the estimate says it can
    s = json.loads((out / "summary.json").read_text())
    served_rps = s["requests"] / s["makespan_s"]
    assert served_rps == pytest.approx(load["capacity_rps_est"], rel=0.25)


def test_the_shipped_sample_at_its_own_rate_is_not_overloaded(tmp_path, capsys):
    assert main(["run", "--trace", SAMPLE, "--requests", "300", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    load = json.loads((tmp_path / "r" / "summary.json").read_text())["load"]
    assert not load["overloaded"] and load["warning"] is None and load["load_ratio"] < 1


def test_closed_loop_has_no_load_verdict(capsys):
    assert main(["run", "--concurrency", "4", "--requests", "8", "--output-len", "20", "--no-save", "--json",
                 "--no-progress"]) == 0
    assert "load" not in json.loads(capsys.readouterr().out)


def test_one_token_outputs_have_no_tpot(tmp_path):
    trace = tmp_path / "t.jsonl"
    outputs = [1, 30, 1, 50, 1, 40]
    trace.write_text("".join(f'{{"arrival_s": {0.5 * i}, "prompt_tokens": 100, "output_tokens": {o}}}\n'
                             for i, o in enumerate(outputs)))
    assert main(["run", "--trace", str(trace), "--out", str(tmp_path / "r"), "--no-progress", "--policy",
                 "eagle3"]) == 0
    rows = list(csv.DictReader((tmp_path / "r" / "requests.csv").open()))
    tpot = {int(r["output_tokens"]): r["tpot_ms"] for r in rows}
    assert tpot[1] == "" and all(float(tpot[o]) > 0 for o in (30, 40, 50))
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["tpot_ms"]["requests"] == 3
    x = np.array([float(tpot[o]) for o in (30, 40, 50)])
    assert s["tpot_ms"]["mean"] == pytest.approx(x.mean(), abs=2e-3)
    assert s["tpot_ms"]["p50"] == pytest.approx(np.percentile(x, 50), abs=2e-3)
    assert s["slo_attainment"] == 1.0   # a 1-token output has no TPOT to miss


@pytest.mark.parametrize("flags, message", [
    (["--time-scale", "nan"], "--time-scale must be a finite number > 0, got nan"),
    (["--time-scale", "inf"], "--time-scale must be a finite number > 0, got inf"),
    (["--time-scale", "-1"], "--time-scale must be a finite number > 0"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--requests", "0"], "--requests must be an integer >= 1"),
    (["--replicas", "0"], "--replicas must be an integer >= 1"),
    (["--kv-blocks", "-3"], "--kv-blocks must be an integer >= 1"),
    (["--max-prefill-tokens", "0"], "--max-prefill-tokens must be an integer >= 1"),
    (["--rate", "nan", "--requests", "5"], "--rate must be a finite number > 0, got nan"),
    (["--rate", "2", "--cv", "inf", "--requests", "5"], "--cv must be a finite number > 0, got inf"),
    (["--rate", "2", "--burstiness", "nan", "--requests", "5"], "--burstiness must be a finite number > 0, got nan"),
    (["--concurrency", "0"], "--concurrency must be an integer >= 1"),
    (["--input-len", "20000000", "--concurrency", "1"], "--input-len must be an integer in [1, 10,000,000]"),
    (["--gpu-memory-utilization", "nan"], "--gpu-memory-utilization must be in (0, 1]"),
    (["--step-overhead-ms", "inf"], "--step-overhead-ms must be a finite number >= 0"),
    (["--slo-tpot-ms", "0"], "--slo-tpot-ms must be a finite number > 0"),
])
def test_every_number_is_checked(capsys, flags, message):
    assert main(["run", "--trace", SAMPLE, "--no-save", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"echosim: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("content, message", [
    ("seed: -1\n", "--seed must be an integer >= 0, got -1"),
    ('time_scale: "fast"\n', "--time-scale must be a number, got 'fast'"),
    ("requests: true\n", "--requests must be an integer, got True"),
    ("time_scale: .nan\n", "--time-scale must be a finite number > 0, got nan"),
])
def test_numbers_from_a_config_file_are_checked(tmp_path, capsys, content, message):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    assert main(["run", "--trace", SAMPLE, "--no-save", "--no-progress", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"echosim: error: {message}") and err.count("\n") == 1, err


def test_trace_convert_numbers_are_checked(tmp_path, capsys):
    for flags, message in ((["--time-scale", "inf"], "--time-scale must be a finite number > 0"),
                           (["--limit", "-1"], "--limit must be >= 0")):
        assert main(["trace", "convert", SAMPLE, "-o", str(tmp_path / "o.jsonl"), *flags]) == 2
        assert capsys.readouterr().err.startswith(f"echosim: error: {message}")


def test_latency_columns_spill_to_disk_and_read_back_exactly(monkeypatch):
    # past _SPILL_ROWS the per-request latencies leave memory a block at a time; the summary is the same
    from echosim import metrics as m

    rng = np.random.default_rng(0)
    values = rng.lognormal(3.0, 1.0, size=1000)
    monkeypatch.setattr(m, "_SPILL_ROWS", 64)
    col = m._Column()
    for v in values.tolist():
        col.append(v)
    assert col.spilled == 960 and len(col.buf) == 40 and len(col) == 1000
    np.testing.assert_array_equal(col.values(), values)
    np.testing.assert_array_equal(col.values(), values)   # reading back twice: the same

    class R:  # a finished request as Metrics.request reads it
        def __init__(self, i, out):
            self.index, self.id, self.arrival_s, self.first_token_s = i, None, float(i), i + 0.05 * (1 + i % 7)
            self.prompt_tokens, self.output_tokens = 10, out
            self.steps = self.accepted = self.verified = self.preemptions = 0

    summaries = []
    for spill in (64, 1 << 30):
        monkeypatch.setattr(m, "_SPILL_ROWS", spill)
        metrics = m.Metrics(None, 2000.0, 100.0)
        for i in range(1000):
            metrics.request(R(i, 1 + i % 5), i + 0.3 + 0.01 * (i % 11), 0)
        summaries.append(metrics.summary(0))
    assert summaries[0] == summaries[1]
    assert summaries[0]["tpot_ms"]["requests"] == 800 and summaries[0]["output_tokens"] == 3000


def test_unwritable_outputs_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [(["trace", "convert", SAMPLE, "-o", str(blocker / "x.jsonl")], f"{blocker / 'x.jsonl'}: cannot write"),
             (["run", "--trace", SAMPLE, "--requests", "3", "--out", str(blocker / "run"), "--no-progress"],
              f"{blocker / 'run'}: cannot write the run folder"),
             (["run", "--trace", SAMPLE, "--requests", "3", "--no-save", "--records", str(blocker / "r.jsonl"),
               "--no-progress"], f"{blocker / 'r.jsonl'}: cannot write the records")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"echosim: error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("value, message", [
    ("5", 'a budget is a JSON object like {"kind": "goodput", "tokens": 31}, got 5'),
    ('"goodput"', "a budget is a JSON object"),
    ('{"kind": "goodput", "tokens": true}', "budget tokens must be an integer, got True"),
    ('{"kind": "goodput", "tokens": 1e400}', "budget tokens must be an integer, got inf"),
    ('{"kind": "goodput", "tokens": "many"}', "budget tokens must be an integer, got 'many'"),
])
def test_bad_budget_setting_is_one_line(capsys, value, message):
    assert main(["run", "--trace", SAMPLE, "--requests", "3", "--no-save", "--no-progress", "--set",
                 f"budget={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("echosim: error: field 'policy': policy 'echo' setting 'budget': ") and message in err
