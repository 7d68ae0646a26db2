"""HTTP server for the echo engine: SGLang's native `/generate`, the OpenAI-compatible `/v1/completions`,
`/server_info` (alias `/get_server_info`) and `/health`, on aiohttp.

Threading: the engine is not thread-safe, so it lives in one dedicated thread (`EngineWorker`). The asyncio side
only puts commands (add / abort / stats) in the worker's inbox; the worker drains the inbox, calls `engine.step()`
while there is work and otherwise sleeps on an event, and hands tokens and results back to the event loop with
`loop.call_soon_threadsafe`, once per iteration for all requests. Each request owns an `asyncio.Queue` of events
("tokens" for streamed requests only, then "done" or "error").

Protocol notes (matching SGLang so that the replay client works against both):
- `/generate` takes `text` (str or list of str) or `input_ids` (list of int or list of lists), `sampling_params`
  (max_new_tokens, temperature, top_p, stop_token_ids, ignore_eos, sampling_seed), `stream`, `rid`. Like
  SGLang, generation stops at the model's EOS unless `ignore_eos` is true. The response is `text`, `output_ids`
  and `meta_info` (id, finish_reason {"type": "length", "length": n} / {"type": "stop", "matched": id},
  prompt_tokens, completion_tokens, cached_tokens, e2e_latency, spec_verify_ct, spec_accept_length =
  completion_tokens / spec_verify_ct, spec_num_correct_drafts). Streaming sends server-sent events `data: {...}`
  whose `text` and `output_ids` are cumulative (SGLang's default), then `data: [DONE]`.
- `/v1/completions`: prompt (str or list of int), max_tokens (default 16), temperature (default 1), top_p, n=1,
  seed, stream (deltas, then `data: [DONE]`), stream_options.include_usage; a `usage` block.
- Errors are JSON `{"error": {"message": ..., "type": ..., "code": status}}` with a 4xx status for bad requests
  and 500 for engine failures; either way the server keeps serving.
- A client that disconnects has its request aborted in the engine (aiohttp handler cancellation is on).
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import dataclasses
import json
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}


class BadRequest(Exception):
    """A client mistake: answered with a 4xx and a message, never raised past the handler."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


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


@dataclass
class Handle:
    """One request as the asyncio side sees it: events arrive on `queue`."""

    request_id: str
    prompt_ids: list[int]
    queue: asyncio.Queue
    stream: bool = False      # token events wanted (streaming); otherwise only the final result
    created_s: float = field(default_factory=time.perf_counter)


class EngineWorker:
    """Runs `engine` in a dedicated thread. Commands go through `_inbox`; results come back on the event loop."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, *, idle_wait_s: float = 0.5):
        self.engine = engine
        self.loop = loop
        self.idle_wait_s = idle_wait_s
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
            elif kind == "stats":
                fut = cmd[1]
                try:
                    stats = dict(self.engine.stats())
                except Exception as exc:  # a stats bug must not stop the engine
                    stats = {"error": f"{type(exc).__name__}: {exc}"}
                self._post(_resolve, fut, stats)

    def _add(self, handle: Handle, prompt_ids: list[int], params, ignore_eos: bool) -> None:
        def on_tokens(_out, new_ids, h=handle):
            self._emit(h, ("tokens", [int(t) for t in new_ids]))

        callback = on_tokens if handle.stream else None  # a plain request only needs its result

        params.ignore_eos = ignore_eos
        try:
            self.engine.add_request(prompt_ids, params, request_id=handle.request_id, on_tokens=callback)
        except Exception as exc:  # the engine refused the request (too long, out of capacity...): a 400
            self._emit(handle, ("error", 400, f"{exc}"))
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
            result = Result(out.request_id, [int(t) for t in out.output_ids], out.finish_reason,
                            int(out.spec_verify_ct or 0), int(out.accepted_drafts or 0))
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
# Request parsing and validation.


@dataclass
class GenRequest:
    prompt_ids: list[int]
    sampling: dict            # keyword arguments of SamplingParams
    request_id: str
    ignore_eos: bool = False  # SGLang's flag: do not stop at the model's EOS


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(name: str, value, *, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{name}' must be a number, got {json.dumps(value)}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise BadRequest(f"'{name}' must be finite, got {value}")
    if low is not None and (v <= low if low_open else v < low):
        raise BadRequest(f"'{name}' must be {'>' if low_open else '>='} {low:g}, got {value}")
    if high is not None and v > high:
        raise BadRequest(f"'{name}' must be <= {high:g}, got {value}")
    return v


def _int(name: str, value, *, low: int) -> int:
    if not _is_int(value):
        raise BadRequest(f"'{name}' must be an integer, got {json.dumps(value)}")
    if value < low:
        raise BadRequest(f"'{name}' must be >= {low}, got {value}")
    return value


def _check_keys(obj: dict, allowed: set[str], what: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise BadRequest(f"unknown {what} field(s): {', '.join(unknown)}; supported: {', '.join(sorted(allowed))}")


@dataclass
class Limits:
    vocab_size: int
    max_context_tokens: int    # prompt + new tokens must fit (positions and KV capacity)


class Validator:
    def __init__(self, limits: Limits, encode: Callable[[str], list[int]]):
        self.limits = limits
        self.encode = encode

    def prompt_ids(self, text, input_ids, where: str) -> list[int]:
        if (text is None) == (input_ids is None):
            raise BadRequest(f"{where}: give exactly one of 'text' and 'input_ids'")
        if text is not None:
            if not isinstance(text, str):
                raise BadRequest(f"{where}: 'text' must be a string")
            ids = self.encode(text)
        else:
            if not isinstance(input_ids, list) or not all(_is_int(t) for t in input_ids):
                raise BadRequest(f"{where}: 'input_ids' must be a list of integers")
            bad = [t for t in input_ids if not 0 <= t < self.limits.vocab_size]
            if bad:
                raise BadRequest(f"{where}: token id {bad[0]} is outside the vocabulary "
                                 f"(0..{self.limits.vocab_size - 1})")
            ids = list(input_ids)
        if not ids:
            raise BadRequest(f"{where}: the prompt is empty")
        return ids

    def sampling(self, *, max_new_tokens, temperature, top_p, stop_token_ids, ignore_eos, seed) -> tuple[dict, bool]:
        """(SamplingParams keyword arguments, ignore_eos)."""
        max_new = _int("max_new_tokens", max_new_tokens, low=0)
        temp = _number("temperature", temperature, low=0.0)
        p = _number("top_p", top_p, low=0.0, high=1.0, low_open=True)
        if stop_token_ids is None:
            stop_token_ids = []
        if not isinstance(stop_token_ids, list) or not all(_is_int(t) for t in stop_token_ids):
            raise BadRequest("'stop_token_ids' must be a list of integers")
        bad = [t for t in stop_token_ids if not 0 <= t < self.limits.vocab_size]
        if bad:
            raise BadRequest(f"'stop_token_ids': token id {bad[0]} is outside the vocabulary")
        if not isinstance(ignore_eos, bool):
            raise BadRequest("'ignore_eos' must be true or false")
        if seed is not None:
            seed = _int("seed", seed, low=0)
        return dict(max_new_tokens=max_new, temperature=temp, top_p=p,
                    stop_token_ids=tuple(dict.fromkeys(stop_token_ids)), seed=seed), ignore_eos

    def fits(self, ids: list[int], max_new_tokens: int, where: str) -> None:
        need = len(ids) + max_new_tokens
        if need > self.limits.max_context_tokens:
            raise BadRequest(f"{where}: the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) is "
                             f"{need} tokens, more than this server's context of {self.limits.max_context_tokens}")


GENERATE_FIELDS = {"text", "input_ids", "sampling_params", "stream", "rid", "return_logprob", "return_text_in_logprobs",
                   "logprob_start_len", "top_logprobs_num"}
SAMPLING_FIELDS = {"max_new_tokens", "temperature", "top_p", "stop_token_ids", "ignore_eos", "sampling_seed",
                   "skip_special_tokens", "no_stop_trim"}
COMPLETIONS_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "seed",
                      "stop", "echo", "logprobs", "user", "ignore_eos", "stop_token_ids"}


# ----------------------------------------------------------------------------------------------------------
# The HTTP application.


def _error(status: int, message: str) -> web.Response:
    kind = "BadRequestError" if status < 500 else "InternalServerError"
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


class EchoServer:
    """The aiohttp application around one engine. `info` is what /server_info reports (model, policy...)."""

    def __init__(self, engine, *, make_params: Callable[..., Any], limits: Limits, info: dict | None = None,
                 encode: Callable[[str], list[int]] | None = None):
        self.engine = engine
        self.make_params = make_params
        self.info = dict(info or {})
        self.validator = Validator(limits, encode or (lambda s: list(s.encode("utf-8"))))
        self.worker: EngineWorker | None = None
        self.inflight: dict[str, Handle] = {}
        self.started_s = time.time()
        self.app = web.Application()
        self.app.add_routes([
            web.post("/generate", self.generate),
            web.post("/v1/completions", self.completions),
            web.get("/server_info", self.server_info),
            web.get("/get_server_info", self.server_info),
            web.get("/health", self.health),
            web.get("/v1/models", self.models),
        ])
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)

    async def _on_startup(self, _app) -> None:
        self.worker = EngineWorker(self.engine, asyncio.get_running_loop())
        self.worker.start()

    async def _on_cleanup(self, _app) -> None:
        if self.worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)

    # -- helpers -------------------------------------------------------------------------------------------
    async def _json(self, request: web.Request) -> Any:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest("request body too large", status=413) from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None

    def _submit(self, req: GenRequest, stream: bool = False) -> Handle:
        if req.request_id in self.inflight:
            raise BadRequest(f"request id {req.request_id!r} is already in flight")
        if self.worker is None or not self.worker.alive():
            raise BadRequest("the engine is not running", status=503)
        handle = Handle(req.request_id, req.prompt_ids, asyncio.Queue(), stream)
        self.inflight[req.request_id] = handle
        self.worker.add(handle, req.prompt_ids, self.make_params(**req.sampling), req.ignore_eos)
        return handle

    def _release(self, handle: Handle, finished: bool) -> None:
        self.inflight.pop(handle.request_id, None)
        if not finished and self.worker is not None:
            self.worker.abort(handle.request_id)  # client gone or error: free the engine's slot

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

    def _meta(self, handle: Handle, req: GenRequest, ids: list[int], result: Result | None) -> dict:
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
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        _check_keys(body, GENERATE_FIELDS, "request")
        if body.get("return_logprob"):
            raise BadRequest("'return_logprob' is not supported by this server")
        sp = body.get("sampling_params")
        sp = {} if sp is None else sp
        if not isinstance(sp, dict):
            raise BadRequest("'sampling_params' must be an object")
        _check_keys(sp, SAMPLING_FIELDS, "sampling_params")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false")
        sampling, ignore_eos = self.validator.sampling(
            max_new_tokens=sp.get("max_new_tokens", 128), temperature=sp.get("temperature", 1.0),
            top_p=sp.get("top_p", 1.0), stop_token_ids=sp.get("stop_token_ids"),
            ignore_eos=sp.get("ignore_eos", False), seed=sp.get("sampling_seed"))
        text, input_ids = body.get("text"), body.get("input_ids")
        batch = isinstance(text, list) or (isinstance(input_ids, list) and input_ids
                                           and isinstance(input_ids[0], list))
        if batch:
            items = text if text is not None else input_ids
            if not items:
                raise BadRequest("the batch is empty")
            prompts = [self.validator.prompt_ids(t if text is not None else None,
                                                 t if input_ids is not None else None, f"prompt {i}")
                       for i, t in enumerate(items)]
            if stream:
                raise BadRequest("streaming a batch is not supported; send one request per prompt")
        else:
            prompts = [self.validator.prompt_ids(text, input_ids, "prompt")]
        rid = body.get("rid")
        if rid is not None and (batch or not isinstance(rid, str) or not rid):
            raise BadRequest("'rid' must be a non-empty string (single requests only)")
        reqs = []
        for i, ids in enumerate(prompts):
            self.validator.fits(ids, sampling["max_new_tokens"], f"prompt {i}" if batch else "prompt")
            reqs.append(GenRequest(ids, sampling, rid or uuid.uuid4().hex, ignore_eos))
        return reqs, stream, batch

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            reqs, stream, batch = self._parse_generate(await self._json(request))
            if stream:
                return await self._generate_stream(request, reqs[0])
            results = await asyncio.gather(*(self._generate_one(r) for r in reqs))
        except BadRequest as exc:
            return _error(exc.status, str(exc))
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
                "meta_info": self._meta(handle, req, ids, result)}

    async def _generate_stream(self, request: web.Request, req: GenRequest) -> web.StreamResponse:
        if req.sampling["max_new_tokens"] == 0:
            raise BadRequest("'max_new_tokens' must be >= 1 when streaming")
        handle = self._submit(req, stream=True)
        text = ""

        def chunks(ids, new, delta, result):  # SGLang streams the whole text so far, every time
            nonlocal text
            text += delta
            if new or result is not None:
                yield {"text": text, "output_ids": ids, "meta_info": self._meta(handle, req, ids, result)}

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

    # -- /v1/completions -----------------------------------------------------------------------------------
    def _parse_completions(self, body) -> tuple[GenRequest, bool, bool, str]:
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        _check_keys(body, COMPLETIONS_FIELDS, "request")
        n = body.get("n", 1)
        if n != 1:
            raise BadRequest("only 'n' = 1 is supported")
        if body.get("echo"):
            raise BadRequest("'echo' is not supported")
        if body.get("logprobs") is not None:
            raise BadRequest("'logprobs' is not supported")
        if body.get("stop") not in (None, [], ""):
            raise BadRequest("'stop' strings are not supported; use 'stop_token_ids'")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false")
        opts = body.get("stream_options")
        opts = {} if opts is None else opts
        if not isinstance(opts, dict):
            raise BadRequest("'stream_options' must be an object")
        include_usage = bool(opts.get("include_usage", False))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]   # a batch of one
        if isinstance(prompt, str):
            ids = self.validator.prompt_ids(prompt, None, "prompt")
        elif isinstance(prompt, list):
            ids = self.validator.prompt_ids(None, prompt, "prompt")
        else:
            raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)")
        sampling, ignore_eos = self.validator.sampling(
            max_new_tokens=body.get("max_tokens", 16), temperature=body.get("temperature", 1.0),
            top_p=body.get("top_p", 1.0), stop_token_ids=body.get("stop_token_ids"),
            ignore_eos=body.get("ignore_eos", False), seed=body.get("seed"))
        if sampling["max_new_tokens"] < 1:
            raise BadRequest("'max_tokens' must be >= 1")
        self.validator.fits(ids, sampling["max_new_tokens"], "prompt")
        model = body.get("model") or self.info.get("model", "echo")
        return GenRequest(ids, sampling, "cmpl-" + uuid.uuid4().hex, ignore_eos), stream, include_usage, str(model)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            req, stream, include_usage, model = self._parse_completions(await self._json(request))
            if stream:
                return await self._completions_stream(request, req, include_usage, model)
            handle = self._submit(req)
            result = await self._run_to_end(handle)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        ids = result.output_ids
        finish = _finish_reason(result.finish_reason, ids)
        return web.json_response({
            "id": req.request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": _byte_text(ids).decode("utf-8", errors="replace"), "logprobs": None,
                         "finish_reason": finish["type"] if finish else None}],
            "usage": {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(ids),
                      "total_tokens": len(req.prompt_ids) + len(ids)},
        })

    async def _completions_stream(self, request, req: GenRequest, include_usage: bool, model: str):
        handle = self._submit(req, stream=True)
        created = int(time.time())

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": req.request_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        def chunks(ids, new, delta, result):  # OpenAI streams text deltas, then usage if asked
            if result is None:
                if delta:
                    yield chunk(delta, None)
                return
            fr = _finish_reason(result.finish_reason, ids)
            yield chunk(delta, fr["type"] if fr else None)
            if include_usage:
                usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(ids),
                         "total_tokens": len(req.prompt_ids) + len(ids)}
                yield {**chunk("", None), "choices": [], "usage": usage}

        return await self._stream(request, handle, chunks)

    # -- info ----------------------------------------------------------------------------------------------
    async def server_info(self, request: web.Request) -> web.Response:
        w = self.worker
        engine_stats = await w.stats() if w is not None and w.alive() else {}
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
        return web.json_response({**self.info, "avg_spec_accept_length": accept, "uptime_s": time.time() -
                                  self.started_s, "internal_states": [state]})

    async def health(self, request: web.Request) -> web.Response:
        if self.worker is None or not self.worker.alive():
            return _error(503, "the engine thread is not running")
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        name = self.info.get("model", "echo")
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "echo"}]})


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


async def serve_forever(server: EchoServer, host: str, port: int, *, ready: Callable[[int], None] | None = None,
                        stop: asyncio.Event | None = None, grace_s: float = 5.0) -> None:
    """Serve until `stop` is set (or forever). `ready(port)` is called once listening (port 0 = any free port).
    On stop: no new connections, requests in flight get `grace_s` to finish, then the rest get a 503."""
    runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None, shutdown_timeout=grace_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await runner.cleanup()


class ServerThread:
    """An EchoServer on its own event loop in a background thread (tests, notebooks): `.port`, `.url`, `.stop()`."""

    def __init__(self, server: EchoServer, host: str = "127.0.0.1", port: int = 0):
        self.server, self.host = server, host
        self.port = 0
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
            await serve_forever(self.server, self.host, port, ready=ready, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the constructor when startup fails
            self._error = exc
            self._ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
