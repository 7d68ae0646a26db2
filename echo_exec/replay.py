"""Replay a request trace against an HTTP server (ours, `echosim serve`, a live SGLang or vLLM server, any
OpenAI-compatible one): each request is sent at its arrival time, streamed, and timed; the result is the per-request
CSV and summary JSON of the simulator, with bench_serving's key names beside ours.

- Backends: `sglang` (SGLang's native `/generate`), `openai` (`/v1/completions`), `openai-chat`
  (`/v1/chat/completions`, the prompt as one user message: the server's chat template adds its own tokens).
- Arrivals can be redrawn as bench_serving does: `request_rate` requests/s (inf = all at once), gaps drawn from a
  gamma distribution of shape `burstiness` (1 = Poisson), seeded.
- With a tokenizer (a Hugging Face tokenizer directory or tokenizer.json), prompts are built to the trace's exact
  token counts in that tokenizer, or sent as token ids (`prompt_mode="ids"`: SGLang's input_ids, OpenAI's list of
  ids). Without one, lengths are UTF-8 bytes (the byte-level tiny models' tokens), as below.

- Arrivals: `traces` reads the trace (any supported format). Times are multiplied by `time_scale` (0.5 = twice the
  rate). With `concurrency`, at most that many requests are in flight: a request whose time has come waits for a
  free slot, in trace order, and its `arrival_s` is when it is sent (latencies count from there); `scheduled_s`
  keeps the trace's time.
- Prompts: the trace's text when it has some; otherwise a prompt of exactly the trace's prompt length in bytes is
  cut from a prompt set (default: Spec-Bench's 480 prompts, shipped as echo_exec/prompts/spec_bench.jsonl.gz).
  Bytes are tokens for our byte-level model, so lengths are exact against `echosim serve`, and against a live
  SGLang server serving the shipped models (their tokenizer.json is the same byte tokenizer). Against a server
  with a subword tokenizer the same text is fewer tokens (a subword token spans several bytes): the CSV's
  `prompt_tokens` is the count the server reports (meta_info.prompt_tokens), `target_prompt_tokens` the trace's.
- Lengths: `max_new_tokens` = the trace's output length with `ignore_eos`, so each request produces exactly that
  many tokens (both servers honour ignore_eos). Only /generate fields that SGLang has are sent.
- Timing: `first_token_s` is when the first streamed chunk with at least one token arrives; `finish_s` when the
  final chunk does; times are seconds from the start of the replay. Every chunk's arrival is kept: inter-token
  latency (ITL, bench_serving's definition: the gaps between chunks) and a timeline (chunks.csv).
- Outputs: requests.csv with the simulator's per-request columns (echosim/metrics.py: ttft_ms, tpot_ms,
  e2e_ms, steps = spec_verify_ct, accepted, mat...) then the replay's own (scheduled_s, target lengths,
  finish_reason, ok, error); summary.json with the simulator's summary keys and definitions, computed over the
  requests that succeeded (per-iteration quantities a client cannot see, such as mean_batch, are null);
  config.json with the replay's settings.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from echo_exec.errors import ExecError

PACKAGE_DIR = Path(__file__).resolve().parent
SPEC_BENCH_PROMPTS = PACKAGE_DIR / "prompts" / "spec_bench.jsonl.gz"  # Spec-Bench, Apache-2.0 (prompts/NOTICE.md)
SHIPPED_PROMPTS = PACKAGE_DIR / "replay_prompts.jsonl"


# ----------------------------------------------------------------------------------------------------------
# Prompts.


def default_prompt_set() -> Path:
    return SPEC_BENCH_PROMPTS


def _first_text(obj: dict) -> str | None:
    for key in ("prompt", "text", "question", "turns", "instruction", "input"):
        v = obj.get(key)
        if isinstance(v, list):
            v = next((t for t in v if isinstance(t, str) and t.strip()), None)
        if isinstance(v, str) and v.strip():
            return v
    return None


def load_prompts(path: str | Path) -> list[str]:
    """Prompt texts from a JSONL file (the first of prompt / text / question / turns[0] / instruction / input of
    each line; .gz allowed) or a plain text file (one prompt per non-empty line)."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ExecError(f"cannot read the prompt set: {exc.strerror or exc}", path=str(p)) from None
    except UnicodeDecodeError:
        raise ExecError("the prompt set is not UTF-8 text", path=str(p)) from None
    stem = p.name.removesuffix(".gz")
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if stem.endswith((".jsonl", ".json", ".ndjson")):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ExecError(f"not valid JSON: {exc.msg}", path=str(p), line=n) from None
            text = _first_text(obj) if isinstance(obj, dict) else None
            if text is None:
                raise ExecError("no prompt text (prompt, text, question, turns, instruction or input)",
                                path=str(p), line=n)
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise ExecError("the prompt set has no prompts", path=str(p))
    return prompts


class PromptSynth:
    """Prompts of an exact length in UTF-8 bytes (= tokens of the byte-level model), cut from a prompt set.

    Request i starts at prompt i (mod the set size) and continues through the next ones, separated by a blank line,
    until it has enough bytes; a character cut in half is dropped and the gap padded with spaces."""

    def __init__(self, prompts: list[str]):
        self.prompts = [t.encode("utf-8") for t in prompts]
        self.total = sum(len(b) + 2 for b in self.prompts)

    def make(self, n_bytes: int, index: int) -> str:
        parts, have, k = [], 0, index % len(self.prompts)
        while have < n_bytes:
            b = self.prompts[k] + b"\n\n"
            parts.append(b)
            have += len(b)
            k = (k + 1) % len(self.prompts)
        text = b"".join(parts)[:n_bytes].decode("utf-8", errors="ignore")
        return text + " " * (n_bytes - len(text.encode("utf-8")))


class HFTokenizer:
    """A Hugging Face tokenizer (tokenizer.json, via `tokenizers`): ids without special tokens, as servers count
    a prompt's own tokens."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        try:
            self.tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # missing file, not a tokenizer: one line
            raise ExecError(f"cannot load the tokenizer: {exc}", path=str(file)) from None
        self.path = str(p)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class TokenPromptSynth:
    """Prompts of an exact length in a tokenizer's tokens: text from the prompt set, cut at a token boundary, and
    checked by encoding it again (a cut can merge differently); `ids` is the token list itself."""

    def __init__(self, prompts: list[str], tokenizer: HFTokenizer):
        self.tok = tokenizer
        self.ids = [tokenizer.encode(t + "\n\n") for t in prompts]
        self.ids = [x for x in self.ids if x]
        if not self.ids:
            raise ExecError("the prompt set encodes to no tokens")

    def token_ids(self, n: int, index: int) -> list[int]:
        out, k = [], index % len(self.ids)
        while len(out) < n:
            out.extend(self.ids[k])
            k = (k + 1) % len(self.ids)
        return out[:n]

    def make(self, n: int, index: int) -> tuple[str, list[int], bool]:
        """(text, ids, exact): text that encodes to exactly n tokens when one exists near the cut."""
        ids = self.token_ids(n + 16, index)
        for m in [n, *[n + d for k in range(1, 9) for d in (-k, k)]]:
            if m < 1:
                continue
            text = self.tok.decode(ids[:m])
            if len(self.tok.encode(text)) == n:
                return text, self.tok.encode(text), True
        return self.tok.decode(ids[:n]), ids[:n], False


def redraw_arrivals(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """bench_serving's arrivals: gaps from a gamma of shape `burstiness` and mean 1 / request_rate (inf: all at 0).
    The first request is sent at 0."""
    if not request_rate > 0:
        raise ExecError(f"the request rate must be positive (inf = all at once), got {request_rate}")
    if not burstiness > 0 or not math.isfinite(burstiness):
        raise ExecError(f"the burstiness must be a positive number, got {burstiness}")
    if math.isinf(request_rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (request_rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


# ----------------------------------------------------------------------------------------------------------
# The replay plan and its records.


@dataclass
class ReplayItem:
    index: int
    request_id: str
    scheduled_s: float          # trace arrival x time scale
    prompt: str
    target_prompt_tokens: int   # the trace's lengths (after any clipping)
    target_output_tokens: int
    dataset: str | None = None
    prompt_ids: list[int] | None = None   # sent instead of the text in prompt_mode "ids"


@dataclass
class RequestRecord:
    """One replayed request. Times are seconds from the start of the replay; NaN when unknown."""

    index: int                   # position in the trace
    request_id: str
    arrival_s: float             # when the request was sent
    first_token_s: float
    finish_s: float
    prompt_tokens: int           # as the server counted them (meta_info.prompt_tokens)
    output_tokens: int           # tokens received (meta_info.completion_tokens)
    steps: int                   # verify steps (meta_info.spec_verify_ct); 0 when the server does not say
    accepted: int                # accepted draft tokens (spec_num_correct_drafts, else output_tokens - steps)
    finish_reason: str
    scheduled_s: float
    target_prompt_tokens: int
    target_output_tokens: int
    dataset: str
    ok: bool
    error: str
    chunk_s: list[float] = field(default_factory=list)  # arrival of each streamed chunk with tokens

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies: the gaps between chunks (bench_serving's definition)."""
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:], strict=False)]

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        if self.output_tokens < 2:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


# The simulator's per-request columns (echosim/metrics.py), then the replay's own. Unknown cells are empty:
# the server does not report verified drafts or preemptions per request.
EXTRA_COLUMNS = ("scheduled_s", "target_prompt_tokens", "target_output_tokens", "finish_reason", "dataset", "ok",
                 "error")


def _csv_row(r: RequestRecord) -> dict:
    def f(x, digits):
        return "" if not math.isfinite(x) else f"{x:.{digits}f}"

    mat = (r.accepted + r.steps) / r.steps if r.steps else float("nan")
    return {"request": r.index, "id": r.request_id, "replica": 0, "arrival_s": f(r.arrival_s, 6),
            "first_token_s": f(r.first_token_s, 6), "finish_s": f(r.finish_s, 6), "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens, "ttft_ms": f(r.ttft_s * 1e3, 3), "tpot_ms": f(r.tpot_s * 1e3, 3),
            "e2e_ms": f(r.e2e_s * 1e3, 3), "steps": r.steps, "accepted": r.accepted, "verified_drafts": "",
            "mat": f(mat, 4), "preemptions": "", "scheduled_s": f(r.scheduled_s, 6),
            "target_prompt_tokens": r.target_prompt_tokens, "target_output_tokens": r.target_output_tokens,
            "finish_reason": r.finish_reason, "dataset": r.dataset, "ok": r.ok, "error": r.error}


def plan_from_trace(trace_path: str | Path, *, time_scale: float = 1.0, limit: int | None = None,
                    prompt_set: str | Path | None = None, max_prompt_tokens: int | None = None,
                    max_output_tokens: int | None = None, tokenizer: HFTokenizer | None = None,
                    prompt_mode: str = "text", request_rate: float | None = None, burstiness: float = 1.0,
                    seed: int = 0) -> list[ReplayItem]:
    """The requests to send, in arrival order, with their prompts. `request_rate` redraws the arrivals
    (bench_serving's process) instead of the trace's; `tokenizer` sizes prompts in its tokens."""
    import traces

    if prompt_mode not in ("text", "ids"):
        raise ExecError(f"the prompt mode must be text or ids, got {prompt_mode!r}")
    if prompt_mode == "ids" and tokenizer is None:
        raise ExecError("sending token ids needs a tokenizer")

    if not time_scale > 0 or not math.isfinite(time_scale):
        raise ExecError(f"the time scale must be a positive number, got {time_scale}")
    for name, v in (("limit", limit), ("max_prompt_tokens", max_prompt_tokens),
                    ("max_output_tokens", max_output_tokens)):
        if v is not None and v < 1:
            raise ExecError(f"{name} must be >= 1, got {v}")
    arr = traces.read_arrays(traces.resolve_trace(str(trace_path)))
    n = len(arr) if limit is None else min(limit, len(arr))
    if n == 0:
        raise ExecError("the trace has no requests", path=str(trace_path))
    t0 = float(arr.arrival_s[0])
    arrivals = (arr.arrival_s[:n] - t0) * time_scale if request_rate is None else \
        redraw_arrivals(n, request_rate, burstiness, seed)
    synth = None
    items = []
    for i in range(n):
        p_len, o_len = int(arr.prompt_tokens[i]), int(arr.output_tokens[i])
        if max_prompt_tokens is not None:
            p_len = min(p_len, max_prompt_tokens)
        if max_output_tokens is not None:
            o_len = min(o_len, max_output_tokens)
        text = arr.prompt[i] if arr.prompt is not None else None
        ids = None
        if text and tokenizer is not None and prompt_mode == "ids":
            ids = tokenizer.encode(text)
        elif not text:
            if synth is None:
                prompts = load_prompts(prompt_set or default_prompt_set())
                synth = TokenPromptSynth(prompts, tokenizer) if tokenizer is not None else PromptSynth(prompts)
            if tokenizer is not None:
                text, ids, _exact = synth.make(p_len, i)
                if prompt_mode == "text":
                    ids = None
            else:
                text = synth.make(p_len, i)
        rid = arr.id[i] if arr.id is not None and arr.id[i] is not None else str(i)
        dataset = arr.dataset[i] if arr.dataset is not None else None
        items.append(ReplayItem(i, str(rid), float(arrivals[i]), text, p_len, o_len, dataset, ids))
    return items


# ----------------------------------------------------------------------------------------------------------
# Sending.


def _sse_events(buffer: bytearray) -> Iterable[bytes]:
    """Complete `data:` payloads from the front of `buffer` (consumed); a partial event stays in it."""
    while True:
        cut = buffer.find(b"\n\n")
        if cut < 0:
            return
        event = bytes(buffer[:cut])
        del buffer[:cut + 2]
        for line in event.split(b"\n"):
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                yield line[5:].strip()


def _reason(fr) -> str:
    if isinstance(fr, dict):
        return str(fr.get("type", ""))
    return "" if fr is None else str(fr)


BACKENDS = {"sglang": "/generate", "openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def request_body(backend: str, item: ReplayItem, *, temperature: float, stream: bool, model: str | None) -> dict:
    """What each backend is sent: the prompt (text, or token ids where the API takes them), exactly the trace's
    output length (ignore_eos: SGLang, vLLM and our server honour it), greedy by default."""
    if backend == "sglang":
        prompt = {"input_ids": item.prompt_ids} if item.prompt_ids is not None else {"text": item.prompt}
        return {**prompt, "stream": stream, "sampling_params": {
            "max_new_tokens": item.target_output_tokens, "temperature": temperature, "ignore_eos": True}}
    body: dict = {"model": model, "temperature": temperature, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if backend == "openai":
        body.update(prompt=item.prompt_ids if item.prompt_ids is not None else item.prompt,
                    max_tokens=item.target_output_tokens)
    elif backend == "openai-chat":
        body.update(messages=[{"role": "user", "content": item.prompt}],
                    max_completion_tokens=item.target_output_tokens)
    else:
        raise ExecError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    return body


def _delta_text(obj: dict) -> str:
    """The text of an OpenAI stream chunk (completions: choices[0].text; chat: choices[0].delta.content)."""
    choices = obj.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


async def send_one(session, url: str, item: ReplayItem, *, t0: float, temperature: float = 0.0,
                   stream: bool = True, backend: str = "sglang", model: str | None = None) -> RequestRecord:
    """POST one request and time it, chunk by chunk. Failures become a record with ok=False and the error, never an
    exception."""
    body = request_body(backend, item, temperature=temperature, stream=stream, model=model)
    nan = float("nan")
    rec = RequestRecord(item.index, item.request_id, time.perf_counter() - t0, nan, nan, 0, 0, 0, 0, "",
                        item.scheduled_s, item.target_prompt_tokens, item.target_output_tokens, item.dataset or "",
                        False, "")
    meta: dict = {}
    usage: dict = {}
    finish = None
    chunks_with_tokens = 0
    try:
        async with session.post(url.rstrip("/") + BACKENDS[backend], json=body) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                rec.error = f"HTTP {resp.status}: {text}"
                return rec
            if stream:
                buffer = bytearray()
                done = False
                async for chunk in resp.content.iter_any():
                    buffer.extend(chunk)
                    for payload in _sse_events(buffer):
                        if payload == b"[DONE]":
                            done = True
                            continue
                        obj = json.loads(payload)
                        if "error" in obj:
                            raise RuntimeError(f"server error: {obj['error']}")
                        now = time.perf_counter() - t0
                        if backend == "sglang":
                            meta = obj.get("meta_info") or {}
                            got = meta.get("completion_tokens", len(obj.get("output_ids") or []))
                            new = got > chunks_with_tokens
                            chunks_with_tokens = max(chunks_with_tokens, got)
                        else:
                            usage = obj.get("usage") or usage
                            new = bool(_delta_text(obj))
                            chunks_with_tokens += new
                            for c in obj.get("choices") or []:
                                finish = c.get("finish_reason") or finish
                        if new:
                            rec.chunk_s.append(now)
                if not done:
                    raise RuntimeError("the stream ended without [DONE]")
            else:
                obj = await resp.json()
                meta = obj.get("meta_info") or {} if backend == "sglang" else {}
                usage = obj.get("usage") or {}
                finish = ((obj.get("choices") or [{}])[0]).get("finish_reason")
        rec.finish_s = time.perf_counter() - t0
    except Exception as exc:  # connection refused/reset, bad JSON, timeout: a failed request, not a failed replay
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
        return rec
    if rec.chunk_s:
        rec.first_token_s = rec.chunk_s[0]
    if backend == "sglang":
        rec.prompt_tokens = int(meta.get("prompt_tokens") or 0)
        rec.output_tokens = int(meta.get("completion_tokens") or 0)
        rec.steps = int(meta.get("spec_verify_ct") or 0)
        correct = meta.get("spec_num_correct_drafts", meta.get("spec_accepted_drafts"))
        # without a count of accepted drafts: the prefill gave the first token, each verify step one more plus
        # its drafts
        rec.accepted = int(correct) if correct is not None else max(rec.output_tokens - 1 - rec.steps, 0) \
            if rec.steps else 0
        rec.finish_reason = _reason(meta.get("finish_reason"))
    else:  # OpenAI: the usage block (asked for with stream_options), else one token per chunk
        rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        rec.output_tokens = int(usage.get("completion_tokens") or chunks_with_tokens)
        rec.finish_reason = _reason(finish)
    rec.ok = rec.output_tokens > 0
    if not rec.ok:
        rec.error = "no tokens generated"
    return rec


async def served_model(url: str) -> str | None:
    """The first model /v1/models lists (what OpenAI-compatible servers want in `model`), or None."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(url.rstrip("/") + "/v1/models") as resp:
                data = (await resp.json()).get("data") or []
                return str(data[0]["id"]) if data else None
    except Exception:
        return None


SPEC_COUNTERS = ("vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_drafts_total")


async def spec_counters(session, url: str) -> tuple[float, float] | None:
    """(accepted draft tokens, drafts) from the server's Prometheus /metrics under vLLM's names (vLLM, and
    `echosim serve`), summed over labels; None when it exports none."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with session.get(url.rstrip("/") + "/metrics") as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
        totals = dict.fromkeys(SPEC_COUNTERS, 0.0)
        seen = set()
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
                    seen.add(sample.name)
    except Exception:  # no /metrics, not Prometheus text: the replay just has no server-side MAT
        return None
    return (totals[SPEC_COUNTERS[0]], totals[SPEC_COUNTERS[1]]) if len(seen) == 2 else None


async def replay(url: str, items: list[ReplayItem], *, concurrency: int | None = None, temperature: float = 0.0,
                 stream: bool = True, request_timeout_s: float = 600.0, backend: str = "sglang",
                 model: str | None = None, warmup_requests: int = 0,
                 progress: Callable[[RequestRecord], None] | None = None,
                 server: dict | None = None) -> list[RequestRecord]:
    """Send `items` at their scheduled times (seconds from now); returns one record per item, in item order.
    `warmup_requests` of the first items are sent first, one at a time, and not recorded. `server`, a dict, gets
    the server's speculative-decoding counters over the timed run ("spec_accepted", "spec_drafts") when its
    /metrics has vLLM's: the MAT of a server that reports none per request (vLLM, any OpenAI route)."""
    import aiohttp

    if backend not in BACKENDS:
        raise ExecError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    if concurrency is not None and concurrency < 1:
        raise ExecError(f"the concurrency must be >= 1, got {concurrency}")
    if warmup_requests < 0:
        raise ExecError(f"the warm-up requests must be >= 0, got {warmup_requests}")
    if backend != "sglang" and model is None:
        model = await served_model(url)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    records: list[RequestRecord | None] = [None] * len(items)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=request_timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        for k in range(min(warmup_requests, len(items))):  # a failure shows again in the timed requests
            await send_one(session, url, items[k], t0=time.perf_counter(), temperature=temperature, stream=stream,
                           backend=backend, model=model)
        before = await spec_counters(session, url) if server is not None else None
        t0 = time.perf_counter()
        tasks: set[asyncio.Task] = set()

        async def run(i: int) -> None:
            try:
                rec = await send_one(session, url, items[i], t0=t0, temperature=temperature, stream=stream,
                                     backend=backend, model=model)
            finally:
                if sem is not None:
                    sem.release()
            records[i] = rec
            if progress is not None:
                progress(rec)

        for i, item in enumerate(items):
            delay = t0 + item.scheduled_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is not None:
                await sem.acquire()  # FIFO: later arrivals wait behind this one
            task = asyncio.create_task(run(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))
        after = await spec_counters(session, url) if before is not None else None
        if server is not None and before is not None and after is not None:
            server.update(spec_accepted=after[0] - before[0], spec_drafts=after[1] - before[1])
    return [r for r in records if r is not None]


# ----------------------------------------------------------------------------------------------------------
# Outputs.


# Summary keys of the simulator that a client cannot observe (per-iteration quantities): None in a replay.
UNOBSERVED = ("verification_waste", "mean_batch", "preemptions", "iterations", "verified_tokens", "prefill_tokens",
              "step_ms_mean", "step_split")


def _no_nan(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    return x


def summarize(records: list[RequestRecord], *, slo_ttft_ms: float = 2000.0, slo_tpot_ms: float = 100.0,
              server: dict | None = None) -> dict:
    """The simulator's summary (echosim/metrics.py: same keys, same definitions) over the requests that
    succeeded, plus completed / failed / errors. MAT = (accepted + steps) / steps summed over requests, from the
    server's per-request counts; without them, 1 + accepted / drafts from the server's counters over the run
    (`server`, from replay(); `mat_source` says which), else None (e.g. SGLang without speculation)."""
    from echosim.metrics import Metrics

    ok = [r for r in records if r.ok]
    metrics = Metrics(None, slo_ttft_ms, slo_tpot_ms)
    for r in ok:
        metrics.request(r, r.finish_s, 0)
    metrics.request_steps = sum(r.steps for r in ok)
    metrics.accepted = sum(r.accepted for r in ok)
    s = metrics.summary(preemptions=0)
    for key in UNOBSERVED:
        s[key] = None
    s["mat_source"] = "per-request" if metrics.request_steps else None
    if not metrics.request_steps:
        s["mat"] = None
        if server and server.get("spec_drafts"):
            s["mat"] = round(1.0 + server["spec_accepted"] / server["spec_drafts"], 4)
            s["mat_source"] = "server /metrics (vllm:spec_decode_*)"
    s = _no_nan(s)   # without streaming there is no first token: TTFT / TPOT are None
    itl_ms = np.array([g * 1e3 for r in ok for g in r.itl_s])
    s["itl_ms"] = ({"mean": round(float(itl_ms.mean()), 3),
                    **{f"p{q}": round(float(np.percentile(itl_ms, q)), 3) for q in (50, 90, 99)}}
                   if len(itl_ms) else None)
    s.update({"completed": len(ok), "failed": len(records) - len(ok), "prompt_tokens": sum(r.prompt_tokens for r in ok),
              "slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms,
              "errors": sorted({r.error for r in records if not r.ok})[:5]})
    s["bench_serving"] = bench_serving_keys(ok, s, itl_ms)
    return s


def bench_serving_keys(ok: list[RequestRecord], s: dict, itl_ms: np.ndarray) -> dict:
    """The same run under the key names SGLang's bench_serving and `vllm bench serve` print and save (their
    definitions: duration from the first send to the last finish, request_goodput in requests/s meeting both SLOs,
    ITL the gaps between chunks), so that their users' scripts read our results."""
    def stats(name: str, values) -> dict:
        x = np.asarray([v for v in values if math.isfinite(v)], np.float64)
        if not len(x):
            return {}
        return {f"mean_{name}_ms": round(float(x.mean()), 3), f"median_{name}_ms": round(float(np.median(x)), 3),
                f"std_{name}_ms": round(float(x.std()), 3),
                **{f"p{q}_{name}_ms": round(float(np.percentile(x, q)), 3) for q in (90, 95, 99)}}

    duration = s["makespan_s"] or 0.0
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    good = sum(1 for r in ok if r.ttft_s * 1e3 <= s["slo_ttft_ms"] and r.tpot_s * 1e3 <= s["slo_tpot_ms"])
    keys = {"duration": duration, "completed": len(ok), "total_input_tokens": in_tok,
            "total_output_tokens": out_tok,
            "request_throughput": round(len(ok) / duration, 4) if duration else None,
            "request_goodput": round(good / duration, 4) if duration else None,
            "input_throughput": round(in_tok / duration, 3) if duration else None,
            "output_throughput": round(out_tok / duration, 3) if duration else None,
            "total_token_throughput": round((in_tok + out_tok) / duration, 3) if duration else None,
            "total_throughput": round((in_tok + out_tok) / duration, 3) if duration else None,
            "accept_length": s.get("mat")}
    e2e = [r.e2e_s * 1e3 for r in ok]
    for name, values in (("ttft", [r.ttft_s * 1e3 for r in ok]), ("tpot", [r.tpot_s * 1e3 for r in ok
                                                                            if r.output_tokens > 1]),
                         ("itl", itl_ms), ("e2el", e2e), ("e2e_latency", e2e)):
        keys.update(stats(name, values))
    return keys


def write_outputs(out_dir: str | Path, records: list[RequestRecord], summary: dict, config: dict) -> dict[str, Path]:
    """requests.csv (the simulator's columns, then the replay's), summary.json, config.json and chunks.csv (each
    streamed chunk's arrival: the timeline) in `out_dir`."""
    from echosim.metrics import REQUEST_COLUMNS

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"requests": d / "requests.csv", "summary": d / "summary.json", "config": d / "config.json",
             "chunks": d / "chunks.csv"}
    with open(paths["requests"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*REQUEST_COLUMNS, *EXTRA_COLUMNS])
        w.writeheader()
        for r in records:
            w.writerow(_csv_row(r))
    with open(paths["chunks"], "w", newline="") as f:  # the timeline: every streamed chunk's arrival
        f.write("request,chunk,time_s\n")
        f.write("".join(f"{r.index},{k},{t:.6f}\n" for r in records for k, t in enumerate(r.chunk_s)))
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["config"].write_text(json.dumps(config, indent=2, default=str) + "\n")
    return paths
