"""SGLang's own steps, as the simulator prices them: read back from a live server's log and the ECHO plugin's step
records, for `echosim validate --backend sglang` (echosim/validate/sglang_backend.py).

SGLang logs one line per scheduler iteration when started with `--decode-log-interval 1` (a decode step; a
prefill batch always), with millisecond timestamps under SGLANG_LOG_MS=1. Both lines are written after the
iteration's result is processed and streamed, so an iteration that follows another without idling took the time
between the two lines. The plugin (ECHO_SGLANG_RECORDS) writes one JSON line per verify step, in the same order
as the decode lines: the requests of the step, each request's tree (root included), the depth it drafted to and
the drafts SGLang accepted. Together they give each step in the terms of the engine's IterationRecord (what
step_overheads fits and prices): tokens through the target, contexts, draft rows per depth, prefill tokens.

    events = read_log(log_path, start_line)                  # the iterations since start_line
    steps = sglang_steps(events, read_step_records(path, start), tree_tokens=N, topk=k, ragged=False)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from echosim.validate.errors import ValidationError

_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})[^\]]*\] (Prefill|Decode) batch[^,]*, (.*)$")
_FIELD = re.compile(r"#([a-z-]+): (\d+)")


@dataclass(frozen=True)
class LogEvent:
    """One scheduler iteration of SGLang's log: when it ended (s, the log's clock), its kind and counts."""

    end_s: float
    kind: str          # "prefill" or "decode"
    running: int       # decode: requests in the batch; prefill: requests already running beside it
    new_tokens: int    # prefill: prompt tokens computed
    new_seqs: int      # prefill: requests admitted
    kv_tokens: int     # decode: KV tokens in use (#token), -1 when the line does not say


def log_lines(path: Path) -> int:
    """Lines in the log so far (a phase reads only what follows)."""
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def read_log(path: Path, start_line: int = 0) -> list[LogEvent]:
    """SGLang's prefill and decode lines after `start_line`. Raises when the log has no millisecond timestamps
    (the server was not started with SGLANG_LOG_MS=1) but has batch lines."""
    events, undated = [], 0
    with open(path, "rb") as f:  # lines split at b"\n" only, as log_lines counts them (progress bars write \r)
        for n, raw in enumerate(f):
            if n < start_line or b" batch" not in raw:
                continue
            line = raw.decode("utf-8", errors="replace")
            m = _LINE.match(line.strip())
            if m is None:
                undated += ("Decode batch" in line or "Prefill batch" in line)
                continue
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            fields = dict((k, int(v)) for k, v in _FIELD.findall(m.group(3)))
            events.append(LogEvent(t, m.group(2).lower(), fields.get("running-req", 0), fields.get("new-token", 0),
                                   fields.get("new-seq", 0), fields.get("token", -1)))
    if undated and not events:
        raise ValidationError("SGLang's batch lines carry no millisecond timestamps: start the server with "
                              "SGLANG_LOG_MS=1 and --decode-log-interval 1", path=str(path))
    return events


def read_step_records(path: Path, start_line: int = 0) -> list[dict]:
    """The plugin's per-step records (ECHO_SGLANG_RECORDS) after `start_line`."""
    if not path.is_file():
        return []
    out = []
    with open(path) as f:
        for n, line in enumerate(f):
            if n >= start_line and line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValidationError(f"not valid JSON ({exc.msg})", path=str(path), line=n + 1) from None
    return out


def sglang_steps(events: list[LogEvent], records: list[dict] | None, *, tree_tokens: int, topk: int,
                 ragged: bool = False, mean_context: float = 0.0) -> list:
    """SGLang's iterations as IterationRecords (echo_exec.engine), timed from the log: an iteration's time is the
    gap to the previous line; a prefill admitted while nothing ran followed an idle server and has no known start,
    so it is left out, and so is the first line. Decode steps take the plugin's records in order (batch, trees,
    draft depth, accepted) when there is one per decode line; without records (plain decoding) each request
    verifies one token. tree_tokens: SGLang's dense width N (every request verifies N unless ragged)."""
    from echo_exec.engine import IterationRecord
    from echosim.spec.drafting import depth_widths

    decodes = sum(e.kind == "decode" for e in events)
    if records is not None and len(records) not in (0, decodes):
        raise ValidationError(f"{len(records)} plugin step records for {decodes} decode lines in SGLang's log: "
                              "the two do not describe the same steps (one server, --decode-log-interval 1)")
    recs = iter(records or [])
    out = []
    prev: LogEvent | None = None
    last_ctx = mean_context
    for e in events:
        rec = next(recs) if e.kind == "decode" and records else None
        timed = prev is not None and not (e.kind == "prefill" and e.running == 0)
        dt_ms = (e.end_s - prev.end_s) * 1e3 if prev is not None else 0.0
        prev = e
        if not timed or dt_ms <= 0:
            continue
        if e.kind == "prefill":
            out.append(IterationRecord(start_s=e.end_s - dt_ms / 1e3, step_ms=dt_ms,
                                       prefill_chunks=[(e.new_tokens, 0)]))
            continue
        if rec is not None:
            batch = len(rec["rids"])
            verify = np.asarray(rec["tree_tokens"] if ragged else [tree_tokens] * batch, np.int64)
            depth = int(max(rec.get("stop_depth") or [0]))
            accepted = int(sum(rec.get("accepted") or []))
        else:
            batch = max(e.running, 1)
            verify = np.full(batch, tree_tokens, np.int64)
            depth, accepted = 0, 0
        # the line is written after the step's finished requests freed their KV (#token 0 at a batch's end):
        # then the step ran at about the previous step's contexts
        ctx = e.kv_tokens / batch if e.kv_tokens > 0 else last_ctx
        last_ctx = ctx
        rows = tuple(batch * w for w in depth_widths(depth, topk, topk))
        out.append(IterationRecord(start_s=e.end_s - dt_ms / 1e3, step_ms=dt_ms, verify_tokens=verify,
                                   context_lens=np.full(batch, ctx), draft_rows=rows, accepted=accepted))
    return out
