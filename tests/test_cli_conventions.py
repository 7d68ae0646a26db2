"""CLI conventions: `echosim run --config` (YAML/JSON, and a run folder's config.json reruns the same run),
bench_serving / vLLM flag spellings beside ours, --sort for unsorted traces, defaults shown in --help."""

import json

import pytest

from echosim.cli import main


def test_a_run_folders_config_reruns_the_same_run(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--trace", "azure_conv_2023_5min", "--requests", "60", "--policy", "eagle3", "--set",
                 "steps=3", "--out", str(first), "--no-progress"]) == 0
    assert main(["run", "--config", str(first / "config.json"), "--out", str(second), "--no-progress"]) == 0
    for name in ("config.json", "summary.json", "requests.csv", "iterations.csv"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    capsys.readouterr()


def test_yaml_config_with_bench_serving_spellings_and_command_line_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trace: azure_conv_2023_5min\npolicy: ar\nnum-prompts: 30\nrequest-rate: 4\nburstiness: 0.25\n"
                   "block-size: 32\nseed: 5\n")
    out = tmp_path / "y"
    assert main(["run", "--config", str(cfg), "--seed", "7", "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    w, sim = saved["workload"], saved["sim"]
    assert (w["kind"], w["rate_rps"], w["requests"]) == ("gamma", 4, 30)
    assert w["cv"] == pytest.approx(2.0)  # gamma shape 0.25: CV 1 / sqrt(0.25)
    assert sim["cluster"]["block_tokens"] == 32 and sim["policy"] == {"policy": "ar"}
    assert sim["seed"] == 7  # the command line wins over the file
    capsys.readouterr()


@pytest.mark.parametrize("text,name,words", [
    ("trace: [unclosed\n", "bad.yaml", "not valid YAML"),
    ("{\"trace\": 1,}", "bad.json", "not valid JSON"),
    ("- a\n- b\n", "list.yaml", "a mapping"),
    ("bogus_flag: 1\n", "unknown.yaml", "unknown setting 'bogus_flag'"),
])
def test_bad_config_is_one_line(tmp_path, capsys, text, name, words):
    path = tmp_path / name
    path.write_text(text)
    assert main(["run", "--config", str(path), "--no-save", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and str(path) in err and "Traceback" not in err


def test_unsorted_trace_points_to_a_flag_that_exists(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": t, "prompt_tokens": 20, "output_tokens": 10}) + "\n"
                             for t in (0.0, 1.0, 0.5, 2.0)))
    assert main(["run", "--trace", str(trace), "--no-save", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--sort" in err
    assert main(["run", "--trace", str(trace), "--sort", "--no-save", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 4


@pytest.mark.parametrize("command,flag,default", [("run", "--max-running", "256"), ("serve", "--max-running", "32"),
                                                  ("replay", "--slo-ttft-ms", "2000.0")])
def test_help_shows_defaults(capsys, command, flag, default):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert flag in out and f"(default: {default})" in out
