"""Streaming trace reader: any supported format in, validated `TraceArrays` chunks (or `Request`s) out.

Memory stays bounded by one chunk (default 16,384 rows) whatever the trace length, except with sort=True,
which must hold the whole trace to reorder it. Every check runs on whole NumPy columns; only a chunk that
holds a bad row falls back to per-row work to name it.

Bad rows (bad JSON, missing / negative / fractional lengths, NaN or non-number time, time earlier than the
previous request) raise `TraceError` with file, line and field, or, with skip_bad_lines=True, are dropped and
counted in `reader.stats.bad_lines`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from traces.errors import TraceError
from traces.formats import FORMATS, Format, RawChunk, detect_format, iter_raw_chunks
from traces.request import ReadStats, Request, TraceArrays

CHUNK_ROWS = 16_384
_MAX_EXAMPLES = 5
# The documented cap on a prompt or output length (tokens): far above any model's context today, low enough
# that token counts, KV blocks and times stay exact in int64 / float64 everywhere downstream.
MAX_TOKENS = 10_000_000
DATE_YEARS = (1700, 2200)   # dated formats: timestamps NumPy holds in int64 nanoseconds
MAX_ARRIVAL_S = 1e12   # the cap on an arrival time in seconds (~31,700 years): time scaling stays finite
_INT64 = 2**63


class TraceReader:
    """Reads one trace file. `chunks()`, `requests()` and `arrays()` each stream the file again from the
    start; `stats` describes the latest pass (bad lines skipped, failed requests dropped)."""

    def __init__(self, path: str | Path, *, format: str | None = None, skip_bad_lines: bool = False,
                 sort: bool = False, chunk_rows: int = CHUNK_ROWS):
        self.path = Path(path)
        if format is not None and format not in FORMATS:
            raise TraceError(f"unknown trace format '{format}'; known: {', '.join(FORMATS)}", field="format")
        self.format = format or detect_format(self.path)
        self.fmt: Format = FORMATS[self.format]
        self.skip_bad_lines, self.sort, self.chunk_rows = skip_bad_lines, sort, chunk_rows
        self.stats = ReadStats(format=self.format)

    # --- public API -------------------------------------------------------------------------------

    def chunks(self) -> Iterator[TraceArrays]:
        if not self.sort:
            yield from self._stream(check_order=True)
            return
        whole = TraceArrays.concat(list(self._stream(check_order=False)), format=self.format)
        order = np.argsort(whole.arrival_s, kind="stable")
        self.stats.sorted_rows = bool(np.any(order != np.arange(len(order))))
        whole = whole.select(order)
        if self.fmt.relative and len(whole):   # foreign formats start at 0 once sorted
            whole.arrival_s = whole.arrival_s - whole.arrival_s[0]
        for start in range(0, len(whole), self.chunk_rows):
            yield whole.select(slice(start, start + self.chunk_rows))

    def requests(self) -> Iterator[Request]:
        for chunk in self.chunks():
            yield from chunk.requests()

    def arrays(self) -> TraceArrays:
        out = TraceArrays.concat(list(self.chunks()), format=self.format)
        out.stats = self.stats
        return out

    # --- streaming and validation -----------------------------------------------------------------

    def _stream(self, check_order: bool) -> Iterator[TraceArrays]:
        self.stats = ReadStats(format=self.format)
        self._t0: float | None = None     # raw time of the first request (relative formats)
        self._epoch: int | None = None    # first timestamp in ns (dated formats), so that floats stay exact
        self._last = -np.inf                     # latest arrival so far, for the order check
        self._last_line = 0
        for raw in iter_raw_chunks(self.path, self.fmt, self.chunk_rows):
            chunk = self._validate(raw, check_order)
            if len(chunk):
                self.stats.requests += len(chunk)
                chunk.stats = self.stats
                yield chunk
        if self.stats.requests == 0:
            raise TraceError(self._why_empty(), path=str(self.path))

    def _why_empty(self) -> str:
        s = self.stats
        if s.bad_lines or s.failed_requests:
            parts = [f"{s.bad_lines:,} bad lines skipped"] if s.bad_lines else []
            if s.failed_requests:
                parts.append(f"{s.failed_requests:,} failed requests (0 output tokens) dropped")
            first = f"; first: {s.examples[0]}" if s.examples else ""
            return f"no requests left to run ({', '.join(parts)}){first}"
        return "the trace has no requests (only a header or blank lines)"

    def _validate(self, raw: RawChunk, check_order: bool) -> TraceArrays:
        fmt, n = self.fmt, len(raw.lines)
        errors: list[tuple[int, str | None, str]] = list(raw.errors)
        bad = np.zeros(n, dtype=bool)

        def flag(mask: np.ndarray, field: str, describe) -> None:
            nonlocal bad
            hits = np.flatnonzero(mask & ~bad)
            if len(hits):
                limit = 1 if not self.skip_bad_lines else _MAX_EXAMPLES
                errors.extend((int(raw.lines[i]), field, describe(i)) for i in hits[:limit])
                bad |= mask

        # time -> seconds
        t = self._times(raw, flag)
        not_finite = ~np.isfinite(t) & ~bad
        flag(not_finite, fmt.time_field, lambda i: f"not a finite number: {_show(raw.time[i])}")
        if not fmt.relative:
            flag(t < 0, fmt.time_field, lambda i: f"must be >= 0 seconds, got {_show(raw.time[i])}")

        # lengths
        lengths = []
        for values, name in ((raw.prompt, fmt.prompt_field), (raw.output, fmt.output_field)):
            x = _numbers(values, name, fmt.name != "native" and fmt.name != "mooncake", flag)
            flag(~np.isfinite(x) & ~np.isnan(x), name,
                 lambda i, v=values: f"not a finite number: {_show(v[i])}")
            flag(np.isnan(x), name, lambda i, v=values: f"not a number: {_show(v[i])}")
            with np.errstate(invalid="ignore"):
                flag(np.isfinite(x) & (x != np.floor(x)), name,
                     lambda i, v=values: f"must be an integer, got {_show(v[i])}")
                low = (x < 1) & ~(fmt.zero_output_is_failure & (name == fmt.output_field) & (x == 0))
                flag(low, name, lambda i, v=values: f"must be a positive integer (>= 1), got {_show(v[i])}")
                flag(x > MAX_TOKENS, name, lambda i, v=values: f"must be at most {MAX_TOKENS:,} tokens (the "
                     f"reader's cap, see traces/README.md), got {_show(v[i])}")
            lengths.append(x)
        prompt, output = lengths

        extras = self._extras(raw, flag)

        failed = ~bad & (output == 0) if fmt.zero_output_is_failure else np.zeros(n, dtype=bool)
        self.stats.failed_requests += int(failed.sum())
        ok = ~bad & ~failed

        # arrival order and the origin of relative formats
        if fmt.relative and self._t0 is None and ok.any():
            self._t0 = t[np.argmax(ok)]
        if fmt.relative and self._t0 is not None:
            t = t - self._t0
        if fmt.time_unit == "datetime":
            t = t / 1e9
        elif fmt.time_unit == "ms":
            t = t / 1e3
        with np.errstate(invalid="ignore"):
            too_late = ok & ~(np.abs(t) <= MAX_ARRIVAL_S)   # also catches a difference that overflowed
        if too_late.any():
            origin = " after the first request" if fmt.relative else ""
            flag(too_late, fmt.time_field, lambda i: f"must be at most {MAX_ARRIVAL_S:.0e} seconds{origin} (the "
                                                     f"reader's cap), got {_show(raw.time[i])}")
            ok &= ~too_late
        if check_order and ok.any():
            idx = np.flatnonzero(ok)
            tv = t[idx]
            seen = np.concatenate(([self._last], tv))
            running = np.maximum.accumulate(seen)
            before = running[:-1]
            late = tv < before
            if late.any():
                j = np.flatnonzero(late)
                # which earlier row holds the running maximum, to name its line in the message
                holder = np.maximum.accumulate(np.where(seen == running, np.arange(len(seen)), 0))[:-1]
                holder_line = np.concatenate(([self._last_line], raw.lines[idx]))[holder]
                for k in j[: (_MAX_EXAMPLES if self.skip_bad_lines else 1)]:
                    message = (f"arrival {_fmt_s(tv[k])} s is earlier than {_fmt_s(before[k])} s of a "
                               f"request before it (line {int(holder_line[k])}): the trace is not sorted by "
                               "time. Sort it (sort=True, CLI --sort) or drop such rows (--skip-bad-lines)")
                    errors.append((int(raw.lines[idx[k]]), fmt.time_field, message))
                ok[idx[j]] = False
                bad[idx[j]] = True
            kept = np.flatnonzero(ok)
            if len(kept):
                self._last = max(self._last, float(t[kept].max()))
                self._last_line = int(raw.lines[kept[-1]])

        if errors:
            if not self.skip_bad_lines:
                line, field, message = min(errors, key=lambda e: e[0])
                raise TraceError(message, path=str(self.path), line=line, field=field)
            self.stats.bad_lines += len(raw.errors) + int(bad.sum())
            for line, field, message in sorted(errors, key=lambda e: e[0]):
                if len(self.stats.examples) < _MAX_EXAMPLES:
                    where = f"line {line}" + (f", field '{field}'" if field else "")
                    self.stats.examples.append(f"{where}: {message}")

        out = TraceArrays(t[ok].astype(np.float64), prompt[ok].astype(np.int64), output[ok].astype(np.int64),
                          format=self.format, line=raw.lines[ok].astype(np.int64))
        rows = np.flatnonzero(ok)
        for name, col in extras.items():
            if name == "priority":
                out.priority = col[ok].astype(np.int64)
            else:
                setattr(out, name, [col[i] for i in rows])
        return out

    def _times(self, raw: RawChunk, flag) -> np.ndarray:
        """Raw times as float64 (seconds, ms or ns for dates); NaN where unreadable (already flagged)."""
        fmt = self.fmt
        if fmt.time_unit != "datetime":
            return _numbers(raw.time, fmt.time_field, fmt.name not in ("native", "mooncake"), flag)
        values = [v.strip() for v in raw.time]
        # Azure 2024 files may carry a UTC suffix; NumPy has no time zones, so drop it (times are UTC anyway)
        values = [v[:-6] if v.endswith("+00:00") else v[:-1] if v.endswith("Z") else v for v in values]
        # NumPy also reads "now", "today", a bare year, and wraps years outside 1678-2261 silently: accept only a
        # date that starts YYYY-MM-DD with a year in DATE_YEARS
        shaped = np.array([len(v) >= 10 and v[:4].isascii() and v[:4].isdigit() and v[4] == "-" and v[7] == "-"
                           and DATE_YEARS[0] <= int(v[:4]) <= DATE_YEARS[1] for v in values], dtype=bool)
        try:
            ns = np.array(values if shaped.all() else [v if k else "NaT" for v, k in zip(values, shaped.tolist(),
                                                                                            strict=True)],
                          dtype="datetime64[ns]")
            unreadable = ~shaped
        except ValueError:
            ns = np.empty(len(values), dtype="datetime64[ns]")
            unreadable = ~shaped
            for i, v in enumerate(values):
                try:
                    ns[i] = np.datetime64(v, "ns") if shaped[i] else np.datetime64("NaT")
                except ValueError:
                    ns[i] = np.datetime64("NaT")
                    unreadable[i] = True
        flag(np.array([not v for v in values], dtype=bool), fmt.time_field, lambda i: "missing")
        flag(unreadable, fmt.time_field,
             lambda i: f"not a timestamp (expected like 2023-11-16 18:15:46.6805900, years {DATE_YEARS[0]}-"
                       f"{DATE_YEARS[1]}): {_show(raw.time[i])}")
        nat = np.isnat(ns)
        flag(nat, fmt.time_field, lambda i: f"missing or not a timestamp: {_show(raw.time[i])}")
        # integer ns from the first readable timestamp: float64 holds them exactly for 104 days
        if self._epoch is None and (~nat).any():
            self._epoch = int(ns[np.argmax(~nat)].astype(np.int64))
        out = (ns.astype(np.int64) - (self._epoch or 0)).astype(np.float64)
        out[nat] = np.nan
        return out

    def _extras(self, raw: RawChunk, flag) -> dict[str, object]:
        """Optional columns, checked row by row (they are rare, and usually short)."""
        out: dict[str, object] = {}
        for name, values in raw.extras.items():
            n = len(values)
            wrong = np.zeros(n, dtype=bool)
            if name == "priority":
                col = np.zeros(n, dtype=np.int64)
                for i, v in enumerate(values):
                    if v is None:
                        continue
                    if (type(v) is int or (type(v) is float and v.is_integer())) and -_INT64 < v < _INT64:
                        col[i] = int(v)
                    else:
                        wrong[i] = True
                flag(wrong, name, lambda i, v=values: f"must be an integer within +-2^63, got {_show(v[i])}")
                out[name] = col
                continue
            if name == "hash_ids":
                col = [None] * n
                for i, v in enumerate(values):
                    if v is None:
                        continue
                    if isinstance(v, list) and all(type(h) is int and 0 <= h < _INT64 for h in v):
                        col[i] = tuple(v)
                    else:
                        wrong[i] = True
                flag(wrong, name, lambda i, v=values: f"must be a list of integers in [0, 2^63), got {_show(v[i])}")
                out[name] = col
                continue
            col = list(values)
            for i, v in enumerate(values):
                if v is None or type(v) is str:
                    continue
                if name == "id" and type(v) is int:
                    col[i] = str(v)
                else:
                    wrong[i] = True
            kind = "a string or an integer" if name == "id" else "a string"
            flag(wrong, name, lambda i, v=values, k=kind: f"must be {k}, got {_show(v[i])}")
            out[name] = col
        return out


def _numbers(values: list, field: str, strings_ok: bool, flag) -> np.ndarray:
    """Float64 column; unreadable entries become NaN and are flagged (missing, wrong type, not a number).

    The same rule for every row of every format: a JSON number (true / false are not numbers, on any line), or
    in a CSV a string that parses as one. Integers too large for a float become +-1e308, over every cap."""
    kinds = set(map(type, values))
    if kinds <= {int, float}:   # the common JSON case, bool excluded by the exact type test
        try:
            return np.array(values, dtype=np.float64) if values else np.zeros(0)
        except OverflowError:   # an integer beyond float range: the row loop below marks it inf
            pass
    elif strings_ok and kinds == {str}:
        try:
            return np.array(values).astype(np.float64)
        except (ValueError, OverflowError):
            pass
    out = np.full(len(values), np.nan)
    missing = np.zeros(len(values), dtype=bool)
    wrong = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v is None or (type(v) is str and not v.strip()):
            missing[i] = True
        elif type(v) is float:
            out[i] = v
        elif type(v) is int:
            out[i] = v if -1e308 < v < 1e308 else (1e308 if v > 0 else -1e308)  # over every cap
        elif type(v) is str and strings_ok:
            try:
                out[i] = float(v)
            except ValueError:
                wrong[i] = True
        else:
            wrong[i] = True
    flag(missing, field, lambda i: "missing")
    flag(wrong, field, lambda i: f"not a number: {_show(values[i])}")
    return out


def _show(value) -> str:
    if isinstance(value, str):
        return repr(value[:60])
    try:
        return json.dumps(value)[:60]
    except (TypeError, ValueError):
        return repr(value)[:60]


def _fmt_s(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".")


def iter_requests(path: str | Path, **options) -> Iterator[Request]:
    """Requests of a trace one by one (streaming). For counts of skipped lines use TraceReader(...).stats."""
    return TraceReader(path, **options).requests()


def iter_chunks(path: str | Path, **options) -> Iterator[TraceArrays]:
    """The trace as column chunks of at most `chunk_rows` rows (streaming, bounded memory)."""
    return TraceReader(path, **options).chunks()


def read_arrays(path: str | Path, **options) -> TraceArrays:
    """The whole trace as columns; `.stats` says how many bad lines were skipped and failures dropped."""
    return TraceReader(path, **options).arrays()
