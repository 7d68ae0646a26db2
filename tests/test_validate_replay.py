"""`echosim validate --replay` inputs: a bench_serving / vLLM result file converted to a replay folder, and the
one-line errors for what it cannot use. (The end-to-end check, the same errors as `validate` on the same run, is in
tests/test_crossval.py::test_validate_end_to_end_small.)"""

import csv
import json

import pytest

from echosim.cli import main
from echosim.validate.crossval import convert_bench_result, read_replay
from echosim.validate.errors import ValidationError


def bench_file(path, **extra):
    data = {"request_rate": "inf", "input_lens": [10, 20, 30], "output_lens": [4, 3, 0],
            "ttfts": [0.1, 0.2, 0.0], "itls": [[0.01, 0.02, 0.03], [0.05, 0.05], []], "accept_length": 2.5,
            **extra}
    path.write_text(json.dumps(data))
    return path


def test_a_bench_serving_result_becomes_a_replay_folder(tmp_path):
    folder = convert_bench_result(bench_file(tmp_path / "r.json"), tmp_path / "replay")
    rows, summary = read_replay(folder)
    assert [(r.prompt_tokens, r.output_tokens, r.scheduled_s) for r in rows] == [(10, 4, 0.0), (20, 3, 0.0)]
    assert summary["completed"] == 2 and summary["failed"] == 0  # the third request failed: no ttft, no tokens
    assert summary["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert summary["e2e_ms"]["p50"] == pytest.approx((160 + 300) / 2)
    assert summary["mat"] == 2.5
    req = list(csv.DictReader(open(folder / "requests.csv")))
    assert float(req[0]["tpot_ms"]) == pytest.approx(20.0)


@pytest.mark.parametrize("extra,words", [({"request_rate": 4.0}, "no send times"), ({"itls": None}, "itls"),
                                         ({"max_concurrency": 2}, "held requests back")])
def test_bench_results_it_cannot_use(tmp_path, extra, words):
    with pytest.raises(ValidationError, match=words):
        convert_bench_result(bench_file(tmp_path / "r.json", **extra), tmp_path / "replay")


def test_validate_replay_user_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [(["--replay", str(tmp_path / "nope"), "--cost-model", "x.json", "--acceptance", "qwen3-8b"],
              "no such replay"),
             (["--replay", str(tmp_path / "empty")], "--cost-model"),
             (["--replay", str(tmp_path / "empty"), "--cost-model", "x.json"], "--acceptance"),
             (["--replay", str(tmp_path / "empty"), "--cost-model", "x.json", "--acceptance", "qwen3-8b"],
              "not a replay folder")]
    for args, words in cases:
        assert main(["validate", *args, "--out", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (args, err)
