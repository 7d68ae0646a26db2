"""`echosim validate --backend sglang`: the simulator against SGLang+ECHO on the same trace.

The step reader (SGLang's log and the plugin's step records -> the engine's IterationRecords) and the one-line
errors run everywhere. The end-to-end run needs an interpreter with sglang and the plugin (ECHO_SGLANG_PYTHON;
CI's SGLang step sets it) and is skipped elsewhere: one SGLang+ECHO server (~90 s to start) is started by the
same code validate uses, then `echosim validate --backend sglang --url` runs against it."""

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echosim.cli import main
from echosim.validate.errors import ValidationError
from echosim.validate.sglang_steps import LogEvent, log_lines, read_log, read_step_records, sglang_steps

SGLANG_PYTHON = os.environ.get("ECHO_SGLANG_PYTHON") or (sys.executable if find_spec("sglang") else None)
ROOT = Path(__file__).resolve().parents[1]
DRAFT = ROOT / "echo_exec" / "models" / "tiny-draft"
# A static ECHO (both tiers: a depth-3 gate; per-request budgets, which SGLang's worker and the simulator read
# alike: a goodput budget would be bound to the fitted step time in the simulator only)
ECHO = {"policy": "echo", "steps": 5, "topk": 2, "num_draft_tokens": 10, "remaining_num_draft_tokens": 4,
        "gates": [[3, 0.3]], "budget": {"kind": "per_request", "tokens": 9}}

LOG = """\
[2026-12-07 05:23:22.624] Prefill batch, #new-seq: 1, #new-token: 29, #cached-token: 0, token usage: 0.02, \
#running-req: 0, #queue-req: 0, #pending-token: 0, cpu graph: False, input throughput (token/s): 19.11
Loading safetensors\rLoading safetensors 100%
[2026-12-07 05:23:22.650] Decode batch, #running-req: 1, #token: 49, token usage: 0.03, accept len: 3.00, \
accept rate: 0.22, cpu graph: False, gen throughput (token/s): 0.10, #queue-req: 0
[2026-12-07 05:23:22.700] Prefill batch, #new-seq: 2, #new-token: 240, #cached-token: 0, token usage: 0.2, \
#running-req: 1, #queue-req: 0, #pending-token: 0, cpu graph: False, input throughput (token/s): 1000.0
[2026-12-07 05:23:22.730] Decode batch, #running-req: 3, #token: 300, token usage: 0.2, accept len: 3.00, \
accept rate: 0.22, cpu graph: False, gen throughput (token/s): 40.0, #queue-req: 0
[2026-12-07 05:23:22.760] Decode batch, #running-req: 3, #token: 0, token usage: 0.0, accept len: 3.00, \
accept rate: 0.22, cpu graph: False, gen throughput (token/s): 40.0, #queue-req: 0
"""
RECORDS = [{"rids": ["a"], "tree_tokens": [10], "gated": [False], "stop_depth": [5], "accepted": [2]},
           {"rids": ["a", "b", "c"], "tree_tokens": [10, 4, 10], "gated": [False, True, False],
            "stop_depth": [5, 3, 5], "accepted": [3, 0, 1]},
           {"rids": ["a", "b", "c"], "tree_tokens": [4, 4, 10], "gated": [True, True, False],
            "stop_depth": [3, 3, 4], "accepted": [1, 1, 2]}]


def write(tmp_path: Path) -> tuple[Path, Path]:
    log, recs = tmp_path / "server.log", tmp_path / "steps.jsonl"
    log.write_bytes(LOG.encode())
    recs.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return log, recs


def test_sglang_steps_from_log_and_records(tmp_path):
    log, recs = write(tmp_path)
    events = read_log(log)
    assert [e.kind for e in events] == ["prefill", "decode", "prefill", "decode", "decode"]
    assert log_lines(log) == 6  # the \r of a progress bar is no line break: a mark counts what read_log skips
    assert read_log(log, 2)[0].kind == "decode"
    steps = sglang_steps(events, read_step_records(recs), tree_tokens=10, topk=2)
    # the prefill after an idle server has no known start, nor the first line; the rest are timed back to back
    assert [round(s.step_ms, 3) for s in steps] == [26.0, 50.0, 30.0, 30.0]
    first, prefill, mixed, last = steps
    assert first.verify_tokens.tolist() == [10] and first.context_lens.tolist() == [49.0]
    assert first.draft_rows == (1.0, 2.0, 2.0, 2.0, 2.0) and first.accepted == 2  # depth 5, beam 2
    assert prefill.verify_tokens is None and prefill.prefill_chunks == [(240, 0)]
    assert mixed.verify_tokens.tolist() == [10, 10, 10]  # dense: every request verifies SGLang's N
    assert mixed.context_lens.tolist() == [100.0] * 3 and mixed.accepted == 4
    # the batch's last line is written after its requests freed their KV: the previous contexts stand
    assert last.context_lens.tolist() == [100.0] * 3 and last.draft_rows == (3.0, 6.0, 6.0, 6.0)
    ragged = sglang_steps(events, RECORDS, tree_tokens=10, topk=2, ragged=True)
    assert ragged[2].verify_tokens.tolist() == [10, 4, 10]
    # plain decoding: no records, the log's batch, one token each
    plain = sglang_steps(events, None, tree_tokens=1, topk=1)
    assert plain[2].verify_tokens.tolist() == [1, 1, 1] and plain[2].draft_rows == ()


def test_sglang_steps_refuse_what_does_not_match(tmp_path):
    log, recs = write(tmp_path)
    with pytest.raises(ValidationError, match="2 plugin step records for 3 decode lines"):
        sglang_steps(read_log(log), RECORDS[:2], tree_tokens=10, topk=2)
    undated = tmp_path / "undated.log"
    undated.write_text("[2026-12-07 05:23:22] Decode batch, #running-req: 1, #token: 49\n")
    with pytest.raises(ValidationError, match="SGLANG_LOG_MS=1"):
        read_log(undated)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    with pytest.raises(ValidationError) as exc:
        read_step_records(bad)
    assert exc.value.line == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["prefill", "decode"]), st.integers(1, 200), st.integers(0, 4)),
                min_size=1, max_size=40))
def test_sglang_steps_account_for_every_timed_gap(spec):
    """Every step is the gap to the line before; only the first line and prefills after an idle server (none
    running) are left out, so the timed steps add up to the span less those gaps."""
    t, events = 0.0, []
    for kind, gap_ms, running in spec:
        t += gap_ms / 1e3
        events.append(LogEvent(t, kind, running, 16, 1, 64 * running))
    steps = sglang_steps(events, None, tree_tokens=1, topk=1, mean_context=32.0)
    skipped = sum(b.end_s - a.end_s for a, b in zip(events, events[1:], strict=False)
                  if b.kind == "prefill" and b.running == 0)
    assert sum(s.step_ms for s in steps) == pytest.approx((t - events[0].end_s - skipped) * 1e3, abs=1e-6)
    assert all(s.step_ms > 0 for s in steps)
    assert all(np.all(s.context_lens > 0) for s in steps if s.verify_tokens is not None)


def test_validate_sglang_user_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ECHO_SGLANG_PYTHON", raising=False)
    base = ["validate", "--backend", "sglang", "--policy", "echo", "--policy-config", json.dumps(ECHO),
            "--limit", "4", "--out", str(tmp_path / "out")]
    cases = [([], "no interpreter with SGLang"),
             (["--sglang-python", str(tmp_path / "no-python")], "cannot run the SGLang interpreter"),
             (["--url", "http://127.0.0.1:9"], "cannot reach the SGLang server at http://127.0.0.1:9"),
             (["--device", "cuda"], "--device cpu")]
    if find_spec("sglang") is None:
        cases.append((["--sglang-python", sys.executable], "sglang does not import"))
    for args, words in cases:
        assert main([*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("echosim: error:") and words in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
    assert main(["validate", "--url", "http://127.0.0.1:9", "--limit", "4", "--out", str(tmp_path / "o")]) == 2
    assert "go with --backend sglang" in capsys.readouterr().err


def test_validate_sglang_server_that_fails_to_start(tmp_path, capsys, monkeypatch):
    """An interpreter that imports sglang but whose server exits at once: one line naming the server's log and
    its last line (the profile is stubbed: the server is awaited after it)."""
    import echosim.validate.sglang_backend as sb

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\necho "boom: no model here"\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sb, "profile_and_fit", lambda *a, **k: tmp_path / "unused.json")
    out = tmp_path / "out"
    assert main(["validate", "--backend", "sglang", "--sglang-python", str(fake), "--policy", "echo",
                 "--policy-config", json.dumps(ECHO), "--limit", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exited with code 3" in err and "boom: no model here" in err and "Traceback" not in err, err
    assert str(out / "sglang_server.log") in err
    # the server's process group is gone
    assert subprocess.run(["pgrep", "-f", str(fake)], capture_output=True).returncode != 0


@pytest.mark.skipif(SGLANG_PYTHON is None, reason="no interpreter with sglang (set ECHO_SGLANG_PYTHON)")
def test_validate_against_sglang_echo(tmp_path, capsys):
    """SGLang+ECHO started by validate's own code, then `validate --backend sglang --url` against it: the error
    table, the run folder of `validate`, SGLang's steps read back one per verify step, its MAT its own."""
    from echosim.validate.crossval import CrossValConfig
    from echosim.validate.sglang_backend import SglangOptions, sglang_server, wait_ready

    small = ["--limit", "10", "--max-prompt-tokens", "96", "--max-output-tokens", "24", "--max-running", "4",
             "--calibration-prompts", "8", "--engine-runs", "1", "--time-scale", "0.5"]
    cfg = CrossValConfig(model=str(ROOT / "echo_exec" / "models" / "tiny-target"), draft=str(DRAFT),
                         policy="echo", policy_config={k: v for k, v in ECHO.items() if k != "policy"},
                         max_prompt_tokens=96, max_output_tokens=24, max_running=4)
    srv_dir = tmp_path / "server"
    srv_dir.mkdir()
    out = tmp_path / "val"
    with sglang_server(cfg, SglangOptions(python=SGLANG_PYTHON), srv_dir, print) as server:
        wait_ready(server, 600)
        assert server.info["speculative_algorithm"] == "ECHO" and server.tree_tokens == 10
        code = main(["validate", "--backend", "sglang", "--url", server.url, "--server-log", str(server.log),
                     "--server-records", str(server.records), "--policy", "echo", "--policy-config",
                     json.dumps(ECHO), *small, "--out", str(out)])
        printed = capsys.readouterr().out
    assert code == 0
    assert "| throughput_tok_s |" in printed and "| mat |" in printed and "SGLang against simulator" in printed
    for name in ("config.json", "profile_target.csv", "cost_fit.json", "overheads.json", "acceptance.json",
                 "calibration_records.jsonl", "calibration_iterations.csv", "engine/requests.csv",
                 "engine/summary.json", "engine/iterations.csv", "sim/requests.csv", "sim/iterations.csv",
                 "validation.json", "validation.md", "validation.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "validation.json").read_text())
    assert res["backend"] == "sglang" and res["sglang"]["tree_tokens"] == 10
    rows = {r["metric"]: r for r in res["metrics"]}
    # SGLang's own counts (spec_verify_ct, spec_num_correct_drafts): speculation pays on this pair
    assert rows["mat"]["engine"] > 1.5 and res["sglang"]["calibration_mat"] > 1.5
    engine = res["engine"]
    assert engine["completed"] == 10 and engine["failed"] == 0
    # one decode row per verify step SGLang counted (the plugin's records), none lost reading its log back
    steps = np.genfromtxt(out / "engine" / "iterations.csv", delimiter=",", names=True)
    decode = steps[steps["prefill_tokens"] == 0]
    req = np.genfromtxt(out / "engine" / "requests.csv", delimiter=",", names=True)
    assert decode["batch"].sum() == pytest.approx(req["steps"].sum(), rel=0.02) and decode["batch"].max() <= 4
    assert res["overheads"]["steps"] >= 20 and np.all(steps["step_ms"] > 0)
    assert all(r["sim"] is not None and r["sim"] > 0 for r in res["metrics"])
    # SGLang's worker runs our policy: on the same replay our own engine (the same validate, engine backend) gets
    # the same MAT. The simulator's MAT is not bounded here: its acceptance is fitted on the calibration prompts,
    # and 10 short replay requests differ from them by up to ~40% for both engines alike (docs/VALIDATION.md:
    # within 2.5-4.3% on the measured 24-48-request runs).
    assert main(["validate", "--policy", "echo", "--policy-config", json.dumps(ECHO), *small,
                 "--out", str(tmp_path / "ours")]) == 0
    ours = {r["metric"]: r for r in json.loads((tmp_path / "ours" / "validation.json").read_text())["metrics"]}
    assert rows["mat"]["engine"] == pytest.approx(ours["mat"]["engine"], rel=0.15)
