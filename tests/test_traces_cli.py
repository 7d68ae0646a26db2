"""`echosim trace inspect` and `echosim trace convert` through echosim.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from echosim.cli import main
from traces import read_arrays

FIXTURES = Path(__file__).parent / "fixtures" / "traces"
AZURE_2023 = Path(__file__).resolve().parents[1] / "traces" / "azure_conv_2023_1h.csv.gz"  # the public CSV, gzipped


def test_inspect_vidur(capsys):
    assert main(["trace", "inspect", str(FIXTURES / "vidur_small.csv")]) == 0
    out = capsys.readouterr().out
    assert "format     vidur (Vidur trace CSV)" in out
    assert "requests   4" in out
    assert "duration   2.0 s" in out
    assert "rate       1.500 req/s" in out          # 3 gaps over 2 s
    assert "prompt" in out and "P99" in out


def test_inspect_json_burstgpt(capsys):
    assert main(["trace", "inspect", "--json", str(FIXTURES / "burstgpt_small.csv")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "burstgpt" and summary["requests"] == 4 and summary["failed_requests"] == 1
    assert summary["prompt_tokens"]["max"] == 1360
    assert summary["output_tokens"]["mean"] == pytest.approx((18 + 217 + 88 + 1) / 4)


def test_inspect_real_azure(capsys):
    assert main(["trace", "inspect", str(AZURE_2023)]) == 0
    out = capsys.readouterr().out
    assert "format     azure" in out and "requests   19,366" in out and "rate       5.530 req/s" in out
    assert "prompt      1154.7" in out and "14050" in out


def test_inspect_sample_by_name(capsys):
    assert main(["trace", "inspect", "azure_conv_2023_5min"]) == 0
    assert "requests   1,445" in capsys.readouterr().out


def test_convert_with_time_scale_and_limit(tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert main(["trace", "convert", str(FIXTURES / "mooncake_small.jsonl"), "-o", str(out),
                 "--time-scale", "0.5", "--limit", "3"]) == 0
    assert "wrote 3 requests (mooncake -> native)" in capsys.readouterr().out
    t = read_arrays(out)
    np.testing.assert_allclose(t.arrival_s, [0.0, 13.741, 15.2675])
    assert t.hash_ids[2] == (16, 17)
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first) == {"arrival_s", "prompt_tokens", "output_tokens", "hash_ids"}


def test_convert_skip_bad_lines(tmp_path, capsys):
    src = tmp_path / "bad.csv"
    src.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,1\n1,oops,2\n2,30,3\n")
    out = tmp_path / "ok.jsonl"
    assert main(["trace", "convert", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:3: field 'num_prefill_tokens': not a number: 'oops'" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]   # no half-written output
    assert main(["trace", "convert", str(src), "-o", str(out), "--skip-bad-lines"]) == 0
    assert "1 bad lines skipped" in capsys.readouterr().out
    assert read_arrays(out).prompt_tokens.tolist() == [10, 30]


def test_convert_rejects_non_jsonl_output(tmp_path, capsys):
    assert main(["trace", "convert", str(FIXTURES / "vidur_small.csv"), "-o", str(tmp_path / "x.csv")]) == 2
    assert "name the output file *.jsonl" in capsys.readouterr().err


def test_convert_gzip_input_and_bad_time_scale(tmp_path, capsys):
    import gzip

    src = tmp_path / "v.csv.gz"
    src.write_bytes(gzip.compress((FIXTURES / "vidur_small.csv").read_bytes()))
    out = tmp_path / "v.jsonl"
    assert main(["trace", "convert", str(src), "-o", str(out), "--time-scale", "2"]) == 0
    np.testing.assert_allclose(read_arrays(out).arrival_s, [0.0, 0.25, 1.0, 4.0])
    assert main(["trace", "convert", str(src), "-o", str(out), "--time-scale", "0"]) == 2
    assert "--time-scale must be a finite number > 0" in capsys.readouterr().err
