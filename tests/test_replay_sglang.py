"""`echosim replay` against a live SGLang server (SGLang's own server code, on this CPU) started by the test on
127.0.0.1 with the shipped tiny target. SGLang is not a dependency of the project: the test runs where an
interpreter with sglang is named by ECHO_SGLANG_PYTHON (docs/REPLAY.md makes one) or this one has it, and is
skipped elsewhere (CI); the launcher's own tests run everywhere."""

import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

import pytest
from test_server_support import post

from echo_exec import sglang_cpu
from echosim.cli import main

SGLANG_PYTHON = os.environ.get("ECHO_SGLANG_PYTHON") or (sys.executable if find_spec("sglang") else None)
needs_sglang = pytest.mark.skipif(SGLANG_PYTHON is None, reason="no interpreter with sglang (set ECHO_SGLANG_PYTHON)")

TARGET = Path(__file__).resolve().parents[1] / "echo_exec" / "models" / "tiny-target"
DRAFT = TARGET.parent / "tiny-draft"
STANDIN_CALLS = Path(tempfile.gettempdir()) / f"echo-sgl-standin-{os.getpid()}.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sglang_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("sglang") / "server.log"
    port = free_port()
    os.environ["ECHO_SGL_STANDIN_LOG"] = str(STANDIN_CALLS)  # the launcher passes the environment on
    try:
        proc = sglang_cpu.launch(TARGET, port=port, python=SGLANG_PYTHON, log_path=log, max_running_requests=16)
    finally:
        del os.environ["ECHO_SGL_STANDIN_LOG"]
    url = f"http://127.0.0.1:{port}"
    try:
        sglang_cpu.wait_ready(url, proc, timeout_s=300)
        yield url
    except RuntimeError as exc:
        pytest.fail(f"{exc}\n{log.read_text(errors='replace')[-3000:]}")
    finally:
        sglang_cpu.stop(proc)


@needs_sglang
def test_replay_a_trace_against_live_sglang(sglang_url, tmp_path):
    rows = [(0.15 * i, 20 + 17 * i, 16 + 4 * (i % 3)) for i in range(12)]
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": t, "prompt_tokens": p, "output_tokens": o}) + "\n"
                             for t, p, o in rows))
    out = tmp_path / "run"
    assert main(["replay", "--trace", str(trace), "--url", sglang_url, "--out", str(out), "--concurrency", "8",
                 "--quiet"]) == 0
    with open(out / "requests.csv") as f:
        got = list(csv.DictReader(f))
    assert all(r["ok"] == "True" and r["finish_reason"] == "length" for r in got), [r["error"] for r in got]
    # SGLang reads the shipped tokenizer.json: its prompt counts are our byte counts, and ignore_eos holds
    assert [(int(r["prompt_tokens"]), int(r["output_tokens"])) for r in got] == [(p, o) for _, p, o in rows]
    assert all(0 < float(r["ttft_ms"]) <= float(r["e2e_ms"]) for r in got)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == summary["requests"] == 12 and summary["throughput_tok_s"] > 0
    assert summary["mat"] is None  # plain decoding: SGLang reports no verify steps
    # SGLang's own code served it all: no kernel of the import stand-in was called, not even one it caught
    assert not STANDIN_CALLS.exists() or not STANDIN_CALLS.read_text().strip(), STANDIN_CALLS.read_text()


@needs_sglang
def test_sglang_greedy_tokens_are_our_engines(sglang_url):
    """The same weights under SGLang's Llama and our model file give the same greedy tokens, and so does our
    speculative decoding (eagle3, echo) with the shipped draft."""
    import torch

    from echo_exec.engine import Engine, SamplingParams
    from echo_exec.replay import SHIPPED_PROMPTS, load_prompts

    prompts = [list(p.encode("utf-8"))[:120] for p in load_prompts(SHIPPED_PROMPTS)[:6]]
    got = []
    for ids in prompts:
        status, raw = post(sglang_url + "/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": 48, "temperature": 0, "ignore_eos": True}})
        assert status == 200, raw
        got.append(json.loads(raw)["output_ids"])
    torch.set_num_threads(1)
    params = SamplingParams(max_new_tokens=48, temperature=0.0)
    # our plain decoding, and our speculative decoding with the shipped draft (lossless): SGLang's tokens, each
    for policy in ("ar", "eagle3", "echo"):
        engine = Engine(str(TARGET), None if policy == "ar" else str(DRAFT), policy=policy)
        assert got == [r.output_ids for r in engine.generate(prompts, params)], policy


# --- the launcher itself: these run everywhere ---

def test_server_command_runs_sglang_on_the_cpu_with_the_standin_first(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    argv, env = sglang_cpu.server_command(TARGET, port=31234, python="py", max_running_requests=8)
    assert argv[:3] == ["py", "-m", "sglang.launch_server"]
    flags = {a: b for a, b in zip(argv[3:], argv[4:], strict=False) if a.startswith("--")}
    assert flags["--model-path"] == str(TARGET) and flags["--device"] == "cpu" and flags["--port"] == "31234"
    assert flags["--attention-backend"] == "torch_native" and flags["--dtype"] == "float32"
    assert flags["--max-running-requests"] == "8" and "--disable-radix-cache" in argv
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(sglang_cpu.STANDIN_DIR), "/somewhere"]
    _, env = sglang_cpu.server_command(TARGET, port=1, standin=False)
    assert env.get("PYTHONPATH") == "/somewhere"


def test_the_kernels_import_every_name_and_refuse_the_unimplemented(tmp_path):
    code = ("from sgl_kernel import fused_experts_cpu as k, copy_all_layer_kv_cache_cpu\n"
            "try:\n    k(1, 2)\nexcept NotImplementedError as e:\n    print(e)\n")
    calls = tmp_path / "calls.log"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(sglang_cpu.STANDIN_DIR),
                              "ECHO_SGL_STANDIN_LOG": str(calls)}).stdout
    assert "sgl_kernel.fused_experts_cpu is not available" in out
    assert calls.read_text() == "fused_experts_cpu\n"  # logged even when the caller catches it


def test_speculative_flags_follow_the_policy(tmp_path):
    """ECHO's drafting shape and SGLang's dense width come from the policy (the draft's shipped policy-echo.json
    by default); STANDALONE takes them as given."""
    spec = sglang_cpu.speculative_for("ECHO", DRAFT)
    shipped = json.loads((DRAFT / "policy-echo.json").read_text())
    assert (spec.steps, spec.topk, spec.num_draft_tokens) == (shipped["steps"], shipped["topk"],
                                                              shipped["num_draft_tokens"])
    assert spec.policy == "echo" and spec.policy_config == str(DRAFT / "policy-echo.json")
    args = spec.args()
    assert args[args.index("--speculative-algorithm") + 1] == "ECHO"
    assert args[args.index("--speculative-echo-config") + 1] == str(DRAFT / "policy-echo.json")
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps({"policy": "eagle3", "steps": 3, "topk": 4, "num_draft_tokens": 12}))
    spec = sglang_cpu.speculative_for("echo", DRAFT, policy="eagle3", policy_config=cfg)
    assert (spec.steps, spec.topk, spec.num_draft_tokens, spec.policy) == (3, 4, 12, "eagle3")
    spec = sglang_cpu.speculative_for("standalone", DRAFT, steps=4, topk=3, num_draft_tokens=8)
    assert spec.args()[:2] == ["--speculative-algorithm", "STANDALONE"] and "--speculative-echo-policy" not in \
        spec.args()
    argv, _ = sglang_cpu.server_command(TARGET, port=1, attention_backend="intel_amx", speculative=spec)
    assert argv[argv.index("--attention-backend") + 1] == "intel_amx"
    assert argv[argv.index("--speculative-num-draft-tokens") + 1] == "8"


def test_launcher_cli_user_errors(tmp_path, capsys):
    assert sglang_cpu.main(["--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert sglang_cpu.main(["--model", str(TARGET), "--speculative", "ECHO", "--draft", str(tmp_path)]) == 2
    assert "--draft is the draft model's directory" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"policy": "echo", "stepz": 3}))
    assert sglang_cpu.main(["--model", str(TARGET), "--speculative", "ECHO", "--policy-config", str(bad)]) == 2
    assert "has no setting 'stepz'" in capsys.readouterr().err
    if find_spec("sglang") is None:  # (with sglang here, main would start a server and serve until stopped)
        assert sglang_cpu.main(["--model", str(TARGET), "--python", sys.executable]) == 2
        assert "sglang does not import" in capsys.readouterr().err
