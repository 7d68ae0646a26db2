"""One request of a trace, and a trace (or a chunk of one) as column arrays.

`TraceArrays` is what the simulator should consume on hot paths (NumPy columns); `Request` is the per-row view
for code that wants objects. Both carry the same fields; optional columns are None when no row has them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class Request:
    arrival_s: float                      # seconds from the start of the trace
    prompt_tokens: int
    output_tokens: int
    id: str | None = None
    dataset: str | None = None            # dataset / category (e.g. "mt_bench"), for per-dataset profiles
    prompt: str | None = None             # prompt text, when the trace has it
    priority: int = 0                     # larger = more important; 0 when absent
    hash_ids: tuple[int, ...] | None = None  # Mooncake prefix blocks of 512 tokens; equal ids = shared prefix


@dataclass
class ReadStats:
    """What a reader did: filled while it streams, final once the stream is exhausted."""

    format: str = ""
    requests: int = 0          # requests yielded
    bad_lines: int = 0         # malformed rows skipped (only with skip_bad_lines=True)
    failed_requests: int = 0   # rows that log a failed request (BurstGPT: 0 response tokens), dropped
    sorted_rows: bool = False  # True when the reader reordered rows by arrival (sort=True)
    examples: list[str] = field(default_factory=list)  # first few bad-line messages, for the user


_OPTIONAL = ("id", "dataset", "prompt", "priority", "hash_ids")


@dataclass
class TraceArrays:
    arrival_s: np.ndarray        # float64, non-decreasing
    prompt_tokens: np.ndarray    # int64, >= 1
    output_tokens: np.ndarray    # int64, >= 1
    id: list | None = None
    dataset: list | None = None
    prompt: list | None = None
    priority: np.ndarray | None = None   # int64
    hash_ids: list | None = None         # list of tuple[int, ...] or None per row
    format: str = "native"
    stats: ReadStats | None = None
    line: np.ndarray | None = None       # int64 source line of each row (files read by TraceReader), for messages

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0

    def requests(self) -> Iterator[Request]:
        """Per-row objects (slower than the columns; fine for thousands of requests)."""
        a, p, o = self.arrival_s.tolist(), self.prompt_tokens.tolist(), self.output_tokens.tolist()
        n = len(a)
        ids = self.id or [None] * n
        ds = self.dataset or [None] * n
        pr = self.prompt or [None] * n
        prio = self.priority.tolist() if self.priority is not None else [0] * n
        hs = self.hash_ids or [None] * n
        for i in range(n):
            yield Request(a[i], p[i], o[i], ids[i], ds[i], pr[i], prio[i], hs[i])

    def select(self, index: np.ndarray | slice) -> TraceArrays:
        """Rows at `index` (a slice, an integer index array or a boolean mask), optional columns included."""
        def pick(col):
            if col is None:
                return None
            if isinstance(col, np.ndarray) or isinstance(index, slice):
                return col[index]
            idx = np.flatnonzero(index) if np.asarray(index).dtype == bool else index
            return [col[i] for i in idx]

        return TraceArrays(self.arrival_s[index], self.prompt_tokens[index], self.output_tokens[index],
                           pick(self.id), pick(self.dataset), pick(self.prompt), pick(self.priority),
                           pick(self.hash_ids), self.format, self.stats,
                           self.line[index] if self.line is not None else None)

    def with_arrivals(self, arrival_s: np.ndarray) -> TraceArrays:
        """The same requests at other arrival times (time scaling, re-timing by a generator)."""
        out = self.select(slice(None))
        out.arrival_s = np.asarray(arrival_s, dtype=np.float64)
        return out

    @staticmethod
    def from_requests(requests: Sequence[Request], format: str = "native") -> TraceArrays:
        n = len(requests)
        out = TraceArrays(np.array([r.arrival_s for r in requests], dtype=np.float64).reshape(n),
                          np.array([r.prompt_tokens for r in requests], dtype=np.int64).reshape(n),
                          np.array([r.output_tokens for r in requests], dtype=np.int64).reshape(n),
                          format=format)
        for name in _OPTIONAL:
            col = [getattr(r, name) for r in requests]
            if name == "priority":
                out.priority = np.array(col, dtype=np.int64) if any(col) else None
            elif any(v is not None for v in col):
                setattr(out, name, col)
        return out

    @staticmethod
    def concat(parts: Sequence[TraceArrays], format: str | None = None) -> TraceArrays:
        """One trace from chunks; an optional column missing from some chunks is filled with None / 0."""
        parts = [p for p in parts if len(p)] or list(parts[:1])
        if not parts:
            return TraceArrays(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64),
                               format=format or "native")
        out = TraceArrays(np.concatenate([p.arrival_s for p in parts]),
                          np.concatenate([p.prompt_tokens for p in parts]),
                          np.concatenate([p.output_tokens for p in parts]),
                          format=format or parts[0].format)
        if all(p.line is not None for p in parts):
            out.line = np.concatenate([p.line for p in parts])
        for name in _OPTIONAL:
            cols = [getattr(p, name) for p in parts]
            if all(c is None for c in cols):
                continue
            if name == "priority":
                out.priority = np.concatenate([c if c is not None else np.zeros(len(p), np.int64)
                                               for c, p in zip(cols, parts, strict=True)])
            else:
                merged: list = []
                for c, p in zip(cols, parts, strict=True):
                    merged.extend(c if c is not None else [None] * len(p))
                setattr(out, name, merged)
        return out
