"""The HTTP protocol of echo_exec/server.py against a fake engine with the real engine's API: fast and exact
(the tests against the real engine are in test_server.py)."""

import json
import socket
import time

import pytest
from test_server_support import FakeEngine, fake_server, fake_tokens, get, post, sse_payloads


@pytest.fixture(scope="module")
def srv():
    engine, thread = fake_server()
    yield engine, thread.url
    thread.stop()


def test_generate_text(srv):
    _, url = srv
    status, raw = post(url + "/generate", {"text": "hello", "sampling_params": {"max_new_tokens": 5,
                                                                                 "temperature": 0}})
    assert status == 200, raw
    out = json.loads(raw)
    want = fake_tokens(list(b"hello"), 5)
    assert out["output_ids"] == want
    assert out["text"] == bytes(want).decode()
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == 5 and meta["completion_tokens"] == 5
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["spec_verify_ct"] == 3  # 2 + 2 + 1 tokens
    assert meta["spec_accept_length"] == pytest.approx(5 / 3)
    assert meta["e2e_latency"] > 0


def test_generate_input_ids_and_stop_token(srv):
    _, url = srv
    prompt = [1, 2, 3]
    full = fake_tokens(prompt, 10)
    stop = full[3]
    status, raw = post(url + "/generate", {"input_ids": prompt, "sampling_params": {
        "max_new_tokens": 10, "stop_token_ids": [stop]}})
    assert status == 200, raw
    out = json.loads(raw)
    assert out["output_ids"] == full[:full.index(stop) + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_generate_stream_is_cumulative_and_ends_with_done(srv):
    _, url = srv
    status, raw = post(url + "/generate", {"text": "abc", "stream": True,
                                           "sampling_params": {"max_new_tokens": 7}})
    assert status == 200
    events = sse_payloads(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 4  # 2 + 2 + 2 + 1 tokens, one chunk per engine step
    want = fake_tokens(list(b"abc"), 7)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b["output_ids"][:len(a["output_ids"])] == a["output_ids"]  # cumulative, as SGLang
    assert chunks[-1]["output_ids"] == want and chunks[-1]["text"] == bytes(want).decode()
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert chunks[-1]["meta_info"]["completion_tokens"] == 7


def test_generate_batch(srv):
    _, url = srv
    status, raw = post(url + "/generate", {"text": ["ab", "xyz"], "sampling_params": {"max_new_tokens": 3}})
    assert status == 200, raw
    outs = json.loads(raw)
    assert [o["output_ids"] for o in outs] == [fake_tokens(list(b"ab"), 3), fake_tokens(list(b"xyz"), 3)]


def test_completions(srv):
    _, url = srv
    status, raw = post(url + "/v1/completions", {"model": "x", "prompt": "hi", "max_tokens": 4, "temperature": 0})
    assert status == 200, raw
    out = json.loads(raw)
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == bytes(fake_tokens(list(b"hi"), 4)).decode()
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_completions_stream_deltas_and_usage(srv):
    _, url = srv
    status, raw = post(url + "/v1/completions", {"prompt": "hi", "max_tokens": 5, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    assert status == 200
    events = sse_payloads(raw)
    assert events[-1] == "[DONE]"
    text_chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == bytes(fake_tokens(list(b"hi"), 5)).decode()
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 5


BAD = [
    ("/generate", None, b"{not json", "not valid JSON"),
    ("/generate", [1, 2], None, "JSON object"),
    ("/generate", {"sampling_params": {"max_new_tokens": 3}}, None, "exactly one of"),
    ("/generate", {"text": "a", "input_ids": [1]}, None, "exactly one of"),
    ("/generate", {"text": 5}, None, "'text' must be a string"),
    ("/generate", {"text": ""}, None, "empty"),
    ("/generate", {"input_ids": [1, "a"]}, None, "'input_ids' must be a list of token ids"),
    ("/generate", {"input_ids": [1, 999]}, None, "outside the vocabulary"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": -1}}, None, "max_new_tokens"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": "5"}}, None, "must be an integer"),
    ("/generate", {"text": "a", "sampling_params": {"temperature": -0.5}}, None, "temperature"),
    ("/generate", {"text": "a", "sampling_params": {"top_p": 0}}, None, "top_p"),
    ("/generate", {"text": "a", "sampling_params": {"top_p": 1.5}}, None, "top_p"),
    ("/generate", {"text": "a", "sampling_params": {"frequency_penalty": 1.0}}, None,
     "'sampling_params.frequency_penalty' = 1.0 is not supported"),
    ("/generate", {"text": "a", "sampling_params": []}, None, "must be an object"),
    ("/generate", {"text": "a", "foo": 1}, None, "field 'foo' = 1 is not supported"),
    ("/generate", {"text": "a", "return_logprob": True}, None, "'return_logprob' = True"),
    ("/generate", {"text": "a\ud800b"}, None, "'text' is not valid Unicode"),
    ("/generate", None, b'{"text": "a\\udc80"}', "not valid Unicode"),
    ("/generate", None, b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ("/generate", None, b'{"text": "\xff\xfe"}', "not valid JSON"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 1.5}}, None, "must be an integer"),
    ("/generate", {"text": "a", "sampling_params": {"temperature": True}}, None, "must be a number"),
    ("/generate", {"text": "a", "stream": "yes"}, None, "'stream'"),
    ("/generate", {"text": "x" * 250, "sampling_params": {"max_new_tokens": 10}}, None, "context of 256"),
    ("/generate", {"text": ["a", "b"], "stream": True}, None, "batch"),
    ("/generate", {"text": "^refused", "sampling_params": {"max_new_tokens": 3}}, None, "refused"),
    ("/generate", {"text": "^refused", "stream": True}, None, "refused"),  # before the stream starts
    ("/v1/completions", {"prompt": "^refused", "stream": True}, None, "refused"),
    ("/v1/completions", {"prompt": "a", "n": 2}, None, "'n'"),
    ("/v1/completions", {"prompt": "a", "best_of": 2}, None, "'best_of' = 2"),
    ("/v1/completions", {"prompt": "a", "use_beam_search": True}, None, "'use_beam_search'"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 1.2}, None, "'repetition_penalty' = 1.2"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, None, "'max_tokens' must be >= 1"),
    ("/v1/completions", {"prompt": "x" * 250, "max_tokens": 10}, None, "plus max_tokens (10)"),
    ("/v1/completions", {"prompt": 3}, None, "'prompt'"),
    ("/v1/completions", {"prompt": ["a", "b"]}, None, "one prompt per request"),
    ("/v1/completions", {"prompt": "a", "logprobs": 2}, None, "logprobs"),
    ("/v1/completions", {"prompt": "a", "stop": ["\n"]}, None, "'stop' strings"),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, None, "'stream_options'"),
    ("/v1/completions", {"prompt": "a", "seed": 2 ** 70}, None, "'seed'"),
    ("/v1/completions", {"max_tokens": 3}, None, "'prompt' is required"),
    ("/v1/chat/completions", {"messages": []}, None, "'messages' is empty"),
    ("/v1/chat/completions", {"messages": "hi"}, None, "'messages' must be a list"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "a"}]}, None,
     "'messages.0.role' must be one of"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "a"}, {"role": "user"}]}, None,
     "'messages.1.content' is required in a user message"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, None,
     "'messages.0.content' is required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     None, "'messages.0.content' must be a string or a list"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1,
                              "max_completion_tokens": 2}, None, "at most one"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]},
     None, "'tools'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 300}], "max_completion_tokens": 5},
     None, "plus max_completion_tokens (5)"),
]


@pytest.mark.parametrize("path,body,raw,message", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_4xx_with_a_message(srv, path, body, raw, message):
    _, url = srv
    status, out = post(url + path, body, raw=raw)
    assert 400 <= status < 500, (status, out)
    err = json.loads(out)["error"]
    assert message in err["message"], err
    assert err["code"] == status


def test_server_keeps_serving_after_bad_requests(srv):
    _, url = srv
    for path, body, raw, _ in BAD:
        post(url + path, body, raw=raw)
    assert get(url + "/health")[0] == 200
    status, raw = post(url + "/generate", {"text": "ok", "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and json.loads(raw)["output_ids"] == fake_tokens(list(b"ok"), 2)


def test_unknown_path_and_method(srv):
    _, url = srv
    assert get(url + "/nope")[0] == 404
    assert get(url + "/generate")[0] == 405


def test_engine_failure_fails_the_request_not_the_server(srv):
    engine, url = srv
    status, raw = post(url + "/generate", {"text": "~boom", "sampling_params": {"max_new_tokens": 3}})
    assert status == 500 and "fake engine failure" in json.loads(raw)["error"]["message"]
    status, raw = post(url + "/generate", {"text": "fine", "sampling_params": {"max_new_tokens": 3}})
    assert status == 200
    status, raw = get(url + "/server_info")
    assert json.loads(raw)["internal_states"][0]["engine_errors"] >= 1


def test_server_info(srv):
    _, url = srv
    post(url + "/generate", {"text": "info", "sampling_params": {"max_new_tokens": 6}})
    for path in ("/server_info", "/get_server_info"):
        status, raw = get(url + path)
        assert status == 200
        info = json.loads(raw)
        assert info["policy"] == "fake" and info["model"] == "fake"
        assert info["avg_spec_accept_length"] == pytest.approx(2.0, abs=0.5)
        state = info["internal_states"][0]
        assert state["avg_spec_accept_length"] == info["avg_spec_accept_length"]
        assert state["engine"]["steps"] > 0


def _wait(cond, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request(stream):
    engine, thread = fake_server(FakeEngine(tokens_per_step=1, step_s=0.01), max_context=100_000)
    try:
        host, port = thread.host, thread.port
        body = json.dumps({"text": "long", "stream": stream, "sampling_params": {"max_new_tokens": 10_000}}).encode()
        sock = socket.create_connection((host, port))
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert _wait(lambda: len(engine.reqs) == 1)
        if stream:
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        sock.close()
        assert _wait(lambda: len(engine.aborted) == 1 and not engine.reqs), (engine.aborted, engine.reqs)
        assert _wait(lambda: not thread.server.inflight)
        status, _ = post(thread.url + "/generate", {"text": "after", "sampling_params": {"max_new_tokens": 2}})
        assert status == 200
    finally:
        thread.stop()


def test_serve_cli_user_errors(tmp_path, capsys):
    from test_server_support import make_tiny_models

    from echosim.cli import main

    target, draft = make_tiny_models(tmp_path)
    (tmp_path / "pc.json").write_text('{"policy": "eagle3", "topk": 4}')
    cases = [
        (["--model", str(tmp_path / "nope")], "not a model directory"),
        (["--model", str(target), "--draft", str(tmp_path)], "--draft: not a model directory"),
        (["--model", str(target), "--policy-config", "{bad"], "not valid JSON"),
        (["--model", str(target), "--policy-config", "[1]"], "must be a JSON object"),
        (["--model", str(target), "--policy-config", str(tmp_path / "missing.json")], "cannot read"),
        (["--model", str(target), "--policy", "echo", "--policy-config", str(tmp_path / "pc.json")], "disagrees"),
        (["--model", str(target), "--port", "70000"], "--port"),
        (["--model", str(target), "--max-running", "0"], "--max-running"),
    ]
    for args, message in cases:
        assert main(["serve", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


def test_an_assistant_turn_may_come_without_content(srv):
    # an assistant turn that made tool calls carries no content (OpenAI's schema); only it may
    _, url = srv
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                {"role": "tool", "content": "b"}, {"role": "user", "content": "c"}]
    status, raw = post(url + "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["role"] == "assistant"
