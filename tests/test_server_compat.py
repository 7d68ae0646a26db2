"""Compatibility of echo_exec/server.py with the clients serving engineers run (fake engine: fast and exact):
the request bodies SGLang's bench_serving and vLLM's benchmark clients send, chat completions with the model's
template, /v1/models, SGLang's info and health routes, Prometheus /metrics, shutdown, and a fuzzed corpus of
requests that must get a 4xx, never a 5xx."""

import json
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_support import FakeEngine, fake_server, fake_tokens, get, post, sse_payloads


@pytest.fixture(scope="module")
def srv():
    engine, thread = fake_server()
    yield engine, thread.url
    thread.stop()


# Request bodies as the stock benchmark clients build them (field for field, at their default settings).
SGLANG_BENCH_GENERATE = {  # sglang.benchmark.serving async_request_sglang_generate, --backend sglang
    "text": "hello", "sampling_params": {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True},
    "stream": True, "lora_path": None, "return_logprob": False, "return_routed_experts": False,
    "logprob_start_len": -1}
SGLANG_BENCH_OAI = {  # async_request_openai_completions, --backend sglang-oai / vllm
    "model": "m", "prompt": "hello", "best_of": 1, "max_tokens": 6, "stream": True, "temperature": 0.0,
    "ignore_eos": True}
VLLM_BENCH_COMPLETIONS = {  # vllm/benchmarks/lib/endpoint_request_func.py async_request_openai_completions
    "model": "m", "prompt": "hello", "repetition_penalty": 1.0, "temperature": 0.0, "max_tokens": 6,
    "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
VLLM_BENCH_CHAT = {  # async_request_openai_chat_completions
    "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
    "temperature": 0.0, "max_completion_tokens": 6, "stream": True, "stream_options": {"include_usage": True},
    "ignore_eos": True}
NEUTRAL_EXTRAS = {  # every other field of vLLM's CompletionRequest at its neutral value
    "echo": False, "frequency_penalty": 0.0, "presence_penalty": 0.0, "logit_bias": None, "n": 1, "suffix": None,
    "user": "u", "use_beam_search": False, "top_k": -1, "min_p": 0.0, "length_penalty": 1.0, "min_tokens": 0,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "truncate_prompt_tokens": None,
    "allowed_token_ids": None, "prompt_logprobs": None, "add_special_tokens": True, "response_format": None,
    "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None, "priority": 0,
    "logits_processors": None, "return_tokens_as_token_ids": None, "cache_salt": None, "kv_transfer_params": None,
    "vllm_xargs": None, "include_stop_str_in_output": False, "seed": 0, "stop": [], "top_p": 1.0}


@pytest.mark.parametrize("path,body", [("/generate", SGLANG_BENCH_GENERATE), ("/v1/completions", SGLANG_BENCH_OAI),
                                       ("/v1/completions", VLLM_BENCH_COMPLETIONS),
                                       ("/v1/completions", {**VLLM_BENCH_COMPLETIONS, **NEUTRAL_EXTRAS}),
                                       ("/v1/chat/completions", VLLM_BENCH_CHAT)],
                         ids=["sglang", "sglang-oai", "vllm", "vllm-all-fields", "vllm-chat"])
def test_stock_benchmark_request_bodies_complete(srv, path, body):
    _, url = srv
    status, raw = post(url + path, body)
    assert status == 200, raw
    events = sse_payloads(raw)
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
    if path == "/generate":
        text = events[-2]["text"]
    else:  # deltas (one byte a token here); a usage-only chunk has no choices
        text = "".join(c.get("text") or c.get("delta", {}).get("content", "")
                       for e in events[:-1] for c in e["choices"])
    assert len(text) == 6


def test_chat_uses_the_template_and_streams(srv):
    from echo_exec.tokenizer import CHAT_TEMPLATE  # noqa: F401  (the fake server renders the shipped template)

    _, url = srv
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = "system: be brief\n\nuser: hi\n\nassistant: "
    status, raw = post(url + "/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0})
    assert status == 200, raw
    out = json.loads(raw)
    want = bytes(fake_tokens(list(rendered.encode()), 5)).decode()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"] == {"role": "assistant",
                                                                                    "content": want}
    assert out["usage"]["prompt_tokens"] == len(rendered) and out["choices"][0]["finish_reason"] == "length"
    status, raw = post(url + "/v1/chat/completions", {"messages": messages, "max_tokens": 5, "stream": True,
                                                      "stream_options": {"include_usage": True}})
    events = sse_payloads(raw)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"] == {"prompt_tokens": len(rendered), "completion_tokens": 5,
                                   "total_tokens": len(rendered) + 5}


def test_models_and_sglang_info_routes(srv):
    _, url = srv
    card = json.loads(get(url + "/v1/models")[1])["data"][0]
    assert card["id"] == "fake" and card["object"] == "model" and card["owned_by"] == "echo"
    assert card["root"] == "fake" and card["max_model_len"] == 256 and isinstance(card["created"], int)
    info = json.loads(get(url + "/get_model_info")[1])
    assert info["is_generation"] is True and info["model_path"] == "fake"
    assert get(url + "/health_generate")[0] == 200
    assert get(url + "/flush_cache")[0] == 200 and post(url + "/flush_cache", {})[0] == 200


def test_prometheus_metrics_use_vllm_and_sglang_names(srv):
    from prometheus_client.parser import text_string_to_metric_families

    _, url = srv
    before = _samples(get(url + "/metrics")[1])
    post(url + "/generate", {"text": "metrics", "stream": True, "sampling_params": {"max_new_tokens": 7}})
    status, raw = get(url + "/metrics")
    assert status == 200
    after = _samples(raw)
    key = ("vllm:generation_tokens_total", (("model_name", "fake"),))
    assert after[key] - before.get(key, 0) == 7
    assert after[("sglang:generation_tokens_total", (("model_name", "fake"),))] == after[key]
    for name in ("vllm:time_to_first_token_seconds_count", "sglang:time_to_first_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "sglang:num_queue_reqs"):
        assert any(k[0] == name for k in after), name
    # 7 tokens at 2 per step: 4 deliveries, 3 gaps
    itl = ("vllm:inter_token_latency_seconds_count", (("model_name", "fake"),))
    assert after[itl] - before.get(itl, 0) == 3
    assert list(text_string_to_metric_families(raw.decode()))


def _samples(raw: bytes) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(raw.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_engine_spec_counters_in_metrics():
    """The engine's own counters become vLLM's spec_decode_* and SGLang's spec_accept_* metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    from echo_exec.metrics_prom import ServerMetrics

    m = ServerMetrics("x")
    stats = {"running": 3, "waiting": 2, "free_kv_blocks": 25, "num_kv_blocks": 100, "request_verifies": 10,
             "verify_tokens": 50, "accepted_drafts": 20}
    got = {s.name: s.value for f in text_string_to_metric_families(m.render(stats, inflight=5).decode())
           for s in f.samples}
    assert got["vllm:num_requests_running"] == 3 and got["sglang:num_queue_reqs"] == 2
    assert got["vllm:kv_cache_usage_perc"] == 0.75 and got["sglang:token_usage"] == 0.75
    assert got["vllm:spec_decode_num_drafts_total"] == 10
    assert got["vllm:spec_decode_num_draft_tokens_total"] == 40   # 50 verified tree tokens less 10 roots
    assert got["vllm:spec_decode_num_accepted_tokens_total"] == 20
    assert got["sglang:spec_accept_length"] == 3.0 and got["sglang:spec_accept_rate"] == 0.5


def test_null_lengths_mean_the_default(srv):
    _, url = srv
    status, raw = post(url + "/generate", {"text": "ab", "sampling_params": {"max_new_tokens": None}})
    assert status == 200 and json.loads(raw)["meta_info"]["completion_tokens"] == 128  # SGLang's default
    status, raw = post(url + "/v1/completions", {"prompt": "ab", "max_tokens": None})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 256 - 2  # all the context left
    status, raw = post(url + "/v1/completions", {"prompt": "x" * 256, "max_tokens": None})
    assert status == 400 and "leaves no room" in json.loads(raw)["error"]["message"]


def test_tiny_temperature_is_greedy():
    seen = []

    def params(**kw):
        from test_server_support import FakeParams

        seen.append(kw["temperature"])
        return FakeParams(**kw)

    from echo_exec.server import EchoServer, Limits, ServerThread

    thread = ServerThread(EchoServer(FakeEngine(), make_params=params, limits=Limits(259, 256)))
    try:
        for t in (1e-310, 1e-6, 0.0, 0.5):
            assert post(thread.url + "/generate", {"text": "a", "sampling_params": {
                "max_new_tokens": 2, "temperature": t}})[0] == 200
    finally:
        thread.stop()
    assert seen == [0.0, 0.0, 0.0, 0.5]


def test_requests_in_flight_get_503_on_shutdown():
    engine, thread = fake_server(FakeEngine(tokens_per_step=1, step_s=0.01), max_context=100_000, grace_s=0.3)
    got = {}

    def long_request(stream):
        got[stream] = post(thread.url + "/generate", {"text": "long", "stream": stream,
                                                      "sampling_params": {"max_new_tokens": 10_000}}, timeout=30)

    workers = [threading.Thread(target=long_request, args=(s,)) for s in (False, True)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 5
    while len(engine.reqs) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    thread.stop()
    for w in workers:
        w.join(10)
    assert time.monotonic() - t0 < 5
    status, raw = got[False]
    assert status == 503 and "shutting down" in json.loads(raw)["error"]["message"]
    status, raw = got[True]  # headers already sent: the 503 comes in the stream, then [DONE]
    events = sse_payloads(raw)
    assert status == 200 and events[-2]["error"]["code"] == 503 and events[-1] == "[DONE]"


# ----------------------------------------------------------------------------------------------------------
# Fuzzed requests: any JSON, and valid requests with fields swapped for random values, never get a 5xx.

FIELDS = ["text", "input_ids", "sampling_params", "stream", "rid", "prompt", "max_tokens", "messages", "temperature",
          "top_p", "seed", "n", "best_of", "stop", "stop_token_ids", "ignore_eos", "stream_options", "logprobs",
          "max_new_tokens", "max_completion_tokens", "truncate_prompt_tokens", "return_logprob", "role", "content"]
json_leaf = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
             | st.text(max_size=8) | st.sampled_from(["\ud800", "a\udfffb", "", "hi"]))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=4),
                          max_leaves=12)
VALID = [SGLANG_BENCH_GENERATE, SGLANG_BENCH_OAI, VLLM_BENCH_COMPLETIONS, VLLM_BENCH_CHAT,
         {"text": "a", "sampling_params": {"max_new_tokens": 3}}, {"prompt": [1, 2], "max_tokens": 2}]
PATHS = ["/generate", "/v1/completions", "/v1/chat/completions"]


@st.composite
def requests(draw):
    path = draw(st.sampled_from(PATHS))
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return path, json.dumps(draw(json_value)).encode()
    body = json.loads(json.dumps(draw(st.sampled_from(VALID))))
    target = body
    if "sampling_params" in body and draw(st.booleans()):
        target = body["sampling_params"]
    for _ in range(draw(st.integers(1, 3))):
        target[draw(st.sampled_from(FIELDS + list(target)))] = draw(json_value)
    raw = json.dumps(body).encode()
    if kind == 2:  # malformed bytes: cut, or a byte flipped
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:] if draw(st.booleans()) else raw[:i]
    return path, raw


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=requests())
def test_fuzzed_requests_never_get_a_5xx(srv, req):
    _, url = srv
    path, raw = req
    status, out = post(url + path, None, raw=raw, timeout=30)
    assert status < 500, (path, raw, status, out)
    if status >= 400:
        assert json.loads(out)["error"]["message"]


def test_server_is_up_after_the_fuzzing(srv):
    _, url = srv
    assert get(url + "/health")[0] == 200
    assert post(url + "/generate", {"text": "ok", "sampling_params": {"max_new_tokens": 2}})[0] == 200


def test_engine_refusals_name_the_clients_field():
    class Refusing(FakeEngine):
        def add_request(self, prompt_ids, params, request_id=None, on_tokens=None):
            raise ValueError(f"prompt + max_new_tokens ({params.max_new_tokens}) can never fit the KV pool")

    _, thread = fake_server(Refusing())
    try:
        cases = [("/v1/completions", {"prompt": "a", "max_tokens": 5}, "max_tokens (5)"),
                 ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                           "max_completion_tokens": 6}, "max_completion_tokens (6)"),
                 ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 7}}, "max_new_tokens (7)")]
        for path, body, words in cases:
            status, raw = post(thread.url + path, body)
            assert status == 400 and words in json.loads(raw)["error"]["message"], (path, raw)
    finally:
        thread.stop()
