"""`echosim run` end to end through echosim.cli.main: the run folder, the table, determinism, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from echosim.cli import main
from echosim.metrics import ITERATION_COLUMNS, REQUEST_COLUMNS

SAMPLE = Path(__file__).resolve().parents[1] / "traces" / "azure_conv_2023_5min.jsonl"


def small_trace(tmp_path: Path, n: int = 40, gap_s: float = 0.05, bad_line: str | None = None) -> Path:
    """The first n requests of the shipped Azure sample, outputs capped at 60 tokens (a fast run)."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:n]]
    path = tmp_path / "small.jsonl"
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps({"arrival_s": round(i * gap_s, 6), "prompt_tokens": r["prompt_tokens"],
                                 "output_tokens": min(r["output_tokens"], 60)}))
    if bad_line is not None:
        lines.insert(3, bad_line)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_run_writes_a_self_describing_folder(tmp_path, capsys):
    trace = small_trace(tmp_path)
    out = tmp_path / "run"
    assert main(["run", "--trace", str(trace), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for label in ("throughput (tok/s)", "goodput (tok/s)", "MAT (tokens/step)", "verification waste",
                  "mean batch", "preemptions", "TTFT p99 (ms)", "TPOT p50 (ms)", "E2E mean (ms)"):
        assert label in text
    config = json.loads((out / "config.json").read_text())
    assert config["sim"]["cluster"]["model"] == "qwen3-8b" and config["sim"]["policy"]["policy"] == "echo"
    assert config["workload"]["trace"] == str(trace)
    summary = json.loads((out / "summary.json").read_text())
    requests = read_csv(out / "requests.csv")
    iterations = read_csv(out / "iterations.csv")
    assert list(requests[0]) == list(REQUEST_COLUMNS)
    assert list(iterations[0]) == list(ITERATION_COLUMNS)
    assert len(requests) == summary["requests"] == 40
    # every request finishes at its output length, after its first token, after it arrived
    for r in requests:
        assert float(r["arrival_s"]) <= float(r["first_token_s"]) <= float(r["finish_s"])
    assert sum(int(r["output_tokens"]) for r in requests) == summary["output_tokens"]
    # per-iteration rows add up to the summary, and the step time is the sum of its parts
    assert sum(int(r["batch"]) for r in iterations) == summary["decode_request_steps"]
    assert sum(int(r["accepted"]) for r in iterations) == summary["accepted_drafts"]
    for r in iterations[:50]:
        parts = sum(float(r[k]) for k in ("draft_ms", "verify_ms", "lm_head_ms", "overhead_ms"))
        assert parts == pytest.approx(float(r["step_ms"]), abs=2e-4)
        assert float(r["end_s"]) > float(r["start_s"])
    assert 1.0 < summary["mat"] < 8.0
    assert 0.0 < summary["verification_waste"] < 1.0


def test_same_seed_same_files_other_seed_differs(tmp_path):
    trace = small_trace(tmp_path)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        assert main(["run", "--trace", str(trace), "--out", str(out), "--seed", str(seed)]) == 0
    for name in ("requests.csv", "iterations.csv", "summary.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "requests.csv").read_bytes() != (c / "requests.csv").read_bytes()


def test_compare_policies_one_table_with_ratios(tmp_path, capsys):
    trace = small_trace(tmp_path, n=25)
    out = tmp_path / "cmp"
    small = 'eagle3{"steps": 3, "topk": 3, "num_draft_tokens": 6}'   # inline settings
    assert main(["run", "--trace", str(trace), "--out", str(out), "--compare-policies",
                 f"ar,eagle3,echo,{small}"]) == 0
    text = capsys.readouterr().out
    assert "eagle3/ar" in text and "echo/ar" in text and "eagle3[3,3,6]/ar" in text
    runs = ("ar", "eagle3", "echo", "eagle3[3,3,6]")
    summaries = {p: json.loads((out / p / "summary.json").read_text()) for p in runs}
    mats = {p: s["mat"] for p, s in summaries.items()}
    assert mats["ar"] == 1.0 and mats["eagle3"] > 1.5 and mats["echo"] > 1.5
    small_run = summaries["eagle3[3,3,6]"]
    assert small_run["verified_tokens"] == 6 * small_run["decode_request_steps"]
    # same workload: the same requests with the same lengths under every policy
    lengths = [[(r["prompt_tokens"], r["output_tokens"]) for r in read_csv(out / p / "requests.csv")]
               for p in ("ar", "eagle3")]
    assert sorted(lengths[0]) == sorted(lengths[1])


def test_json_output_and_closed_loop_flags(capsys):
    assert main(["run", "--concurrency", "4", "--requests", "8", "--input-len", "50", "--output-len", "40",
                 "--policy", "eagle3", "--set", "steps=3", "--set", "topk=3", "--set", "num_draft_tokens=6",
                 "--no-save", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["requests"] == 8 and s["output_tokens"] == 320
    assert s["speculation"]["policy"]["num_draft_tokens"] == 6


def test_records_written_per_node(tmp_path):
    trace = small_trace(tmp_path, n=6)
    rec = tmp_path / "nodes.jsonl"
    assert main(["run", "--trace", str(trace), "--no-save", "--records", str(rec), "--policy", "eagle3"]) == 0
    rows = [json.loads(line) for line in rec.read_text().splitlines()]
    assert rows and set(rows[0]) >= {"step", "request", "depth", "rank", "draft_prob", "path_prob", "accepted"}
    assert any(r["accepted"] for r in rows) and not all(r["accepted"] for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--hardware", "tpu9"], "unknown hardware"),
    (["--policy", "nope"], "unknown policy"),
    (["--model", "llama-3.3-70b", "--tp", "1"], "does not fit"),
    (["--router", "random"], "unknown router"),
    (["--set", "steps"], "KEY=VALUE"),
    (["--policy", "eagle3", "--set", "num_draft_tokens=999"], "num_draft_tokens"),
    (["--core", "table", "--policy", "tetris"], "--core exact"),
])
def test_impossible_config_is_one_line(tmp_path, capsys, args, message):
    trace = small_trace(tmp_path, n=3)
    assert main(["run", "--trace", str(trace), "--no-save", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("echosim: error:") and message in err and "\n" not in err


def test_bad_trace_line_names_file_line_field_or_is_skipped(tmp_path, capsys):
    trace = small_trace(tmp_path, n=10, bad_line='{"arrival_s": 0.2, "prompt_tokens": -5, "output_tokens": 3}')
    assert main(["run", "--trace", str(trace), "--no-save"]) == 2
    err = capsys.readouterr().err
    assert f"{trace}:4: field 'prompt_tokens'" in err
    assert main(["run", "--trace", str(trace), "--no-save", "--skip-bad-lines", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["requests"] == 10 and s["bad_lines_skipped"] == 1


def test_no_workload_is_an_error(capsys):
    assert main(["run", "--no-save"]) == 2
    assert "--trace" in capsys.readouterr().err
