"""`echosim serve` with the real engine and tiny random models, in a subprocess on a free port: /generate (plain
and stream), /v1/completions, /server_info, bad requests, a trace replay, and a soak test (32 concurrent clients,
nothing lost, memory stable)."""

import asyncio
import csv
import json
import random
import time

import pytest
from test_server_support import ROOT, ServerProcess, get, make_tiny_models, post, sse_payloads

from echosim.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from echo_exec.tokenizer import write_hf_tokenizer

    target, draft = make_tiny_models(tmp_path_factory.mktemp("models"))
    write_hf_tokenizer(target)  # its chat template, for /v1/chat/completions
    return target, draft


@pytest.fixture(scope="module")
def server(models):
    target, draft = models
    # echo's static defaults (no adaptive budget): the draft here is a copy of the target, as costly as it, so the
    # adaptive budget would rightly decode plainly; these tests need speculation to run (tests/test_serve_adaptive.py
    # covers the default, adaptive, settings)
    proc = ServerProcess(["--model", str(target), "--draft", str(draft), "--policy", "echo", "--max-running", "32",
                          "--threads", "1", "--policy-config", '{"policy": "echo"}'])
    yield proc
    proc.stop()


def gen(url, prompt, n, **sp):
    status, raw = post(url + "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0,
                                                                                "ignore_eos": True, **sp}})
    assert status == 200, raw
    return json.loads(raw)


def test_generate_matches_the_engine_offline(server, models):
    """The server's greedy output is the engine's own greedy output for the same prompt (plain decoding)."""
    import torch

    from echo_exec.engine import Engine, SamplingParams

    prompts = ["def f(x):\n    return", "hello world", "z"]
    outs = [gen(server.url, p, 12) for p in prompts]
    target, _ = models
    torch.set_num_threads(1)
    engine = Engine(str(target), None, policy="ar")
    ref = engine.generate([list(p.encode()) for p in prompts], SamplingParams(max_new_tokens=12, temperature=0.0))
    for out, r in zip(outs, ref, strict=True):
        assert out["output_ids"] == r.output_ids
        meta = out["meta_info"]
        assert meta["completion_tokens"] == 12 and meta["finish_reason"] == {"type": "length", "length": 12}
        assert meta["spec_verify_ct"] >= 1
        # The draft is a copy of the target, so speculation accepts: more than one token per verify step.
        assert meta["spec_accept_length"] == pytest.approx(12 / meta["spec_verify_ct"])
        assert meta["spec_accept_length"] > 1.5


def test_generate_stream_equals_plain(server):
    plain = gen(server.url, "import os\n", 20)
    status, raw = post(server.url + "/generate", {"text": "import os\n", "stream": True, "sampling_params": {
        "max_new_tokens": 20, "temperature": 0, "ignore_eos": True}})
    assert status == 200
    events = sse_payloads(raw)
    assert events[-1] == "[DONE]" and len(events) >= 3
    last = events[-2]
    assert last["output_ids"] == plain["output_ids"] and last["text"] == plain["text"]
    assert last["meta_info"]["finish_reason"]["type"] == "length"


def test_sampling_and_completions(server):
    out = gen(server.url, "abc", 15, temperature=0.8, top_p=0.9, sampling_seed=3)
    assert out["meta_info"]["completion_tokens"] == 15
    plain = gen(server.url, "for i in", 10)
    status, raw = post(server.url + "/v1/completions", {"prompt": "for i in", "max_tokens": 10, "temperature": 0,
                                                        "ignore_eos": True})
    assert status == 200, raw
    body = json.loads(raw)
    assert body["choices"][0]["text"] == plain["text"]
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 10, "total_tokens": 18}


def test_server_info(server):
    gen(server.url, "warm", 8)
    status, raw = get(server.url + "/server_info")
    assert status == 200
    info = json.loads(raw)
    assert info["policy"] == "echo" and info["model_path"].endswith("target")
    assert info["avg_spec_accept_length"] > 1.0
    assert info["internal_states"][0]["avg_spec_accept_length"] == info["avg_spec_accept_length"]
    assert get(server.url + "/health")[0] == 200


def test_bad_requests_do_not_take_the_server_down(server):
    bad = [(b"{oops", None), (None, {"text": "a", "sampling_params": {"max_new_tokens": -3}}),
           (None, {"text": "a", "sampling_params": {"temperature": -1}}),
           (None, {"text": "x" * 2000, "sampling_params": {"max_new_tokens": 4}}),  # context 1024
           (None, {"input_ids": [5, 100000]}), (None, {"text": "a", "sampling_params": {"bogus": 1}})]
    for raw, body in bad:
        status, out = post(server.url + "/generate", body, raw=raw)
        assert 400 <= status < 500 and json.loads(out)["error"]["message"], (status, out)
    assert server.alive()
    assert gen(server.url, "still here", 3)["meta_info"]["completion_tokens"] == 3


def test_replay_a_small_trace(server, tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [(0.1 * i, 10 + 7 * i, 5 + 2 * (i % 4)) for i in range(10)]
    trace.write_text("".join(json.dumps({"arrival_s": t, "prompt_tokens": p, "output_tokens": o}) + "\n"
                             for t, p, o in rows))
    out = tmp_path / "run"
    assert main(["replay", "--trace", str(trace), "--url", server.url, "--out", str(out), "--concurrency", "8",
                 "--quiet"]) == 0
    with open(out / "requests.csv") as f:
        got = list(csv.DictReader(f))
    assert [(int(r["prompt_tokens"]), int(r["output_tokens"])) for r in got] == [(p, o) for _, p, o in rows]
    assert all(r["ok"] == "True" and float(r["ttft_ms"]) > 0 for r in got)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 10 and summary["mat"] > 1.0


async def _soak(url: str, n_requests: int, clients: int, seed: int) -> dict[str, int]:
    """`clients` concurrent clients share `n_requests`: most are good (plain or streamed; each must return exactly
    its tokens), some are invalid (must get a 400), some are abandoned mid-stream (the server must abort them)."""
    import aiohttp

    rng = random.Random(seed)
    jobs = []
    for _ in range(n_requests):
        kind = rng.choices(["plain", "stream", "bad", "abandon"], [0.55, 0.3, 0.1, 0.05])[0]
        jobs.append((kind, rng.randint(4, 60), rng.randint(2, 24)))
    queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    counts = {"plain": 0, "stream": 0, "bad": 0, "abandon": 0, "lost": 0}

    async def client(session):
        while not queue.empty():
            kind, p_len, n = queue.get_nowait()
            sp = {"max_new_tokens": -n if kind == "bad" else n, "temperature": 0, "ignore_eos": True}
            body = {"text": "q" * p_len, "stream": kind in ("stream", "abandon"), "sampling_params": sp}
            async with session.post(url + "/generate", json=body) as resp:
                if kind == "abandon":
                    await resp.content.readuntil(b"\n\n")  # the first chunk, then hang up
                    resp.close()
                    counts[kind] += 1
                    continue
                raw = await resp.read()
            if kind == "bad":
                counts[kind] += resp.status == 400
                continue
            obj = sse_payloads(raw)[-2] if kind == "stream" else json.loads(raw)
            ok = resp.status == 200 and obj["meta_info"]["completion_tokens"] == n == len(obj["output_ids"])
            counts[kind if ok else "lost"] += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    want = {k: sum(1 for j in jobs if j[0] == k) for k in counts}
    assert counts == want, (counts, want)
    return counts


def test_soak_32_clients_none_lost_memory_stable(server):
    asyncio.run(_soak(server.url, 64, 32, seed=0))  # warm-up: allocator pools, KV blocks, code paths
    rss0 = server.rss_mb()
    first = asyncio.run(_soak(server.url, 200, 32, seed=1))
    rss1 = server.rss_mb()
    second = asyncio.run(_soak(server.url, 200, 32, seed=2))
    rss2 = server.rss_mb()
    assert first["lost"] == second["lost"] == 0 and first["abandon"] + second["abandon"] > 0
    deadline = time.monotonic() + 10  # abandoned requests are aborted at the engine's next step
    while True:
        state = json.loads(get(server.url + "/server_info")[1])["internal_states"][0]
        if state["engine"]["running"] == state["engine"]["waiting"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert state["inflight_requests"] == 0 and state["engine_errors"] == 0
    assert state["engine"]["running"] == state["engine"]["waiting"] == 0
    assert state["engine"]["free_kv_blocks"] == state["engine"]["num_kv_blocks"]  # every block came back
    # Memory: the second half must not grow the server (allowing allocator noise).
    print(f"server RSS MB: after warm-up {rss0:.1f}, after 200 more {rss1:.1f}, after 200 more {rss2:.1f}")
    assert rss2 - rss1 < max(16.0, 0.05 * rss1), (rss0, rss1, rss2)


def test_client_disconnect_aborts_in_the_engine(server):
    import socket

    def engine_stats():
        return json.loads(get(server.url + "/server_info")[1])["internal_states"][0]["engine"]

    before = engine_stats()["generated_tokens"]
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"text": "abcd", "stream": True, "sampling_params": {"max_new_tokens": 1000,
                                                                            "ignore_eos": True}}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data: " not in got:  # the headers, then the first tokens; now hang up
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = engine_stats()
        if stats["running"] == stats["waiting"] == 0:
            break
        time.sleep(0.02)
    assert stats["running"] == stats["waiting"] == 0
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]
    assert stats["generated_tokens"] - before < 500  # stopped long before its 1000 tokens


def test_ignore_eos(models, tmp_path):
    """Without ignore_eos generation stops at the model's EOS (as SGLang); with it, it runs to max_new_tokens."""
    import shutil

    from echo_exec.engine import Engine, SamplingParams
    from echo_exec.server import ServerThread
    from echosim.cli import build_parser
    from echosim.commands.serve import build_server

    target, _ = models
    prompt = "the quick brown fox"
    ref = Engine(str(target), None, policy="ar").generate([list(prompt.encode())], SamplingParams(max_new_tokens=12))
    full = ref[0].output_ids
    eos = full[5]
    model = tmp_path / "eos-model"
    shutil.copytree(target, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["eos_token_id"] = eos  # a token this prompt's greedy output is known to produce
    (model / "config.json").write_text(json.dumps(cfg))
    args = build_parser().parse_args(["serve", "--model", str(model), "--policy", "ar"])
    thread = ServerThread(build_server(args))
    try:
        stopped = gen(thread.url, prompt, 12, ignore_eos=False)
        assert stopped["output_ids"] == full[:full.index(eos) + 1]
        assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
        assert gen(thread.url, prompt, 12)["output_ids"] == full  # gen() sends ignore_eos: true
        for _ in range(2):  # the engine's own EOS set is back after each ignore_eos request
            assert gen(thread.url, prompt, 12, ignore_eos=False)["output_ids"] == stopped["output_ids"]
    finally:
        thread.stop()


def test_a_draft_directory_ships_its_tuned_policy_settings(models, tmp_path):
    """`serve` takes policy-<name>.json from the draft directory when no --policy-config is given; an explicit
    config wins, and a policy without such a file runs its defaults."""
    import shutil

    from echosim.cli import build_parser
    from echosim.commands.serve import build_server

    target, draft = models
    tuned_draft = tmp_path / "draft"
    shutil.copytree(draft, tuned_draft)
    tuned = {"steps": 3, "topk": 2, "num_draft_tokens": 6, "remaining_num_draft_tokens": 2, "gates": [[2, 0.1]]}
    (tuned_draft / "policy-echo.json").write_text(json.dumps({"policy": "echo", **tuned, "calibration": "test"}))

    def info(*extra):
        args = build_parser().parse_args(["serve", "--model", str(target), "--draft", str(tuned_draft), *extra])
        server = build_server(args)
        server.engine.close()
        return server.info

    got = info()
    assert (got["policy"], got["policy_config"]) == ("echo", tuned)
    assert got["policy_config_source"] == str(tuned_draft / "policy-echo.json")
    mine = {"steps": 4, "topk": 2, "num_draft_tokens": 8, "remaining_num_draft_tokens": 2}
    explicit = info("--policy-config", json.dumps(mine))
    assert explicit["policy_config"] == mine
    assert explicit["policy_config_source"] == "--policy-config"
    plain = info("--policy", "eagle3")
    assert (plain["policy_config"], plain["policy_config_source"]) == (None, "defaults")


def test_the_shipped_pair_ships_a_valid_echo_config():
    from echosim.commands.serve import _policy_config, policy_settings
    from echosim.spec.policies import make_policy

    draft = ROOT / "echo_exec" / "models" / "tiny-draft"
    shipped = draft / "policy-echo.json"
    policy, config = _policy_config(str(shipped), None)
    built = make_policy(policy, config)
    assert policy == "echo" and built.inner.config.num_draft_tokens == config["num_draft_tokens"]
    assert "adaptive" in built.describe()  # echo serves with the online-adaptive budget
    # serve and validate resolve the same settings: the shipped files, for echo and for eagle3 (a tuned tree)
    assert policy_settings(None, None, str(draft)) == ("echo", config, str(shipped))
    name, e3, where = policy_settings(None, "eagle3", str(draft))
    assert (name, where) == ("eagle3", str(draft / "policy-eagle3.json"))
    assert make_policy("eagle3", e3).config.num_draft_tokens == e3["num_draft_tokens"]
    # without a shipped file, echo still gets the adaptive budget; other policies their own defaults
    assert policy_settings(None, None, None) == ("echo", {"adaptive": {}}, "defaults (adaptive budget)")
    assert policy_settings(None, "eagle3", None) == ("eagle3", None, "defaults")


def test_openai_python_client(server):
    """The OpenAI Python client, completions and chat, plain and streamed, against `echosim serve`."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0]
    assert model.id.endswith("target") and model.max_model_len == 1024 and model.root.endswith("target")
    want = gen(server.url, "def add(a, b):", 10)["text"]
    out = client.completions.create(model=model.id, prompt="def add(a, b):", max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == want and out.usage.completion_tokens == 10
    assert out.choices[0].finish_reason == "length"
    stream = client.completions.create(model=model.id, prompt="def add(a, b):", max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 10

    messages = [{"role": "user", "content": "write a loop"}]
    rendered = "user: write a loop\n\nassistant: "  # the shipped chat template
    chat = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == gen(server.url, rendered, 8)["text"]
    assert chat.usage.prompt_tokens == len(rendered)
    parts = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=model.id, prompt="x", max_tokens=2, best_of=3)


def test_tiny_temperature_is_greedy_not_nul_bytes(server):
    greedy = gen(server.url, "import sys\n", 12)
    tiny = gen(server.url, "import sys\n", 12, temperature=1e-310)
    assert tiny["output_ids"] == greedy["output_ids"] and 0 not in tiny["output_ids"]


def test_startup_progress_and_access_log(server):
    gen(server.url, "log me", 2)
    text = "".join(server.lines)
    assert "echosim serve: loading" in text and "warmed up in" in text
    assert text.index("warmed up in") < text.index("listening on")
    assert '"POST /generate HTTP/1.1" 200' in text


def test_port_in_use_is_reported_before_loading(models, capsys):
    import socket

    target, _ = models
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        assert main(["serve", "--model", str(target), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "loading" not in err and "Traceback" not in err
    assert time.monotonic() - t0 < 5


def test_prometheus_metrics_from_the_real_engine(server):
    from prometheus_client.parser import text_string_to_metric_families

    gen(server.url, "def metrics():", 16)
    status, raw = get(server.url + "/metrics")
    assert status == 200
    got = {s.name: s.value for f in text_string_to_metric_families(raw.decode()) for s in f.samples}
    assert got["vllm:spec_decode_num_drafts_total"] > 0
    assert got["vllm:spec_decode_num_accepted_tokens_total"] > 0
    assert got["vllm:spec_decode_num_draft_tokens_total"] >= got["vllm:spec_decode_num_accepted_tokens_total"]
    info = json.loads(get(server.url + "/server_info")[1])
    assert got["sglang:spec_accept_length"] == pytest.approx(info["avg_spec_accept_length"])
    assert 0 <= got["vllm:kv_cache_usage_perc"] <= 1 and got["vllm:generation_tokens_total"] >= 16


def test_replay_openai_backend_takes_mat_from_the_servers_metrics(server, tmp_path):
    """Over OpenAI's API no request reports its verify steps; the replay reads MAT from vLLM's spec_decode
    counters on /metrics, before and after its timed run, and it agrees with the per-request MAT of /generate."""
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": 0.05 * i, "prompt_tokens": 30 + 5 * i, "output_tokens": 24})
                             + "\n" for i in range(6)))
    mats = {}
    for backend in ("sglang", "openai"):
        out = tmp_path / backend
        assert main(["replay", "--trace", str(trace), "--base-url", server.url, "--backend", backend, "--out",
                     str(out), "--quiet"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        mats[backend] = (summary["mat"], summary["mat_source"])
    assert mats["sglang"][1] == "per-request" and mats["openai"][1].startswith("server /metrics")
    assert mats["openai"][0] == pytest.approx(mats["sglang"][0], abs=0.35), mats  # same prompts, greedy
