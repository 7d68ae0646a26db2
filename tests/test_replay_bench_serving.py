"""SGLang's own benchmark client, `python -m sglang.bench_serving` (backends `sglang` and `sglang-oai`), against
`echosim serve` with the shipped tiny pair on 127.0.0.1: every request completes, and the numbers it reports match
our replay of the same requests. Runs where an interpreter with sglang is named by ECHO_SGLANG_PYTHON (CI's SGLang
step; docs/REPLAY.md makes one), skipped elsewhere. Nothing is downloaded: the tokenizer is the model directory's
and the dataset a ShareGPT-format file written here from the shipped prompt set."""

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from test_server_support import ROOT, ServerProcess

from echosim.cli import main

SGLANG_PYTHON = os.environ.get("ECHO_SGLANG_PYTHON") or (sys.executable if find_spec("sglang") else None)
pytestmark = pytest.mark.skipif(SGLANG_PYTHON is None, reason="no interpreter with sglang (set ECHO_SGLANG_PYTHON)")

TARGET = ROOT / "echo_exec" / "models" / "tiny-target"
DRAFT = ROOT / "echo_exec" / "models" / "tiny-draft"
NUM_PROMPTS = 16


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(["--model", str(TARGET), "--draft", str(DRAFT), "--threads", "1", "--no-access-log"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def sharegpt(tmp_path_factory) -> Path:
    from echo_exec.replay import SHIPPED_PROMPTS, load_prompts

    path = tmp_path_factory.mktemp("data") / "sharegpt.json"
    rows = [{"id": str(i), "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": p}]}
            for i, p in enumerate(load_prompts(SHIPPED_PROMPTS))]
    path.write_text(json.dumps(rows))
    return path


def bench(url: str, backend: str, dataset: Path, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [SGLANG_PYTHON, "-m", "sglang.bench_serving", "--backend", backend, "--base-url", url,
           "--model", str(TARGET), "--tokenizer", str(TARGET), "--dataset-name", "random", "--dataset-path",
           str(dataset), "--random-input-len", "64", "--random-output-len", "16", "--num-prompts", str(NUM_PROMPTS),
           "--request-rate", "inf", "--max-concurrency", "8", "--seed", "1", "--disable-tqdm", "--output-details",
           "--output-file", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text().splitlines()[-1])


@pytest.mark.parametrize("backend", ["sglang", "sglang-oai"])
def test_bench_serving_completes_and_agrees_with_our_replay(server, sharegpt, tmp_path, backend):
    got = bench(server.url, backend, sharegpt, tmp_path / "bench.jsonl")
    assert got["completed"] == NUM_PROMPTS and not any(got.get("errors") or [])
    assert got["total_output_tokens"] == sum(got["output_lens"])
    # the same requests (its prompt and output lengths, all sent at once, 8 at a time) through our replay
    trace = tmp_path / "same.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": 0.0, "prompt_tokens": p, "output_tokens": o}) + "\n"
                             for p, o in zip(got["input_lens"], got["output_lens"], strict=True)))
    out = tmp_path / "ours"
    ours_backend = "sglang" if backend == "sglang" else "openai"
    from echo_exec.replay import SHIPPED_PROMPTS  # the text bench_serving's prompts were cut from: alike acceptance

    assert main(["replay", "--trace", str(trace), "--base-url", server.url, "--backend", ours_backend,
                 "--tokenizer", str(TARGET), "--prompts", str(SHIPPED_PROMPTS), "--max-concurrency", "8",
                 "--out", str(out), "--quiet"]) == 0
    ours = json.loads((out / "summary.json").read_text())["bench_serving"]
    assert ours["completed"] == NUM_PROMPTS
    assert ours["total_output_tokens"] == got["total_output_tokens"]
    assert ours["total_input_tokens"] == got["total_input_tokens"]
    print(f"{backend}: bench_serving output {got['output_throughput']:.1f} tok/s, median TTFT "
          f"{got['median_ttft_ms']:.1f} ms, median E2E {got['median_e2e_latency_ms']:.1f} ms, accept length "
          f"{got.get('accept_length')}; ours {ours['output_throughput']:.1f} tok/s, {ours['median_ttft_ms']:.1f} ms, "
          f"{ours['median_e2e_latency_ms']:.1f} ms, {ours['accept_length']}")
    # within noise: a shared 2-core machine, 16 requests; the same definitions on both sides
    assert ours["output_throughput"] == pytest.approx(got["output_throughput"], rel=0.5)
    assert ours["median_e2e_latency_ms"] == pytest.approx(got["median_e2e_latency_ms"], rel=0.5)
