"""Trace file formats: detection (extension + header / first line) and parsing into raw column chunks.

Parsing here only splits rows into raw values (strings, JSON values) with their source line numbers; the
reader (traces/reader.py) converts and validates whole chunks with NumPy: one set of checks for all."""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from traces.errors import TraceError


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    time_field: str            # the file's own column names, used in error messages
    prompt_field: str
    output_field: str
    time_unit: str             # "s", "ms" or "datetime"
    relative: bool             # arrival_s is measured from the first request (foreign formats)
    zero_output_is_failure: bool = False


FORMATS = {
    "native": Format("native", "echo native JSONL", "arrival_s", "prompt_tokens", "output_tokens", "s",
                     False),
    "mooncake": Format("mooncake", "Mooncake JSONL (FAST'25)", "timestamp", "input_length", "output_length",
                       "ms", True),
    "azure": Format("azure", "Azure LLM inference CSV (2023/2024)", "TIMESTAMP", "ContextTokens",
                    "GeneratedTokens", "datetime", True),
    "burstgpt": Format("burstgpt", "BurstGPT CSV", "Timestamp", "Request tokens", "Response tokens", "s",
                       True, zero_output_is_failure=True),
    "vidur": Format("vidur", "Vidur trace CSV", "arrived_at", "num_prefill_tokens", "num_decode_tokens", "s",
                    True),
}

_JSON_EXT = (".jsonl", ".json", ".ndjson")


@dataclass
class RawChunk:
    """Rows of one chunk as raw values. Rows rejected while splitting (bad JSON, short rows): `errors`."""

    lines: np.ndarray                      # int64 source line number of each row
    time: list
    prompt: list
    output: list
    extras: dict[str, list] = field(default_factory=dict)   # id, dataset, prompt, priority, hash_ids
    errors: list[tuple[int, str | None, str]] = field(default_factory=list)  # (line, field, message)


def open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")   # -sig: tolerate a byte-order mark


@contextmanager
def reading(path: Path):
    """Turns what can go wrong while reading a file's bytes (not text, not gzip, a truncated or corrupt gzip
    stream, an I/O error) into one TraceError naming the file."""
    where = str(path)
    try:
        yield
    except UnicodeDecodeError as exc:
        raise TraceError(f"not a UTF-8 text file ({exc.reason} at byte {exc.start})", path=where) from None
    except gzip.BadGzipFile as exc:
        raise TraceError(f"not a gzip file ({exc}); rename it without .gz if it is plain text",
                         path=where) from None
    except EOFError:
        raise TraceError("truncated gzip file: the compressed stream ends before its end marker",
                         path=where) from None
    except zlib.error as exc:
        raise TraceError(f"corrupt gzip file ({exc})", path=where) from None
    except OSError as exc:
        raise TraceError(f"cannot read the trace ({exc.strerror or exc})", path=where) from None


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _first_lines(path: Path, count: int = 20) -> list[str]:
    out = []
    with open_text(path) as f:
        for line in f:
            if line.strip():
                out.append(line.strip())
                if len(out) == count:
                    break
    if not out:
        raise TraceError("the trace file is empty", path=str(path))
    return out


def detect_format(path: str | Path) -> str:
    """Name of the format of `path` (a key of FORMATS), from its extension and its first line."""
    path = Path(path)
    if not path.is_file():
        raise TraceError("no such trace file", path=str(path))
    with reading(path):
        lines = _first_lines(path)
    first = lines[0]
    ext = _base_suffix(path)
    if ext in _JSON_EXT or (ext != ".csv" and first.startswith("{")):
        # the first readable object decides, so that a bad first line is reported by the reader with its field
        obj = None
        for text in lines:
            try:
                obj = json.loads(text)
                break
            except (ValueError, RecursionError):
                continue
        if obj is None:
            raise TraceError(f"none of the first {len(lines)} lines is valid JSON; cannot detect the format",
                            path=str(path), line=1)
        keys = set(obj) if isinstance(obj, dict) else set()
        if "arrival_s" in keys:
            return "native"
        if {"timestamp", "input_length"} <= keys:
            return "mooncake"
        raise TraceError(f"unknown JSONL trace: the first object has keys {sorted(keys)}; expected "
                        "'arrival_s' (native) or 'timestamp'+'input_length'+'output_length' (Mooncake)",
                        path=str(path), line=1)
    header = {h.strip() for h in next(csv.reader([first]))}
    for name in ("azure", "burstgpt", "vidur"):
        fmt = FORMATS[name]
        if {fmt.time_field, fmt.prompt_field, fmt.output_field} <= header:
            return name
    raise TraceError(f"unknown trace format: header {sorted(header)} matches no reader (native JSONL, "
                    "Mooncake JSONL, Azure CSV, BurstGPT CSV, Vidur CSV); see traces/README.md",
                    path=str(path), line=1)


def iter_raw_chunks(path: Path, fmt: Format, chunk_rows: int) -> Iterator[RawChunk]:
    with reading(path):
        if fmt.name in ("native", "mooncake"):
            yield from _jsonl_chunks(path, fmt, chunk_rows)
        else:
            yield from _csv_chunks(path, fmt, chunk_rows)


# --- JSONL ----------------------------------------------------------------------------------------

def _jsonl_chunks(path: Path, fmt: Format, chunk_rows: int) -> Iterator[RawChunk]:
    line_no = 0
    with open_text(path) as f:
        while True:
            lines = list(islice(f, chunk_rows))
            if not lines:
                return
            first = line_no + 1
            line_no += len(lines)
            objs = _parse_block(lines)
            if objs is not None:   # fast path: one json.loads for the whole block, no blank or bad line
                yield _columns(objs, np.arange(first, first + len(objs), dtype=np.int64), fmt, [])
                continue
            objs, numbers, errors = [], [], []
            for k, text in enumerate(lines):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except ValueError as exc:
                    errors.append((first + k, None, f"not valid JSON ({exc})"))
                    continue
                except RecursionError:
                    errors.append((first + k, None, "not a trace row: JSON nested too deeply to read"))
                    continue
                if not isinstance(obj, dict):
                    kind = type(obj).__name__
                    errors.append((first + k, None, f"a line must be a JSON object, got {kind}"))
                    continue
                objs.append(obj)
                numbers.append(first + k)
            yield _columns(objs, np.array(numbers, dtype=np.int64), fmt, errors)


def _parse_block(lines: list[str]) -> list[dict] | None:
    """All lines as one JSON array (about 3x faster than json.loads per line), or None if a line is odd."""
    try:
        objs = json.loads("[" + ",".join(lines) + "]")
    except (ValueError, RecursionError):
        return None
    if len(objs) != len(lines) or not all(type(o) is dict for o in objs):
        return None
    return objs


def _columns(objs: list[dict], lines: np.ndarray, fmt: Format, errors: list) -> RawChunk:
    tf, pf, of = fmt.time_field, fmt.prompt_field, fmt.output_field
    chunk = RawChunk(lines, [o.get(tf) for o in objs], [o.get(pf) for o in objs], [o.get(of) for o in objs],
                     errors=errors)
    if not any(len(o) > 3 for o in objs):   # common case: only the three required fields
        return chunk
    if fmt.name == "mooncake":
        if any("hash_ids" in o for o in objs):
            chunk.extras["hash_ids"] = [o.get("hash_ids") for o in objs]
        return chunk
    for name in ("id", "prompt", "priority", "hash_ids"):
        if any(name in o for o in objs):
            chunk.extras[name] = [o.get(name) for o in objs]
    if any("dataset" in o or "category" in o for o in objs):
        chunk.extras["dataset"] = [o.get("dataset", o.get("category")) for o in objs]
    return chunk


# --- CSV ------------------------------------------------------------------------------------------

def _csv_chunks(path: Path, fmt: Format, chunk_rows: int) -> Iterator[RawChunk]:
    with open_text(path) as f:
        reader = csv.reader(f)
        first = _csv_rows(reader, 1, path)
        if not first:
            raise TraceError("the trace file is empty (no CSV header)", path=str(path))
        header = [h.strip() for h in first[0]]
        for name in (fmt.time_field, fmt.prompt_field, fmt.output_field):
            if name not in header:
                raise TraceError(f"the CSV header has no column '{name}' (format {fmt.name} needs "
                                 f"{fmt.time_field}, {fmt.prompt_field}, {fmt.output_field})",
                                 path=str(path), line=1, field=name)
        col = {name: header.index(name) for name in (fmt.time_field, fmt.prompt_field, fmt.output_field)}
        dataset_col = header.index("Log Type") if fmt.name == "burstgpt" and "Log Type" in header else None
        need = max(list(col.values()) + ([dataset_col] if dataset_col is not None else [])) + 1
        line_no = 1
        while True:
            rows = _csv_rows(reader, chunk_rows, path)
            if not rows:
                return
            first = line_no + 1
            line_no += len(rows)
            errors: list = []
            if all(len(r) >= need for r in rows):
                lines = np.arange(first, first + len(rows), dtype=np.int64)
            else:   # blank or short rows: keep the good ones with their line numbers
                good, numbers = [], []
                for k, r in enumerate(rows):
                    if not r or (len(r) == 1 and not r[0].strip()):
                        continue
                    if len(r) < need:
                        missing = next(h for h, i in zip(header, range(len(header)), strict=True)
                                       if i >= len(r) and i < need)
                        errors.append((first + k, missing,
                                       f"missing (the row has {len(r)} columns, the header {len(header)})"))
                        continue
                    good.append(r)
                    numbers.append(first + k)
                rows, lines = good, np.array(numbers, dtype=np.int64)
            it, ip, io_ = col[fmt.time_field], col[fmt.prompt_field], col[fmt.output_field]
            chunk = RawChunk(lines, [r[it] for r in rows], [r[ip] for r in rows], [r[io_] for r in rows],
                             errors=errors)
            if dataset_col is not None:
                chunk.extras["dataset"] = [r[dataset_col] for r in rows]
            yield chunk


def _csv_rows(reader, count: int, path: Path) -> list[list[str]]:
    """Up to `count` rows; a row the csv module cannot split (e.g. a field over its size limit) is an error that
    names its line."""
    try:
        return list(islice(reader, count))
    except csv.Error as exc:
        raise TraceError(f"not a readable CSV row ({exc})", path=str(path), line=reader.line_num) from None
