"""The replay client (echo_exec/replay.py, `echosim replay`) against an in-process server with a fake engine."""

import csv
import json
import math
from pathlib import Path

import pytest
from test_server_support import FakeEngine, fake_server

from echo_exec.replay import (
    EXTRA_COLUMNS,
    SHIPPED_PROMPTS,
    SPEC_BENCH_PROMPTS,
    PromptSynth,
    default_prompt_set,
    load_prompts,
    plan_from_trace,
    replay,
    summarize,
)
from echosim.cli import main
from echosim.metrics import REQUEST_COLUMNS


def write_trace(path: Path, rows: list[tuple[float, int, int]], **extra) -> Path:
    with open(path, "w") as f:
        for i, (t, p, o) in enumerate(rows):
            f.write(json.dumps({"arrival_s": t, "prompt_tokens": p, "output_tokens": o,
                                **{k: v[i] for k, v in extra.items()}}) + "\n")
    return path


@pytest.fixture(scope="module")
def srv():
    engine, thread = fake_server(FakeEngine(tokens_per_step=2, step_s=0.002), max_context=512)
    yield engine, thread
    thread.stop()


def test_prompt_synth_exact_byte_lengths():
    synth = PromptSynth(["héllo wörld — ünïcode", "日本語のテキスト", "plain ascii"])
    for i, n in enumerate([1, 2, 3, 7, 20, 21, 64, 500, 1337]):
        text = synth.make(n, i)
        assert len(text.encode("utf-8")) == n
    assert synth.make(30, 0) != synth.make(30, 1)  # requests start at different prompts


def test_shipped_prompt_set_loads():
    prompts = load_prompts(SHIPPED_PROMPTS)
    assert len(prompts) >= 20 and all(p.strip() for p in prompts)


def test_spec_bench_prompt_set_loads():
    assert default_prompt_set() == SPEC_BENCH_PROMPTS  # shipped, so a fresh clone replays the same prompts
    prompts = load_prompts(SPEC_BENCH_PROMPTS)
    assert len(prompts) == 480  # turns[0] of each Spec-Bench question


def test_bad_prompt_set(tmp_path):
    from echosim.errors import UserError

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"foo": 1}\n')
    with pytest.raises(UserError, match=r"p.jsonl:2: no prompt text"):
        load_prompts(bad)
    with pytest.raises(UserError, match="cannot read"):
        load_prompts(tmp_path / "missing.jsonl")


def test_plan_scales_limits_clips_and_keeps_trace_text(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", [(10.0, 5, 3), (11.0, 900, 40), (12.5, 4, 2)],
                        prompt=["", "", "given"])
    items = plan_from_trace(trace, time_scale=0.5, max_prompt_tokens=100, max_output_tokens=30)
    assert [it.scheduled_s for it in items] == [0.0, 0.5, 1.25]
    assert [it.target_prompt_tokens for it in items] == [5, 100, 4]
    assert [it.target_output_tokens for it in items] == [3, 30, 2]
    assert [len(it.prompt.encode()) for it in items[:2]] == [5, 100]
    assert items[2].prompt == "given"  # the trace's own text wins
    assert len(plan_from_trace(trace, limit=2)) == 2


def test_replay_against_server_writes_csv_and_summary(srv, tmp_path):
    _, thread = srv
    rows = [(0.05 * i, 8 + 3 * i, 4 + i % 5) for i in range(12)]
    trace = write_trace(tmp_path / "t.jsonl", rows)
    out = tmp_path / "run"
    assert main(["replay", "--trace", str(trace), "--url", thread.url, "--out", str(out), "--quiet"]) == 0
    with open(out / "requests.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == [*REQUEST_COLUMNS, *EXTRA_COLUMNS]  # the simulator's columns first
    assert len(got) == 12
    for row, (t, p, o) in zip(got, rows, strict=True):
        assert row["ok"] == "True", row
        assert int(row["prompt_tokens"]) == p and int(row["output_tokens"]) == o  # bytes = tokens
        arrival, first, finish = float(row["arrival_s"]), float(row["first_token_s"]), float(row["finish_s"])
        assert arrival == pytest.approx(t, abs=0.05)  # sent on time
        assert arrival <= first <= finish
        assert float(row["ttft_ms"]) == pytest.approx((first - arrival) * 1e3, abs=0.01)
        assert float(row["e2e_ms"]) == pytest.approx((finish - arrival) * 1e3, abs=0.01)
        steps = math.ceil(o / 2)  # the fake engine emits 2 tokens per step
        assert int(row["steps"]) == steps and int(row["accepted"]) == o - steps
        assert float(row["mat"]) == pytest.approx(o / steps, abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == summary["completed"] == 12 and summary["failed"] == 0
    assert summary["output_tokens"] == sum(o for _, _, o in rows)
    assert summary["mat"] == pytest.approx(sum(o for *_, o in rows) / sum(math.ceil(o / 2) for *_, o in rows),
                                           abs=1e-4)
    assert summary["throughput_tok_s"] > 0 and summary["mean_batch"] is None  # a client cannot see batches
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        s = summary[key]
        assert 0 < s["p50"] <= s["p90"] <= s["p99"] and s["mean"] > 0
    assert json.loads((out / "config.json").read_text())["url"] == thread.url


def test_concurrency_bound_is_respected(srv, tmp_path):
    import asyncio

    _, thread = srv
    trace = write_trace(tmp_path / "t.jsonl", [(0.0, 5, 6)] * 6)
    records = asyncio.run(replay(thread.url, plan_from_trace(trace), concurrency=2))
    assert all(r.ok for r in records)
    events = sorted([(r.arrival_s, 1) for r in records] + [(r.finish_s, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    in_flight = peak = 0
    for _, d in events:
        in_flight += d
        peak = max(peak, in_flight)
    assert peak <= 2


def test_failed_requests_are_recorded_not_fatal(srv, tmp_path):
    import asyncio

    _, thread = srv
    trace = write_trace(tmp_path / "t.jsonl", [(0.0, 5, 3), (0.0, 600, 3), (0.01, 6, 3)])  # 600 > context 512
    records = asyncio.run(replay(thread.url, plan_from_trace(trace)))
    assert [r.ok for r in records] == [True, False, True]
    assert "HTTP 400" in records[1].error and "context" in records[1].error
    summary = summarize(records)
    assert summary["completed"] == 2 and summary["failed"] == 1


def test_server_down(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trace = write_trace(tmp_path / "t.jsonl", [(0.0, 5, 3)])
    out = tmp_path / "run"
    assert main(["replay", "--trace", str(trace), "--url", f"http://127.0.0.1:{port}", "--out", str(out),
                 "--quiet"]) == 1
    assert "ClientConnectorError" in capsys.readouterr().err
    assert (out / "summary.json").exists()


def test_replay_cli_user_errors(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.jsonl", [(0.0, 5, 3)])
    assert main(["replay", "--trace", str(trace), "--url", "localhost:1"]) == 2
    assert main(["replay", "--trace", str(trace), "--url", "http://x", "--time-scale", "0"]) == 2
    assert main(["replay", "--trace", str(tmp_path / "none.jsonl"), "--url", "http://x"]) == 2
    err = capsys.readouterr().err
    assert err.count("echosim: error:") == 3 and "Traceback" not in err


def test_replay_without_streaming_has_e2e_but_no_ttft(srv, tmp_path):
    _, thread = srv
    trace = write_trace(tmp_path / "t.jsonl", [(0.0, 5, 4), (0.02, 7, 3)])
    out = tmp_path / "run"
    assert main(["replay", "--trace", str(trace), "--url", thread.url, "--out", str(out), "--no-stream",
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 2 and summary["output_tokens"] == 7
    assert summary["ttft_ms"]["p50"] is None and summary["e2e_ms"]["p50"] > 0
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["ttft_ms"] for r in rows] == ["", ""] and all(float(r["e2e_ms"]) > 0 for r in rows)


def test_accepted_drafts_without_a_count_assume_the_first_token_from_prefill(tmp_path):
    """A server that reports only completion_tokens and spec_verify_ct (as SGLang can): the prefill gave the first
    token, so accepted drafts = completion - 1 - verify steps."""
    import asyncio
    import threading

    from aiohttp import web

    async def generate(request):
        await request.json()
        return web.json_response({"text": "x" * 9, "meta_info": {"prompt_tokens": 4, "completion_tokens": 9,
                                                                  "spec_verify_ct": 3}})

    ready, port = threading.Event(), []
    loop = asyncio.new_event_loop()

    async def serve():
        app = web.Application()
        app.add_routes([web.post("/generate", generate)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port.append(site._server.sockets[0].getsockname()[1])
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        items = plan_from_trace(write_trace(tmp_path / "t.jsonl", [(0.0, 4, 9)]))
        recs = asyncio.run(replay(f"http://127.0.0.1:{port[0]}", items, stream=False))
    finally:
        loop.call_soon_threadsafe(loop.stop)
    assert recs[0].ok and recs[0].output_tokens == 9 and recs[0].steps == 3
    assert recs[0].accepted == 9 - 1 - 3
    assert summarize(recs)["mat"] == pytest.approx((5 + 3) / 3, abs=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Real deployments: a subword tokenizer, the OpenAI backends, redrawn arrivals, ITL and bench_serving's keys.


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small byte-level BPE trained here on the shipped prompt set, and a fake server that counts in it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from echo_exec.server import EchoServer, Limits, ServerThread

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(load_prompts(SHIPPED_PROMPTS), trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    from test_server_support import FakeParams

    server = EchoServer(FakeEngine(tokens_per_step=3, step_s=0.002), make_params=FakeParams,
                        limits=Limits(tok.get_vocab_size(), 4096), info={"model": "bpe-fake"},
                        encode=lambda s: tok.encode(s, add_special_tokens=False).ids)
    thread = ServerThread(server)
    yield d, tok, thread
    thread.stop()


@pytest.mark.parametrize("backend,mode", [("sglang", "text"), ("sglang", "ids"), ("openai", "text"),
                                          ("openai", "ids")])
def test_subword_tokenizer_hits_the_traces_prompt_tokens(bpe, tmp_path, backend, mode):
    d, tok, thread = bpe
    lengths = [1, 2, 7, 33, 100, 257, 640]
    trace = write_trace(tmp_path / "t.jsonl", [(0.01 * i, p, 3) for i, p in enumerate(lengths)])
    out = tmp_path / "out"
    assert main(["replay", "--trace", str(trace), "--base-url", thread.url, "--backend", backend, "--tokenizer",
                 str(d), "--prompt-mode", mode, "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "requests.csv")))
    assert [int(r["prompt_tokens"]) for r in rows] == lengths  # the server's own count
    assert [int(r["target_prompt_tokens"]) for r in rows] == lengths
    # in bytes the same prompts are several times longer: the tokenizer does matter
    from echo_exec.replay import HFTokenizer

    items = plan_from_trace(trace, tokenizer=HFTokenizer(d), prompt_set=SHIPPED_PROMPTS)  # the BPE's own text
    assert sum(len(it.prompt.encode()) for it in items) > 2 * sum(lengths)


def test_openai_chat_backend_itl_timeline_and_bench_keys(tmp_path):
    engine, thread = fake_server(FakeEngine(tokens_per_step=2, step_s=0.005), max_context=512)
    try:
        trace = write_trace(tmp_path / "t.jsonl", [(0.0, 20, 9), (0.01, 30, 9), (0.02, 10, 9)])
        out = tmp_path / "out"
        assert main(["replay", "--trace", str(trace), "--base-url", thread.url, "--backend", "openai-chat",
                     "--slo-ttft-ms", "5000", "--slo-tpot-ms", "1000", "--warmup-requests", "2", "--out", str(out),
                     "--quiet"]) == 0
    finally:
        thread.stop()
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert (config["slo_ttft_ms"], config["slo_tpot_ms"], config["backend"]) == (5000, 1000, "openai-chat")
    assert summary["completed"] == 3 and summary["output_tokens"] == 27 and summary["slo_attainment"] == 1.0
    chunks = list(csv.DictReader(open(out / "chunks.csv")))
    assert len(chunks) == 3 * 5  # 9 tokens at 2 per engine step: 5 chunks each
    assert summary["itl_ms"]["p50"] > 0
    bench = summary["bench_serving"]
    assert bench["completed"] == 3 and bench["total_output_tokens"] == 27
    assert bench["request_goodput"] == pytest.approx(3 / summary["makespan_s"], rel=1e-3)
    assert bench["median_ttft_ms"] == pytest.approx(summary["ttft_ms"]["p50"], rel=1e-6)
    for key in ("mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2e_latency_ms", "output_throughput"):
        assert key in bench
    rows = list(csv.DictReader(open(out / "requests.csv")))
    # the chat template wraps the prompt: the server counts more than the trace's prompt
    assert all(int(r["prompt_tokens"]) > int(r["target_prompt_tokens"]) for r in rows)


def test_request_rate_redraws_arrivals_like_bench_serving(tmp_path):
    from echo_exec.replay import redraw_arrivals

    trace = write_trace(tmp_path / "t.jsonl", [(100.0 * i, 5, 2) for i in range(400)])
    items = plan_from_trace(trace, request_rate=20.0, burstiness=1.0, seed=3)
    gaps = [b.scheduled_s - a.scheduled_s for a, b in zip(items, items[1:], strict=False)]
    assert items[0].scheduled_s == 0 and sum(gaps) / len(gaps) == pytest.approx(1 / 20, rel=0.15)
    bursty = redraw_arrivals(4000, 20.0, 0.25, seed=1)
    poisson = redraw_arrivals(4000, 20.0, 1.0, seed=1)
    cv = lambda a: float(__import__("numpy").diff(a).std() / __import__("numpy").diff(a).mean())  # noqa: E731
    assert cv(poisson) == pytest.approx(1.0, abs=0.1) and cv(bursty) == pytest.approx(2.0, abs=0.25)
    assert (redraw_arrivals(5, float("inf")) == 0).all()
