"""HTTP server for the echo engine, on aiohttp: SGLang's native `/generate`, OpenAI's (vLLM's) `/v1/completions`,
`/v1/chat/completions` and `/v1/models`, SGLang's `/get_model_info`, `/server_info` (alias `/get_server_info`),
`/health`, `/health_generate`, `/flush_cache`, and Prometheus `/metrics` (vLLM's and SGLang's metric names).

Threading: the engine is not thread-safe, so it lives in one dedicated thread (`EngineWorker`). The asyncio side
only puts commands (add / abort / stats / fail) in the worker's inbox; the worker drains the inbox, calls
`engine.step()` while there is work and otherwise sleeps on an event, and hands tokens and results back to the event
loop with `loop.call_soon_threadsafe`, once per iteration for all requests. Each request owns an `asyncio.Queue` of
events ("tokens" for streamed requests only, then "done" or "error").

Protocol notes (matching SGLang and vLLM so that their clients and benchmarks work unchanged):
- Requests are validated by the pydantic schemas of echo_exec/protocol.py: every field SGLang's and vLLM's schemas
  define is accepted at its neutral value, fields we honour are checked, and anything we cannot honour is a 400
  naming the field as the client spelled it.
- `/generate` takes `text` (str or list of str) or `input_ids` (list of int or list of lists), `sampling_params`
  (max_new_tokens (null = 128, SGLang's default), temperature, top_p, stop_token_ids, ignore_eos,
  sampling_seed), `stream`, `rid`. Like SGLang, generation stops at the model's EOS unless `ignore_eos` is true.
  The response is `text`, `output_ids` and `meta_info` (id, finish_reason {"type": "length", "length": n} /
  {"type": "stop", "matched": id}, prompt_tokens, completion_tokens, cached_tokens, e2e_latency, spec_verify_ct,
  spec_accept_length = completion_tokens / spec_verify_ct, spec_num_correct_drafts). Streaming sends server-sent
  events `data: {...}` whose `text` and `output_ids` are cumulative (SGLang's default), then `data: [DONE]`.
- `/v1/completions`: prompt (str, list of int, or a list holding one of them), max_tokens (default 16, null = as
  many as fit), temperature (default 1), top_p, seed, stop_token_ids, ignore_eos, stream (deltas, then
  `data: [DONE]`), stream_options.include_usage; a `usage` block. `/v1/chat/completions`: messages rendered with the
  model directory's chat template (tokenizer_config.json `chat_template`), max_tokens / max_completion_tokens
  (default: as many as fit), the same sampling fields, streaming too.
- A temperature below 1e-5 is greedy (sampling at 1e-310 would overflow).
- Errors are JSON `{"error": {"message": ..., "type": ..., "code": status}}` with a 4xx status for bad requests
  (malformed JSON, lone surrogates, deeply nested bodies included) and 500 only for engine failures; either way the
  server keeps serving. On shutdown requests in flight get a grace period, then a 503.
- A client that disconnects has its request aborted in the engine (aiohttp handler cancellation is on).
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import dataclasses
import json
import logging
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from echo_exec.protocol import (
    SGLANG_DEFAULT_MAX_NEW_TOKENS,
    BadRequest,
    ChatIn,
    CompletionIn,
    GenerateIn,
    SamplingParamsIn,
    check_stop_strings,
    parse,
    sampling_kwargs,
)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'

__all__ = ["BadRequest", "EchoServer", "EngineWorker", "Limits", "ServerThread", "serve_forever"]


# ----------------------------------------------------------------------------------------------------------
# Engine worker: the only thread that touches the engine.


@dataclass
class Result:
    """What the worker hands back when a request finishes: a copy, so the engine may reuse its objects."""

    request_id: str
    output_ids: list[int]
    finish_reason: str | None
    spec_verify_ct: int
    accepted_drafts: int
    ttft_s: float | None = None   # the engine's first token time less its arrival time


@dataclass
class Handle:
    """One request as the asyncio side sees it: events arrive on `queue`."""

    request_id: str
    prompt_ids: list[int]
    queue: asyncio.Queue
    stream: bool = False      # token events wanted (streaming); otherwise only the final result
    created_s: float = field(default_factory=time.perf_counter)
    max_name: str = "max_new_tokens"   # what the client called the output length (engine errors say it so)
    last_token_s: float | None = None  # worker thread: when the engine last delivered tokens (inter-token latency)


class EngineWorker:
    """Runs `engine` in a dedicated thread. Commands go through `_inbox`; results come back on the event loop."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, *, idle_wait_s: float = 0.5, metrics=None):
        self.engine = engine
        self.loop = loop
        self.idle_wait_s = idle_wait_s
        self.metrics = metrics
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._handles: dict[str, Handle] = {}   # worker thread only
        self._outbox: list[tuple[asyncio.Queue, tuple]] = []  # events of this iteration, posted in one go
        # Totals over finished requests (written by the worker; ints, read racily for /server_info is fine).
        self.finished_requests = 0
        self.completion_tokens = 0
        self.spec_verify_ct = 0
        self.engine_errors = 0
        self._thread = threading.Thread(target=self._run, name="echo-engine", daemon=True)

    # -- called from the event loop ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def add(self, handle: Handle, prompt_ids: list[int], params, ignore_eos: bool = False) -> None:
        self._send(("add", handle, prompt_ids, params, ignore_eos))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def fail_all(self, status: int, message: str) -> None:
        """Fail every request in flight with `status` (shutdown: 503)."""
        self._send(("fail", status, message))

    async def stats(self) -> dict:
        fut = self.loop.create_future()
        self._send(("stats", fut))
        return await fut

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _send(self, cmd: tuple) -> None:
        self._inbox.append(cmd)
        self._wake.set()
    # -- worker thread -------------------------------------------------------------------------------------
    def _post(self, fn: Callable, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def _emit(self, handle: Handle, event: tuple) -> None:
        self._outbox.append((handle.queue, event))

    def _flush(self) -> None:
        """One wake-up of the event loop per iteration, not one per token: the engine thread and the loop share
        the GIL, and a step of 32 requests would otherwise post 32 callbacks."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self._post(_deliver, batch)

    def _run(self) -> None:
        while not self._stop:
            try:
                self._drain()
                if self.engine.has_unfinished():  # also when only aborts are pending: they free KV at a step
                    self._step()
                elif self._handles:
                    self._fail_all(500, "the engine dropped the request")  # never leave a client hanging
                else:
                    # Wait for a command. A set() between the wait and clear() is not lost: _drain runs next.
                    self._flush()
                    self._wake.wait(self.idle_wait_s)
                    self._wake.clear()
            except Exception as exc:  # a bug on this side of the engine: fail what is in flight, keep serving
                self.engine_errors += 1
                traceback.print_exc(file=sys.stderr)
                self._fail_all(500, f"server error: {type(exc).__name__}: {exc}")
            self._flush()
        self._fail_all(503, "the server is shutting down")
        self._flush()

    def _fail_all(self, status: int, message: str) -> None:
        for rid, handle in list(self._handles.items()):
            self._emit(handle, ("error", status, message))
            try:
                self.engine.abort(rid)
            except Exception:
                pass
        self._handles.clear()

    def _drain(self) -> None:
        while self._inbox:
            cmd = self._inbox.popleft()
            kind = cmd[0]
            if kind == "add":
                self._add(*cmd[1:])
            elif kind == "abort":
                self._abort(cmd[1])
            elif kind == "fail":
                self._fail_all(cmd[1], cmd[2])
            elif kind == "stats":
                fut = cmd[1]
                try:
                    stats = dict(self.engine.stats())
                except Exception as exc:  # a stats bug must not stop the engine
                    stats = {"error": f"{type(exc).__name__}: {exc}"}
                self._post(_resolve, fut, stats)

    def _add(self, handle: Handle, prompt_ids: list[int], params, ignore_eos: bool) -> None:
        metrics = self.metrics

        def on_tokens(_out, new_ids, h=handle):
            if metrics is not None:  # inter-token latency: the gap since this request's previous delivery
                now = time.perf_counter()
                if h.last_token_s is not None:
                    metrics.observe_itl(now - h.last_token_s)
                h.last_token_s = now
            if h.stream:
                self._emit(h, ("tokens", [int(t) for t in new_ids]))

        # A plain request only needs its result, unless the metrics want its token times.
        callback = on_tokens if handle.stream or metrics is not None else None

        params.ignore_eos = ignore_eos
        try:
            self.engine.add_request(prompt_ids, params, request_id=handle.request_id, on_tokens=callback)
        except Exception as exc:  # the engine refused the request (too long, out of capacity...): a 400
            self._emit(handle, ("error", 400, str(exc).replace("max_new_tokens", handle.max_name)))
            return
        self._handles[handle.request_id] = handle

    def _abort(self, request_id: str) -> None:
        if self._handles.pop(request_id, None) is None:
            return  # already finished (or never added)
        try:
            self.engine.abort(request_id)
        except Exception:
            traceback.print_exc(file=sys.stderr)

    def _step(self) -> None:
        try:
            finished = self.engine.step()
        except Exception as exc:
            # An engine bug fails the requests in flight, not the server: report it and abort them all.
            self.engine_errors += 1
            traceback.print_exc(file=sys.stderr)
            self._fail_all(500, f"engine error: {type(exc).__name__}: {exc}")
            return
        for out in finished:
            handle = self._handles.pop(out.request_id, None)
            if handle is None:
                continue  # aborted by its client in the meantime
            first, arrival = getattr(out, "first_token_s", None), getattr(out, "arrival_s", None)
            ttft = first - arrival if first is not None and arrival is not None else None
            result = Result(out.request_id, [int(t) for t in out.output_ids], out.finish_reason,
                            int(out.spec_verify_ct or 0), int(out.accepted_drafts or 0), ttft)
            self.finished_requests += 1
            self.completion_tokens += len(result.output_ids)
            self.spec_verify_ct += result.spec_verify_ct
            self._emit(handle, ("done", result))


def _deliver(batch: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, event in batch:
        queue.put_nowait(event)


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


# ----------------------------------------------------------------------------------------------------------
# Requests, validated (echo_exec/protocol.py holds the schemas).


@dataclass
class GenRequest:
    prompt_ids: list[int]
    sampling: dict            # keyword arguments of SamplingParams
    request_id: str
    ignore_eos: bool = False  # SGLang's flag: do not stop at the model's EOS
    max_name: str = "max_new_tokens"  # the client's name for the output length


@dataclass
class Limits:
    vocab_size: int
    max_context_tokens: int    # prompt + new tokens must fit (positions and KV capacity)


class Validator:
    """Prompts and lengths, checked against the model: token ids in the vocabulary, prompt + output in context."""

    def __init__(self, limits: Limits, encode: Callable[[str], list[int]]):
        self.limits = limits
        self.encode = encode

    def text_ids(self, text: str, name: str) -> list[int]:
        try:
            return self.encode(text)
        except UnicodeEncodeError as exc:  # a lone UTF-16 surrogate ("\\ud800") is not text
            raise BadRequest(f"'{name}' is not valid Unicode: {exc.reason} at character {exc.start}") from None

    def token_ids(self, ids: list[int], name: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.limits.vocab_size]
        if bad:
            raise BadRequest(f"'{name}': token id {bad[0]} is outside the vocabulary (0..{self.limits.vocab_size - 1})")
        return list(ids)

    def nonempty(self, ids: list[int], name: str) -> list[int]:
        if not ids:
            raise BadRequest(f"'{name}': the prompt is empty")
        return ids

    def max_new(self, value: int | None, name: str, ids: list[int], *, default: int | None, low: int = 1) -> int:
        """max_new_tokens / max_tokens: `default` when null (None = as many as fit the context)."""
        if value is None:
            room = self.limits.max_context_tokens - len(ids)
            if room < low or room < 1:
                raise BadRequest(f"the prompt ({len(ids)} tokens) leaves no room in this server's context of "
                                 f"{self.limits.max_context_tokens} for '{name}'")
            value = room if default is None else min(default, room)
        if value < low:
            raise BadRequest(f"'{name}' must be >= {low}, got {value}")
        return value

    def fits(self, ids: list[int], max_new_tokens: int, where: str, name: str) -> None:
        need = len(ids) + max_new_tokens
        if need > self.limits.max_context_tokens:
            raise BadRequest(f"{where}: the prompt ({len(ids)} tokens) plus {name} ({max_new_tokens}) is "
                             f"{need} tokens, more than this server's context of {self.limits.max_context_tokens}")


# ----------------------------------------------------------------------------------------------------------
# The HTTP application.


def _error(status: int, message: str) -> web.Response:
    kind = {400: "BadRequestError", 404: "NotFoundError", 413: "BadRequestError", 503: "ServiceUnavailableError"
            }.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def _byte_text(ids: list[int]) -> bytes:
    """Bytes of the byte-level ids; special and out-of-byte-range ids (a larger random-weight vocab) are dropped."""
    return bytes(t for t in ids if 0 <= t < 256)


def _finish_reason(reason: str | None, ids: list[int]) -> dict | None:
    """SGLang's shape: {"type": "stop", "matched": id} / {"type": "length", "length": n} / {"type": other}."""
    if reason is None:
        return None
    if reason == "stop":
        return {"type": "stop", "matched": ids[-1] if ids else None}
    if reason == "length":
        return {"type": "length", "length": len(ids)}
    return {"type": reason}


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ChatTemplate:
    """A Hugging Face chat template (Jinja, in a sandbox) with the variables transformers passes it."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_model_dir(cls, model_dir) -> ChatTemplate | None:
        """The template of a Hugging Face model directory: chat_template.jinja, else tokenizer_config.json's
        `chat_template` (a string, or a list of named ones: "default"); None when it has none."""
        from pathlib import Path

        d = Path(model_dir)
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        source = cfg.get("chat_template")
        if (d / "chat_template.jinja").is_file():
            source = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(source, list):
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        if not isinstance(source, str) or not source:
            return None

        def token(name):
            t = cfg.get(name)
            return t.get("content", "") if isinstance(t, dict) else (t or "")
        return cls(source, bos_token=token("bos_token"), eos_token=token("eos_token"))

    def render(self, messages: list[dict], *, add_generation_prompt: bool, **kwargs) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)
        except (TemplateError, TypeError, ValueError) as exc:
            raise BadRequest(f"the chat template refused the messages: {exc}") from None


class EchoServer:
    """The aiohttp application around one engine. `info` is what /server_info reports (model, policy...)."""

    def __init__(self, engine, *, make_params: Callable[..., Any], limits: Limits, info: dict | None = None,
                 encode: Callable[[str], list[int]] | None = None, chat_template: ChatTemplate | None = None,
                 model_name: str | None = None):
        from echo_exec.metrics_prom import ServerMetrics

        self.engine = engine
        self.make_params = make_params
        self.info = dict(info or {})
        self.limits = limits
        self.validator = Validator(limits, encode or (lambda s: list(s.encode("utf-8"))))
        self.chat_template = chat_template
        self.model_name = model_name or str(self.info.get("model", "echo"))
        self.metrics = ServerMetrics(self.model_name)
        self.worker: EngineWorker | None = None
        self.inflight: dict[str, Handle] = {}
        self.closing = False  # shutting down: new requests get a 503
        self.started_s = time.time()
        self.app = web.Application(middlewares=[self._errors])
        self.app.add_routes([
            web.post("/generate", self.generate),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/server_info", self.server_info),
            web.get("/get_server_info", self.server_info),
            web.get("/get_model_info", self.model_info),
            web.get("/health", self.health),
            web.get("/health_generate", self.health_generate),
            web.get("/flush_cache", self.flush_cache),
            web.post("/flush_cache", self.flush_cache),
            web.get("/metrics", self.prometheus),
        ])
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)

    async def _on_startup(self, _app) -> None:
        self.worker = EngineWorker(self.engine, asyncio.get_running_loop(), metrics=self.metrics)
        self.worker.start()

    async def _on_cleanup(self, _app) -> None:
        if self.worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new requests (503), give those in flight `grace_s` to finish, then fail the rest with a 503 and
        give their handlers a moment to send it."""
        self.closing = True
        deadline = time.monotonic() + grace_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.inflight and self.worker is not None and self.worker.alive():
            self.worker.fail_all(503, "the server is shutting down")
            deadline = time.monotonic() + 2.0
            while self.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Every client mistake is a 4xx with a JSON body; a bug is a 500 that leaves the server up."""
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        except web.HTTPException as exc:
            if exc.status >= 400 and exc.content_type != "application/json":
                return _error(exc.status, exc.reason)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            return _error(500, f"server error: {type(exc).__name__}: {exc}")

    # -- helpers -------------------------------------------------------------------------------------------
    async def _json(self, request: web.Request) -> Any:
        if self.closing:
            raise BadRequest("the server is shutting down", status=503)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest("request body too large", status=413) from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:   # JSONDecodeError is a ValueError
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise BadRequest("the body is not valid JSON: nested too deeply") from None

    def _submit(self, req: GenRequest, stream: bool = False) -> Handle:
        if req.request_id in self.inflight:
            raise BadRequest(f"request id {req.request_id!r} is already in flight")
        if self.closing:
            raise BadRequest("the server is shutting down", status=503)
        if self.worker is None or not self.worker.alive():
            raise BadRequest("the engine is not running", status=503)
        handle = Handle(req.request_id, req.prompt_ids, asyncio.Queue(), stream, max_name=req.max_name)
        self.inflight[req.request_id] = handle
        self.worker.add(handle, req.prompt_ids, self.make_params(**req.sampling), req.ignore_eos)
        return handle

    def _release(self, handle: Handle, finished: bool) -> None:
        self.inflight.pop(handle.request_id, None)
        if not finished and self.worker is not None:
            self.worker.abort(handle.request_id)  # client gone or error: free the engine's slot

    def _observe(self, handle: Handle, result: Result) -> None:
        self.metrics.observe_request(prompt_tokens=len(handle.prompt_ids), output_tokens=len(result.output_ids),
                                     ttft_s=result.ttft_s, e2e_s=time.perf_counter() - handle.created_s,
                                     finish_reason=result.finish_reason)

    async def _first_event(self, handle: Handle) -> tuple:
        """Wait for the first event before a stream sends its headers, so that a request the engine refuses
        still gets a plain 4xx; raises BadRequest for an error event."""
        event = await handle.queue.get()
        if event[0] == "error":
            raise BadRequest(event[2], status=event[1])
        return event

    async def _events(self, handle: Handle, first: tuple | None = None):
        """Yields ("tokens", ids) events, then the ("done", Result) one; raises BadRequest on an engine error."""
        while True:
            event = first if first is not None else await handle.queue.get()
            first = None
            if event[0] == "tokens":
                yield event
            elif event[0] == "done":
                self._observe(handle, event[1])
                yield event
                return
            else:
                raise BadRequest(event[2], status=event[1])

    async def _run_to_end(self, handle: Handle) -> Result:
        finished = False
        try:
            async for event in self._events(handle):
                if event[0] == "done":
                    finished = True
                    return event[1]
            raise BadRequest("the request ended without a result", status=500)
        finally:
            self._release(handle, finished)

    def _meta(self, handle: Handle, ids: list[int], result: Result | None) -> dict:
        meta = {
            "id": handle.request_id,
            "finish_reason": None if result is None else _finish_reason(result.finish_reason, ids),
            "prompt_tokens": len(handle.prompt_ids),
            "completion_tokens": len(ids),
            "cached_tokens": 0,
        }
        if result is not None:
            verify = result.spec_verify_ct
            meta.update({
                "e2e_latency": time.perf_counter() - handle.created_s,
                "spec_verify_ct": verify,
                "spec_accept_length": len(ids) / verify if verify else None,
                "spec_num_correct_drafts": result.accepted_drafts,
            })
        return meta

    # -- /generate -----------------------------------------------------------------------------------------
    def _parse_generate(self, body) -> tuple[list[GenRequest], bool, bool]:
        g = parse(GenerateIn, body)
        v = self.validator
        if (g.text is None) == (g.input_ids is None):
            raise BadRequest("give exactly one of 'text' and 'input_ids'")
        if g.text is not None:
            batch = isinstance(g.text, list)
            texts = g.text if batch else [g.text]
            prompts = [v.text_ids(t, f"text.{i}" if batch else "text") for i, t in enumerate(texts)]
        else:
            batch = bool(g.input_ids) and isinstance(g.input_ids[0], list)
            lists = g.input_ids if batch else [g.input_ids]
            prompts = [v.token_ids(ids, f"input_ids.{i}" if batch else "input_ids") for i, ids in enumerate(lists)]
        if batch and not prompts:
            raise BadRequest("the batch is empty")
        for i, ids in enumerate(prompts):
            v.nonempty(ids, f"prompt {i}" if batch else "prompt")
        if batch and g.stream:
            raise BadRequest("streaming a batch is not supported; send one request per prompt")
        sps = g.sampling_params if isinstance(g.sampling_params, list) else [g.sampling_params or {}] * len(prompts)
        if len(sps) != len(prompts):
            raise BadRequest(f"'sampling_params' must be an object (or a list of one per prompt: {len(prompts)})")
        rids = g.rid if isinstance(g.rid, list) else None
        if rids is not None and (not batch or len(rids) != len(prompts)):
            raise BadRequest("'rid' must be a string, or for a batch a list of one per prompt")
        reqs = []
        for i, (ids, sp_raw) in enumerate(zip(prompts, sps, strict=True)):
            where = f"sampling_params.{i}." if isinstance(g.sampling_params, list) else "sampling_params."
            sp = parse(SamplingParamsIn, sp_raw, where)
            max_new = v.max_new(sp.max_new_tokens, "max_new_tokens", ids, default=SGLANG_DEFAULT_MAX_NEW_TOKENS,
                                low=0)
            sampling = sampling_kwargs(temperature=sp.temperature, top_p=sp.top_p, seed=sp.sampling_seed,
                                       stop_token_ids=sp.stop_token_ids, vocab_size=self.limits.vocab_size,
                                       seed_name="sampling_seed")
            v.fits(ids, max_new, f"prompt {i}" if batch else "prompt", "max_new_tokens")
            rid = rids[i] if rids is not None else (f"{g.rid}-{i}" if batch and g.rid else g.rid)
            reqs.append(GenRequest(ids, {"max_new_tokens": max_new, **sampling}, rid or uuid.uuid4().hex,
                                   sp.ignore_eos))
        return reqs, g.stream, batch

    async def generate(self, request: web.Request) -> web.StreamResponse:
        reqs, stream, batch = self._parse_generate(await self._json(request))
        if stream:
            return await self._generate_stream(request, reqs[0])
        results = await asyncio.gather(*(self._generate_one(r) for r in reqs))
        return web.json_response(results if batch else results[0])

    async def _generate_one(self, req: GenRequest) -> dict:
        if req.sampling["max_new_tokens"] == 0:  # nothing to generate: answer without the engine
            handle = Handle(req.request_id, req.prompt_ids, asyncio.Queue())
            result = Result(req.request_id, [], "length", 0, 0)
        else:
            handle = self._submit(req)
            result = await self._run_to_end(handle)
        ids = result.output_ids
        return {"text": _byte_text(ids).decode("utf-8", errors="replace"), "output_ids": ids,
                "meta_info": self._meta(handle, ids, result)}

    async def _generate_stream(self, request: web.Request, req: GenRequest) -> web.StreamResponse:
        if req.sampling["max_new_tokens"] == 0:
            raise BadRequest("'max_new_tokens' must be >= 1 when streaming")
        handle = self._submit(req, stream=True)
        text = ""

        def chunks(ids, new, delta, result):  # SGLang streams the whole text so far, every time
            nonlocal text
            text += delta
            if new or result is not None:
                yield {"text": text, "output_ids": ids, "meta_info": self._meta(handle, ids, result)}

        return await self._stream(request, handle, chunks)

    async def _stream(self, request: web.Request, handle, chunks) -> web.StreamResponse:
        """Server-sent events over a request's token events: `chunks(ids, new, delta, result)` gives the JSON
        payloads of each event (ids so far, the new ids, their text, and the result on the last event)."""
        finished = False
        try:
            first = await self._first_event(handle)
            resp = web.StreamResponse(headers=SSE_HEADERS)
            await resp.prepare(request)
            ids: list[int] = []
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                async for event in self._events(handle, first):
                    result = event[1] if event[0] == "done" else None
                    new = event[1] if result is None else result.output_ids[len(ids):]  # what callbacks missed
                    ids.extend(new)
                    finished |= result is not None
                    delta = decoder.decode(_byte_text(new), final=result is not None)
                    for payload in chunks(ids, new, delta, result):
                        await resp.write(_sse(payload))
            except BadRequest as exc:  # headers are sent: report the failure in-band, as SGLang does
                await resp.write(_sse({"error": {"message": str(exc), "code": exc.status}}))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self._release(handle, finished)

    # -- OpenAI: /v1/completions and /v1/chat/completions --------------------------------------------------
    def _openai_request(self, ids: list[int], o, *, max_name: str, max_value, max_default, prefix: str) -> GenRequest:
        v = self.validator
        check_stop_strings(o.stop)
        if o.stream_options is not None and not o.stream:
            raise BadRequest("'stream_options' is only allowed with 'stream': true")
        if o.truncate_prompt_tokens is not None:
            if o.truncate_prompt_tokens < 1:
                raise BadRequest("'truncate_prompt_tokens' must be >= 1")
            ids = ids[-o.truncate_prompt_tokens:]
        v.nonempty(ids, "prompt")
        max_new = v.max_new(max_value, max_name, ids, default=max_default)
        sampling = sampling_kwargs(temperature=o.temperature, top_p=o.top_p, seed=o.seed,
                                   stop_token_ids=o.stop_token_ids, vocab_size=self.limits.vocab_size)
        v.fits(ids, max_new, "prompt", max_name)
        rid = o.request_id or uuid.uuid4().hex
        return GenRequest(ids, {"max_new_tokens": max_new, **sampling}, prefix + rid, o.ignore_eos, max_name)

    def _parse_completions(self, body) -> tuple[GenRequest, CompletionIn]:
        o = parse(CompletionIn, body)
        prompt = o.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) > 1:
                raise BadRequest(f"'prompt' holds {len(prompt)} prompts; this server takes one prompt per "
                                 "request (send them as separate requests)")
            prompt = prompt[0]   # a batch of one
        if isinstance(prompt, str):
            ids = self.validator.text_ids(prompt, "prompt")
        else:
            ids = self.validator.token_ids(prompt, "prompt")
        return self._openai_request(ids, o, max_name="max_tokens", max_value=o.max_tokens,
                                    max_default=None, prefix="cmpl-"), o

    def _parse_chat(self, body) -> tuple[GenRequest, ChatIn]:
        o = parse(ChatIn, body)
        if self.chat_template is None:
            raise BadRequest("this model has no chat template (tokenizer_config.json 'chat_template'); use "
                             "/v1/completions", status=400)
        if not o.messages:
            raise BadRequest("'messages' is empty")
        for i, m in enumerate(o.messages):
            m.check_extra(f"messages.{i}.")
            m.check(f"messages.{i}.")
        if o.max_tokens is not None and o.max_completion_tokens is not None:
            raise BadRequest("give at most one of 'max_tokens' and 'max_completion_tokens'")
        max_name = "max_completion_tokens" if o.max_completion_tokens is not None else "max_tokens"
        max_value = o.max_completion_tokens if o.max_completion_tokens is not None else o.max_tokens
        messages = [{"role": m.role, "content": m.text()} for m in o.messages]
        text = self.chat_template.render(messages, add_generation_prompt=o.add_generation_prompt,
                                         **(o.chat_template_kwargs or {}))
        ids = self.validator.text_ids(text, "messages")
        return self._openai_request(ids, o, max_name=max_name, max_value=max_value, max_default=None,
                                    prefix="chatcmpl-"), o

    def _model(self, o) -> str:
        return o.model_extra.get("model") if isinstance(o.model_extra.get("model"), str) else self.model_name

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req, o = self._parse_completions(await self._json(request))
        model = self._model(o)
        include_usage = bool(o.stream_options and o.stream_options.include_usage)
        if o.stream:
            return await self._openai_stream(request, req, model, include_usage, chat=False)
        result = await self._run_to_end(self._submit(req))
        ids = result.output_ids
        return web.json_response({
            "id": req.request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": _byte_text(ids).decode("utf-8", errors="replace"), "logprobs": None,
                         "finish_reason": result.finish_reason, "stop_reason": None}],
            "usage": _usage(len(req.prompt_ids), len(ids)),
        })

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req, o = self._parse_chat(await self._json(request))
        model = self._model(o)
        include_usage = bool(o.stream_options and o.stream_options.include_usage)
        if o.stream:
            return await self._openai_stream(request, req, model, include_usage, chat=True)
        result = await self._run_to_end(self._submit(req))
        ids = result.output_ids
        return web.json_response({
            "id": req.request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": _byte_text(ids).decode("utf-8", errors="replace")},
                         "logprobs": None, "finish_reason": result.finish_reason, "stop_reason": None}],
            "usage": _usage(len(req.prompt_ids), len(ids)),
        })

    async def _openai_stream(self, request, req: GenRequest, model: str, include_usage: bool, *, chat: bool):
        handle = self._submit(req, stream=True)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        first = [True]

        def chunk(text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                if first[0]:
                    delta, first[0] = {"role": "assistant", **delta}, False
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": req.request_id, "object": obj, "created": created, "model": model, "choices": [choice]}

        def chunks(ids, new, delta, result):  # OpenAI streams text deltas, then usage if asked
            if result is None:
                if delta:
                    yield chunk(delta, None)
                return
            yield chunk(delta if delta or not chat else None, result.finish_reason)
            if include_usage:
                yield {"id": req.request_id, "object": obj, "created": created, "model": model, "choices": [],
                       "usage": _usage(len(req.prompt_ids), len(ids))}

        return await self._stream(request, handle, chunks)

    # -- info, health, metrics -----------------------------------------------------------------------------
    async def _engine_stats(self) -> dict:
        w = self.worker
        return await w.stats() if w is not None and w.alive() else {}

    async def server_info(self, request: web.Request) -> web.Response:
        w = self.worker
        engine_stats = await self._engine_stats()
        served = w.completion_tokens / w.spec_verify_ct if w is not None and w.spec_verify_ct else None
        accept = _accept_length(engine_stats)
        if accept is None:
            accept = served
        state = {
            "avg_spec_accept_length": accept,
            "served_accept_length": served,  # SGLang's definition: completion tokens / verify steps, finished reqs
            "finished_requests": w.finished_requests if w else 0,
            "inflight_requests": len(self.inflight),
            "engine_errors": w.engine_errors if w else 0,
            "engine": _jsonable(engine_stats),
        }
        return web.json_response({**_jsonable(self.info), "avg_spec_accept_length": accept,
                                  "uptime_s": time.time() - self.started_s, "internal_states": [state]})

    async def model_info(self, request: web.Request) -> web.Response:
        """SGLang's /get_model_info."""
        path = self.info.get("model_path", self.model_name)
        return web.json_response({"model_path": path, "tokenizer_path": path, "is_generation": True,
                                  "preferred_sampling_params": None, "weight_version": "default",
                                  "has_image_understanding": False, "has_audio_understanding": False,
                                  "max_context_tokens": self.limits.max_context_tokens})

    async def health(self, request: web.Request) -> web.Response:
        if self.worker is None or not self.worker.alive():
            return _error(503, "the engine thread is not running")
        if self.closing:
            return _error(503, "the server is shutting down")
        return web.Response(text="")

    async def health_generate(self, request: web.Request) -> web.Response:
        """SGLang's /health_generate: the engine generates one token within 20 s."""
        req = GenRequest([0], {"max_new_tokens": 1, "temperature": 0.0, "top_p": 1.0, "stop_token_ids": (),
                               "seed": None}, "health-" + uuid.uuid4().hex, True)
        try:
            await asyncio.wait_for(self._run_to_end(self._submit(req)), 20.0)
        except (TimeoutError, BadRequest) as exc:
            return _error(503, f"the engine did not generate: {exc or 'timed out'}")
        return web.Response(text="")

    async def flush_cache(self, request: web.Request) -> web.Response:
        # No prefix cache: a finished request's KV blocks are freed at once, so there is nothing to flush.
        return web.Response(text="Cache flushed (this server keeps no prefix cache).\n")

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.model_name, "object": "model", "created": int(self.started_s), "owned_by": "echo",
                "root": str(self.info.get("model_path", self.model_name)), "parent": None,
                "max_model_len": self.limits.max_context_tokens, "permission": []}
        return web.json_response({"object": "list", "data": [card]})

    async def prometheus(self, request: web.Request) -> web.Response:
        from echo_exec.metrics_prom import CONTENT_TYPE

        body = self.metrics.render(await self._engine_stats(), inflight=len(self.inflight))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _accept_length(stats: dict) -> float | None:
    """The engine's average accept length, whatever the exact key its stats() uses."""
    for key in ("avg_accept_length", "mean_accept_length", "accept_length", "avg_spec_accept_length", "mat"):
        v = stats.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    for key, v in stats.items():
        if "accept_len" in key and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _jsonable(obj):
    """stats() values made JSON-safe (numpy scalars, dataclasses, tuples)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        try:
            return obj.item()
        except (ValueError, TypeError):
            pass
    return str(obj)


# ----------------------------------------------------------------------------------------------------------
# Running it.


def access_logger() -> logging.Logger:
    """One line per request on stderr: client, request line, status, bytes, seconds."""
    log = logging.getLogger("echosim.access")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


async def serve_forever(server: EchoServer, host: str, port: int, *, ready: Callable[[int], None] | None = None,
                        stop: asyncio.Event | None = None, grace_s: float = 5.0, sock=None,
                        access_log: bool = False) -> None:
    """Serve until `stop` is set (or forever). `ready(port)` is called once listening (port 0 = any free port);
    `sock`, a socket already bound, is listened on instead of host:port. On stop: new requests get a 503, those in
    flight get `grace_s` to finish, then the rest get a 503."""
    runner = web.AppRunner(server.app, handler_cancellation=True, shutdown_timeout=1.0,
                           access_log=access_logger() if access_log else None, access_log_format=ACCESS_LOG_FORMAT)
    await runner.setup()
    site = web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
        await server.shutdown(grace_s)
    finally:
        await runner.cleanup()


class ServerThread:
    """An EchoServer on its own event loop in a background thread (tests, notebooks): `.port`, `.url`, `.stop()`."""

    def __init__(self, server: EchoServer, host: str = "127.0.0.1", port: int = 0, grace_s: float = 5.0):
        self.server, self.host = server, host
        self.port = 0
        self.grace_s = grace_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, args=(port,), name="echo-http", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the server did not start in 30 s")
        if self._error is not None:
            raise self._error

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self, port: int) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(p):
                self.port = p
                self._ready.set()
            await serve_forever(self.server, self.host, port, ready=ready, stop=self._stop, grace_s=self.grace_s)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the constructor when startup fails
            self._error = exc
            self._ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10 + self.grace_s)
