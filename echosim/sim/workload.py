"""Where requests come from: trace replay (time-scaled), Poisson / gamma arrivals, or a closed loop at fixed
concurrency. Each is a SimPy process that hands requests to the router. Traces and synthetic workloads are read a
chunk at a time, so a trace of millions of requests never sits in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from echosim.sim.errors import SimError
from traces.request import TraceArrays

CHUNK_ROWS = 16_384


class Request:
    """One request in flight. Plain attributes (slots): created per request, read on admission and at finish."""

    __slots__ = ("index", "id", "arrival_s", "prompt_tokens", "output_tokens", "difficulty", "dataset",
                 "offset", "generated", "first_token_s", "steps", "accepted", "verified", "preemptions",
                 "prefix_keys", "prefix_sizes", "cached_tokens")

    def __init__(self, index: int, id, arrival_s: float, prompt_tokens: int, output_tokens: int,
                 difficulty: float, dataset: int, offset: int):
        self.index, self.id, self.arrival_s = index, id, arrival_s
        self.prompt_tokens, self.output_tokens = prompt_tokens, output_tokens
        self.difficulty, self.dataset, self.offset = difficulty, dataset, offset  # offset: its table stratum
        self.generated = 0            # output tokens so far (kept across a preemption)
        self.first_token_s = -1.0
        self.steps = 0                # decode iterations it took part in
        self.accepted = 0             # drafts accepted, summed over its steps
        self.verified = 0             # draft tokens verified (roots excluded), summed
        self.preemptions = 0
        self.prefix_keys = ()         # prefix-cache block keys and their tokens (echosim.sim.prefix_cache)
        self.prefix_sizes = ()
        self.cached_tokens = 0        # prompt tokens its last admission found in the prefix cache


@dataclass
class WorkloadSpec:
    """How to produce requests. kind: trace | poisson | gamma | closed."""

    kind: str
    trace: str | None = None           # trace file (arrivals for kind trace; lengths for the others if given)
    time_scale: float = 1.0            # trace replay: arrival times x this (0.5 = twice the rate)
    rate_rps: float = 0.0              # poisson / gamma
    cv: float = 1.0                    # gamma: coefficient of variation of the gaps
    concurrency: int = 0               # closed loop
    requests: int | None = None        # how many (a trace's own length when None)
    prompt_tokens: int = 100           # fixed lengths when no trace gives them
    output_tokens: int = 500
    skip_bad_lines: bool = False
    trace_format: str | None = None
    sort: bool = False                 # sort an unsorted trace by arrival (stable) instead of refusing it
    dataset: str | None = None         # synthetic / closed: label every request (no trace) or draw only the
                                       # trace's rows of this dataset (with one)

    def to_json(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        if not self.sort:  # absent unless set: run folders of sorted traces stay as they were
            del d["sort"]
        return d


def trace_reader(spec: WorkloadSpec):
    from traces import TraceReader, resolve_trace

    return TraceReader(resolve_trace(spec.trace), format=spec.trace_format, skip_bad_lines=spec.skip_bad_lines,
                       sort=spec.sort)


def _limit(chunks: Iterator[TraceArrays], n: int | None) -> Iterator[TraceArrays]:
    left = n
    for chunk in chunks:
        if left is not None:
            if left <= 0:
                return
            if len(chunk) > left:
                chunk = chunk.select(slice(0, left))
            left -= len(chunk)
        yield chunk


def request_chunks(spec: WorkloadSpec, seed: int, reader=None) -> Iterator[TraceArrays]:
    """The workload's requests as TraceArrays chunks (arrival 0 for closed loops), streamed."""
    if spec.kind == "trace":
        if not (np.isfinite(spec.time_scale) and spec.time_scale > 0):
            raise SimError(f"--time-scale must be a finite number > 0, got {spec.time_scale}", field="time_scale")
        for chunk in _limit(reader.chunks(), spec.requests):
            if spec.time_scale != 1.0:
                chunk = chunk.with_arrivals(chunk.arrival_s * spec.time_scale)
            yield chunk
        return
    n = spec.requests
    if n is None or n < 1:
        raise SimError("a synthetic workload needs --requests N >= 1", field="requests")
    lengths = None
    if reader is not None:  # rows resampled from a trace: lengths, dataset labels, prompt text, hash_ids
        lengths = reader.arrays()
        if len(lengths) == 0:
            raise SimError("the trace has no requests to take lengths from", path=str(reader.path))
        if spec.dataset is not None:
            labels = lengths.dataset or []
            keep = np.array([d == spec.dataset for d in labels], dtype=bool)
            if not keep.any():
                known = sorted({str(d) for d in labels if d is not None})
                raise SimError(f"no trace rows with dataset {spec.dataset!r} (the trace has: "
                               f"{', '.join(known) or 'no dataset labels'})", path=str(reader.path),
                               field="dataset")
            lengths = lengths.select(keep)
    from traces.generators import _positive

    if spec.kind in ("poisson", "gamma"):
        _positive(spec.rate_rps, "rate_rps")
        _positive(spec.cv, "cv")
    t0 = 0.0
    for c, lo in enumerate(range(0, n, CHUNK_ROWS)):
        m = min(CHUNK_ROWS, n - lo)
        rng = np.random.default_rng([seed, 10, c])
        if spec.kind == "closed":
            arrival = np.zeros(m)
        else:
            cv = 1.0 if spec.kind == "poisson" else spec.cv
            if cv == 1.0:
                gaps = rng.exponential(1.0 / spec.rate_rps, size=m)
            else:
                shape = 1.0 / cv**2
                gaps = rng.gamma(shape, 1.0 / (spec.rate_rps * shape), size=m)
            arrival = t0 + np.cumsum(gaps)
            t0 = float(arrival[-1])
        extra = {}
        if lengths is not None:
            idx = rng.integers(0, len(lengths), size=m)
            rows = lengths.select(idx)  # with their dataset labels, so per-dataset acceptance applies
            prompt, output = rows.prompt_tokens, rows.output_tokens
            extra = dict(dataset=rows.dataset, prompt=rows.prompt, hash_ids=rows.hash_ids)
        else:
            prompt = np.full(m, spec.prompt_tokens, np.int64)
            output = np.full(m, spec.output_tokens, np.int64)
            if spec.dataset is not None:
                extra = dict(dataset=[spec.dataset] * m)
        if (prompt < 1).any() or (output < 1).any():
            raise SimError("prompt and output lengths must be >= 1")
        yield TraceArrays(arrival, prompt, output, format=spec.kind, **extra)


def set_prefix_keys(reqs: list[Request], chunk: TraceArrays) -> None:
    """Prefix-cache keys per request: Mooncake hash_ids where a row has them, else its prompt text."""
    from echosim.sim.prefix_cache import keys_from_hash_ids, keys_from_text

    hs = chunk.hash_ids or [None] * len(reqs)
    texts = chunk.prompt or [None] * len(reqs)
    for r, h, text in zip(reqs, hs, texts, strict=True):
        if h:
            r.prefix_keys, r.prefix_sizes = keys_from_hash_ids(h, r.prompt_tokens)
        elif text:
            r.prefix_keys, r.prefix_sizes = keys_from_text(text, r.prompt_tokens)


class Arrivals:
    """The arrival process: open loop (each request at its arrival time) or closed loop (`concurrency` requests
    in flight; a finish issues the next one at once)."""

    def __init__(self, env, chunks: Iterator[TraceArrays], submit: Callable[[Request], None], assign,
                 concurrency: int = 0):
        self.env, self.chunks, self.submit, self.assign = env, chunks, submit, assign
        self.concurrency = concurrency
        self.issued = 0
        self.waits = 0     # SimPy timeouts the open loop waited on (one per distinct arrival time)
        self._pending: list[Request] = []  # closed loop: requests made but not yet issued (reversed)

    def _requests(self, chunk: TraceArrays) -> list[Request]:
        n = len(chunk)
        diff, ds, offset = self.assign(chunk.dataset, n)
        ids = chunk.id or [None] * n
        base = self.issued
        self.issued += n
        reqs = [Request(base + i, ids[i], a, p, o, d, s, g) for i, (a, p, o, d, s, g) in enumerate(zip(
            chunk.arrival_s.tolist(), chunk.prompt_tokens.tolist(), chunk.output_tokens.tolist(), diff.tolist(),
            ds.tolist(), offset.tolist(), strict=True))]
        if chunk.hash_ids is not None or chunk.prompt is not None:
            set_prefix_keys(reqs, chunk)
        return reqs

    def open_loop(self):
        env = self.env
        for chunk in self.chunks:
            for req in self._requests(chunk):
                if req.arrival_s > env.now:
                    self.waits += 1
                    yield env.timeout(req.arrival_s - env.now)
                req.arrival_s = env.now if req.arrival_s < env.now else req.arrival_s
                self.submit(req)

    # closed loop ------------------------------------------------------------------------------------

    def _next(self) -> Request | None:
        if not self._pending:
            chunk = next(self.chunks, None)
            if chunk is None:
                return None
            self._pending = self._requests(chunk)[::-1]
        return self._pending.pop()

    def start_closed_loop(self) -> None:
        for _ in range(self.concurrency):
            if not self.issue_next():
                break

    def issue_next(self) -> bool:
        req = self._next()
        if req is None:
            return False
        req.arrival_s = self.env.now
        self.submit(req)
        return True
