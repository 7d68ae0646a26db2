"""Malformed traces of every format, generated: the CLI exits non-zero, within 10 s, with one line naming the file,
the line and the field at fault, and never a traceback. Most cases run the CLI in-process (echosim.cli.main), a few
through a subprocess as a user would."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echosim.cli import main
from traces.reader import MAX_TOKENS

ROOT = Path(__file__).resolve().parents[1]

# Per format: the header (CSV) or None (JSONL), the time / prompt / output columns, and a good row as raw values
# (a function of the row index, so that times increase).
FORMATS = {
    "native": (None, "arrival_s", "prompt_tokens", "output_tokens", lambda i: {
        "arrival_s": 0.5 * i, "prompt_tokens": 10 + i, "output_tokens": 5 + i}),
    "mooncake": (None, "timestamp", "input_length", "output_length", lambda i: {
        "timestamp": 1000 * i, "input_length": 10 + i, "output_length": 5 + i, "hash_ids": [i]}),
    "azure": (["TIMESTAMP", "ContextTokens", "GeneratedTokens"], "TIMESTAMP", "ContextTokens", "GeneratedTokens",
              lambda i: {"TIMESTAMP": f"2023-11-16 18:15:{10 + i:02d}.6805900", "ContextTokens": str(10 + i),
                         "GeneratedTokens": str(5 + i)}),
    "burstgpt": (["Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"],
                 "Timestamp", "Request tokens", "Response tokens",
                 lambda i: {"Timestamp": str(2 * i), "Model": "ChatGPT", "Request tokens": str(10 + i),
                            "Response tokens": str(5 + i), "Total tokens": str(15 + 2 * i),
                            "Log Type": "Conversation log"}),
    "vidur": (["", "arrived_at", "num_prefill_tokens", "num_decode_tokens"], "arrived_at", "num_prefill_tokens",
              "num_decode_tokens", lambda i: {"": str(i), "arrived_at": str(0.25 * i),
                                              "num_prefill_tokens": str(10 + i), "num_decode_tokens": str(5 + i)}),
}
ROWS = 5

# Values that are wrong whatever the row: as JSON values (JSONL formats) and as CSV cell text.
_LETTERS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzNaT_-/ ", min_size=1, max_size=12).filter(str.strip)
_BAD_LENGTH_NUMBERS = st.one_of(
    st.integers(max_value=0), st.integers(min_value=MAX_TOKENS + 1),
    st.floats(allow_nan=True, allow_infinity=True).filter(
        lambda x: not math.isfinite(x) or x < 1 or x > MAX_TOKENS or x != math.floor(x)))
_BAD_LENGTH_JSON = st.one_of(_BAD_LENGTH_NUMBERS, st.booleans(), st.none(), _LETTERS,
                             st.lists(st.integers(1, 9), max_size=2), st.just({"n": 5}))
_BAD_TIME_JSON_ANY = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.booleans(), st.none(), _LETTERS,
                               st.just([1]), st.just("12"))
_NATIVE_BAD_TIME = st.one_of(_BAD_TIME_JSON_ANY, st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
                             st.floats(min_value=1.01e12, allow_nan=False))
_BAD_LENGTH_CSV = st.one_of(_BAD_LENGTH_NUMBERS.map(repr).map(lambda s: s.replace("inf", "Infinity")), _LETTERS,
                            st.just(""), st.just("true"), st.just("1" * 400))
_BAD_TIME_CSV = st.one_of(_LETTERS, st.sampled_from(["", "nan", "inf", "-inf", "true", "1e400"]))
_BAD_AZURE_TIME = st.one_of(_LETTERS, st.sampled_from(["", "now", "today", "2023", "9999-01-01 00:00:00",
                                                       "2023-02-30 00:00:00", "1e30", "-2023-01-01"]))


def _render(fmt: str, rows: list[dict]) -> str:
    header = FORMATS[fmt][0]
    if header is None:
        return "".join(json.dumps(r) + "\n" for r in rows)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([r[h] for h in header])
    return out.getvalue()


@st.composite
def malformed_trace(draw):
    """(format, file text, forced format?, expected line, expected field or None)."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    header, time_f, prompt_f, output_f, good = FORMATS[fmt]
    forced = draw(st.booleans())
    k = draw(st.integers(0 if forced else 1, ROWS - 1))   # unforced: the first row lets the format be detected
    rows = [good(i) for i in range(ROWS)]
    line = k + 1 + (header is not None)
    kind = draw(st.sampled_from(["value", "value", "value", "structure"]))
    if kind == "structure":
        text = _render(fmt, rows).splitlines(keepends=True)
        body = text[line - 1].rstrip("\n")
        if header is None:
            cut = draw(st.integers(1, len(body) - 1))
            text[line - 1] = draw(st.sampled_from([body[:cut], "[1, 2]", "null", '"x"', "{" + body])) + "\n"
            return fmt, "".join(text), forced, line, None
        cells = next(csv.reader([body]))
        keep = draw(st.integers(1, max(header.index(f) for f in (time_f, prompt_f, output_f))))
        text[line - 1] = ",".join(cells[:keep]) + "\n"
        return fmt, "".join(text), forced, line, header[keep]
    field = draw(st.sampled_from([time_f, prompt_f, output_f]))
    if header is None:
        if field == time_f:
            value = draw(_NATIVE_BAD_TIME if fmt == "native" else _BAD_TIME_JSON_ANY)
        else:
            value = draw(_BAD_LENGTH_JSON)
        if draw(st.integers(0, 9)) == 0:
            del rows[k][field]
        else:
            rows[k][field] = value
    else:
        if field == time_f:
            value = draw(_BAD_AZURE_TIME if fmt == "azure" else _BAD_TIME_CSV)
        else:
            value = draw(_BAD_LENGTH_CSV)
            if fmt == "burstgpt" and field == output_f and value.strip() in ("0", "0.0", "-0", "-0.0"):
                value = "-1"   # a 0-token BurstGPT response is a logged failure, dropped, not an error
        rows[k][field] = value
    return fmt, _render(fmt, rows), forced, line, field


@contextmanager
def _deadline(seconds: float):
    """Fail (instead of hanging) when the block runs longer than `seconds`."""
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _check(capsys, argv, path, line, field):
    with _deadline(10.0):
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    where = f"echosim: error: {path}:{line}: " + (f"field '{field}': " if field else "")
    assert lines[0].startswith(where), (where, err)


_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@settings(max_examples=250, **_SETTINGS)
@given(case=malformed_trace())
def test_malformed_trace_inspect_names_file_line_field(capsys, case):
    fmt, text, forced, line, field = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("t.jsonl" if FORMATS[fmt][0] is None else "t.csv")
        path.write_text(text)
        _check(capsys, ["trace", "inspect", str(path)] + (["--format", fmt] if forced else []), path, line, field)


@settings(max_examples=30, **_SETTINGS)
@given(case=malformed_trace())
def test_malformed_trace_run_names_file_line_field(capsys, case):
    fmt, text, forced, line, field = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("t.jsonl.gz" if FORMATS[fmt][0] is None else "t.csv")
        if path.suffix == ".gz":
            import gzip

            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
        argv = ["run", "--trace", str(path), "--no-save", "--no-progress"] + (["--format", fmt] if forced else [])
        _check(capsys, argv, path, line, field)


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "echosim.cli", *args], capture_output=True, text=True,
                          timeout=20, env=env, cwd=cwd)


GOOD = '{"arrival_s": 0.0, "prompt_tokens": 10, "output_tokens": 5}\n'


@pytest.mark.parametrize("second_line, where", [
    ('{"arrival_s": true, "prompt_tokens": 10, "output_tokens": 5}', ":2: field 'arrival_s': not a number: true"),
    ('{"arrival_s": 1, "prompt_tokens": 10, "output_tokens": 1e30}', ":2: field 'output_tokens': must be at most"),
    ('{"arrival_s": 1, "prompt_tokens": 9223372036854775808, "output_tokens": 5}',
     ":2: field 'prompt_tokens': must be at most"),
])
def test_subprocess_bad_lines_are_one_line(tmp_path, second_line, where):
    path = tmp_path / "t.jsonl"
    path.write_text(GOOD + second_line + "\n")
    for command in (["run", "--trace", str(path), "--no-save", "--no-progress"], ["trace", "inspect", str(path)]):
        res = _cli(*command)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert res.stderr.strip() == res.stderr.strip().splitlines()[0]
        assert res.stderr.startswith(f"echosim: error: {path}{where}"), res.stderr


def test_subprocess_corrupt_gzip_and_bad_numbers(tmp_path):
    import gzip

    whole = gzip.compress((GOOD * 2000).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "plain.jsonl.gz").write_text(GOOD)
    flipped = bytearray(whole)
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flip.jsonl.gz").write_bytes(bytes(flipped))
    cases = [(["trace", "inspect", "cut.jsonl.gz"], "cut.jsonl.gz: truncated gzip file"),
             (["trace", "inspect", "plain.jsonl.gz"], "plain.jsonl.gz: not a gzip file"),
             (["trace", "inspect", "flip.jsonl.gz"], "flip.jsonl.gz: "),
             (["run", "--trace", "cut.jsonl.gz", "--no-save"], "cut.jsonl.gz: truncated gzip file"),
             (["run", "--trace", str(ROOT / "traces" / "azure_conv_2023_5min.jsonl"), "--seed", "-1"],
              "--seed must be an integer >= 0, got -1"),
             (["run", "--trace", str(ROOT / "traces" / "azure_conv_2023_5min.jsonl"), "--time-scale", "nan"],
              "--time-scale must be a finite number > 0, got nan")]
    for args, message in cases:
        res = _cli(*args, cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stderr.startswith(f"echosim: error: {message}"), res.stderr
