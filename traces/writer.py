"""Writes traces in the native JSONL schema (traces/README.md), streaming chunk by chunk."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from traces.errors import TraceError
from traces.request import Request, TraceArrays


def _lines(chunk: TraceArrays) -> list[str]:
    # 7 decimals = 100 ns, the resolution of Azure timestamps; repr of the rounded float is the shortest form
    a = np.round(chunk.arrival_s, 7).tolist()
    p, o = chunk.prompt_tokens.tolist(), chunk.output_tokens.tolist()
    optional = {name: getattr(chunk, name) for name in ("id", "dataset", "prompt", "hash_ids")
                if getattr(chunk, name) is not None}
    if chunk.priority is not None and chunk.priority.any():
        optional["priority"] = chunk.priority.tolist()
    if not optional:
        return [f'{{"arrival_s": {a[i]!r}, "prompt_tokens": {p[i]}, "output_tokens": {o[i]}}}\n'
                for i in range(len(a))]
    out = []
    for i in range(len(a)):
        row = {"arrival_s": a[i], "prompt_tokens": p[i], "output_tokens": o[i]}
        for name, col in optional.items():
            value = col[i]
            if value is not None and not (name == "priority" and value == 0):
                row[name] = list(value) if name == "hash_ids" else value
        out.append(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def write_jsonl(path: str | Path, data: TraceArrays | Iterable[TraceArrays] | Iterable[Request],
                *, batch: int = 65_536) -> int:
    """Write requests as native JSONL; `data` is a trace, or an iterable of chunks or of Requests.
    Returns the number of requests written."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise TraceError("the native trace format is JSONL: name the output file *.jsonl", path=str(path))
    if isinstance(data, TraceArrays):
        data = [data]
    # write to a side file and rename at the end: a failed conversion leaves no half-written trace behind
    partial = path.with_name(path.name + ".partial")
    try:
        count = _write(partial, data, batch)
        os.replace(partial, path)
    except OSError as exc:
        _remove(partial)
        raise TraceError(f"cannot write the trace ({exc.strerror or exc})", path=str(path)) from None
    except BaseException:
        _remove(partial)
        raise
    return count


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:   # e.g. its folder is not a folder: nothing was written
        pass


def _write(path: Path, data, batch: int) -> int:
    count = 0
    pending: list[Request] = []
    with open(path, "w", encoding="utf-8") as f:
        for item in data:
            if isinstance(item, TraceArrays):
                f.writelines(_lines(item))
                count += len(item)
                continue
            pending.append(item)
            if len(pending) >= batch:
                f.writelines(_lines(TraceArrays.from_requests(pending)))
                count += len(pending)
                pending = []
        if pending:
            f.writelines(_lines(TraceArrays.from_requests(pending)))
            count += len(pending)
    return count
