"""Bad trace input: errors name file, line and field; skip_bad_lines skips and counts; streaming memory."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

from echosim.errors import UserError
from traces import TraceReader, iter_chunks, read_arrays, write_jsonl
from traces.errors import TraceError
from traces.generators import synthetic_trace

GOOD = '{"arrival_s": 0.5, "prompt_tokens": 10, "output_tokens": 5}\n'


def _native(tmp_path, bad_line: str, name="t.jsonl"):
    """A native trace whose 3rd line is `bad_line`, between good lines."""
    path = tmp_path / name
    path.write_text(GOOD + '{"arrival_s": 1.0, "prompt_tokens": 11, "output_tokens": 6}\n' + bad_line + "\n"
                    + '{"arrival_s": 9.0, "prompt_tokens": 12, "output_tokens": 7}\n')
    return path


@pytest.mark.parametrize("bad_line, field, message", [
    ('{"arrival_s": 2.0, "prompt_tokens": 10, "output_tokens": 5', None, "not valid JSON"),
    ('[2.0, 10, 5]', None, "must be a JSON object"),
    ('{"arrival_s": 2.0, "prompt_tokens": -3, "output_tokens": 5}', "prompt_tokens",
     r"must be a positive integer \(>= 1\), got -3"),
    ('{"arrival_s": 2.0, "prompt_tokens": 10, "output_tokens": 0}', "output_tokens", "positive integer"),
    ('{"arrival_s": 2.0, "prompt_tokens": 10}', "output_tokens", "missing"),
    ('{"arrival_s": 2.0, "prompt_tokens": 10.5, "output_tokens": 5}', "prompt_tokens", "must be an integer"),
    ('{"arrival_s": 2.0, "prompt_tokens": "ten", "output_tokens": 5}', "prompt_tokens",
     "not a number: 'ten'"),
    ('{"arrival_s": NaN, "prompt_tokens": 10, "output_tokens": 5}', "arrival_s", "not a finite number: NaN"),
    ('{"arrival_s": "soon", "prompt_tokens": 10, "output_tokens": 5}', "arrival_s", "not a number: 'soon'"),
    ('{"prompt_tokens": 10, "output_tokens": 5}', "arrival_s", "missing"),
    ('{"arrival_s": 0.75, "prompt_tokens": 10, "output_tokens": 5}', "arrival_s",
     r"arrival 0\.75 s is earlier than 1 s of a request before it \(line 2\): "
     "the trace is not sorted by time"),
    ('{"arrival_s": 2.0, "prompt_tokens": 10, "output_tokens": 5, "priority": "high"}', "priority",
     "must be an integer"),
    ('{"arrival_s": 2.0, "prompt_tokens": 10, "output_tokens": 5, "hash_ids": [1, "a"]}', "hash_ids",
     "list of integers"),
])
def test_native_bad_line_names_file_line_field(tmp_path, bad_line, field, message):
    path = _native(tmp_path, bad_line)
    with pytest.raises(UserError) as info:
        read_arrays(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    text = str(err)
    assert text.startswith(f"{path}:3: ")
    if field:
        assert f"field '{field}'" in text
    assert re.search(message, text), text
    # the same file with skip_bad_lines: the bad row is dropped and counted, the rest is read
    reader = TraceReader(path, skip_bad_lines=True)
    t = reader.arrays()
    assert t.prompt_tokens.tolist() == [10, 11, 12]
    assert reader.stats.bad_lines == 1 and t.stats.bad_lines == 1
    assert reader.stats.examples[0].startswith("line 3")


def test_unsorted_message_says_how_to_fix(tmp_path):
    path = _native(tmp_path, '{"arrival_s": 0.75, "prompt_tokens": 10, "output_tokens": 5}')
    with pytest.raises(UserError, match=r"sort=True, CLI --sort"):
        read_arrays(path)
    t = read_arrays(path, sort=True)
    np.testing.assert_allclose(t.arrival_s, [0.5, 0.75, 1.0, 9.0])


def test_unsorted_across_chunks_is_caught(tmp_path):
    path = _native(tmp_path, '{"arrival_s": 0.75, "prompt_tokens": 10, "output_tokens": 5}')
    with pytest.raises(UserError) as info:
        read_arrays(path, chunk_rows=2)   # the late row is the first of the second chunk
    assert info.value.line == 3 and "line 2" in str(info.value)


def test_negative_native_time(tmp_path):
    path = tmp_path / "neg.jsonl"
    path.write_text('{"arrival_s": -1, "prompt_tokens": 10, "output_tokens": 5}\n' + GOOD)
    with pytest.raises(UserError, match=r"neg\.jsonl:1: field 'arrival_s': must be >= 0 seconds, got -1"):
        read_arrays(path)


def test_first_error_wins_and_skip_counts_all(tmp_path):
    path = tmp_path / "many.jsonl"
    lines = [GOOD] * 10
    lines[3] = '{"arrival_s": 1, "prompt_tokens": -1, "output_tokens": 5}\n'
    lines[5] = "not json\n"
    lines[7] = '{"arrival_s": 1, "prompt_tokens": 4}\n'
    path.write_text("".join(lines))
    with pytest.raises(UserError) as info:
        read_arrays(path)
    assert (info.value.line, info.value.field) == (4, "prompt_tokens")
    reader = TraceReader(path, skip_bad_lines=True)
    t = reader.arrays()
    assert len(t) == 7 and reader.stats.bad_lines == 3
    assert [e.split(":")[0] for e in reader.stats.examples] == [
        "line 4, field 'prompt_tokens'", "line 6", "line 8, field 'output_tokens'"]


@pytest.mark.parametrize("row, field, message", [
    ("2023-11-16 18:15:47.0000000,,44", "ContextTokens", "missing"),
    ("2023-11-16 18:15:47.0000000,-5,44", "ContextTokens", "positive integer"),
    ("2023-11-16 18:15:47.0000000,12,4x", "GeneratedTokens", "not a number: '4x'"),
    ("yesterday,12,44", "TIMESTAMP", "not a timestamp"),
    (",12,44", "TIMESTAMP", "missing"),
    ("2023-11-16 18:15:47.0000000,12", "GeneratedTokens", "missing"),
    ("2023-11-16 18:15:40.0000000,12,44", "TIMESTAMP", "not sorted"),
])
def test_azure_csv_bad_rows(tmp_path, row, field, message):
    path = tmp_path / "az.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
                    f"{row}\n2023-11-16 18:15:48.0000000,100,10\n")
    with pytest.raises(UserError) as info:
        read_arrays(path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 3, field)
    assert message in str(info.value)
    t = read_arrays(path, skip_bad_lines=True)
    assert t.prompt_tokens.tolist() == [374, 100] and t.stats.bad_lines == 1
    np.testing.assert_allclose(t.arrival_s, [0.0, 1.31941])


@pytest.mark.parametrize("content, line, field", [
    ('{"timestamp": 10, "input_length": 5, "output_length": 2}\n{"timestamp": 5, "input_length": 5, '
     '"output_length": 2}\n', 2, "timestamp"),
    ('{"timestamp": 10, "input_length": 5, "output_length": 2}\n{"timestamp": 12, "input_length": null, '
     '"output_length": 2}\n', 2, "input_length"),
])
def test_mooncake_bad_rows_use_its_field_names(tmp_path, content, line, field):
    path = tmp_path / "m.jsonl"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        read_arrays(path)
    assert (info.value.line, info.value.field) == (line, field)


def test_burstgpt_bad_time(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "1,ChatGPT,10,5,15,API log\nnan,ChatGPT,10,5,15,API log\n")
    with pytest.raises(UserError, match=r"b\.csv:3: field 'Timestamp': not a finite number: 'nan'"):
        read_arrays(path)


def test_cli_error_is_one_line(tmp_path, capsys):
    from echosim.cli import main

    path = _native(tmp_path, '{"arrival_s": 2.0, "prompt_tokens": -3, "output_tokens": 5}')
    assert main(["trace", "inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"echosim: error: {path}:3: field 'prompt_tokens': "
                   "must be a positive integer (>= 1), got -3")


# --- streaming memory -----------------------------------------------------------------------------

def _write_synthetic(path, n: int, chunk: int = 100_000) -> None:
    """A synthetic native trace written chunk by chunk from a generator (never whole in memory)."""
    def chunks():
        offset = 0.0
        for k, start in enumerate(range(0, n, chunk)):
            part = synthetic_trace(min(chunk, n - start), rate_rps=100.0, seed=k)
            part.arrival_s += offset
            offset = float(part.arrival_s[-1])
            yield part
    write_jsonl(path, chunks())


def _stream_peak_bytes(path) -> tuple[int, int]:
    tracemalloc.start()
    try:
        count = 0
        for chunk in iter_chunks(path, chunk_rows=8192):
            count += len(chunk)
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_does_not_grow_with_length(tmp_path):
    small, large = tmp_path / "s.jsonl", tmp_path / "l.jsonl"
    _write_synthetic(small, 40_000)
    _write_synthetic(large, 200_000)
    n_small, peak_small = _stream_peak_bytes(small)
    n_large, peak_large = _stream_peak_bytes(large)
    assert (n_small, n_large) == (40_000, 200_000)
    # 5x the requests, the same peak (one chunk): a growing reader would need > 5x
    assert peak_large < 1.3 * peak_small + 1_000_000, (peak_small, peak_large)


@pytest.mark.slow
def test_one_million_requests_stream_in_bounded_memory(tmp_path):
    path = tmp_path / "1m.jsonl"
    _write_synthetic(path, 1_000_000)
    n, peak = _stream_peak_bytes(path)
    assert n == 1_000_000
    assert peak < 10_000_000, peak   # one 8,192-row chunk; the whole trace as Requests would be > 100 MB


@pytest.mark.parametrize("content, name, message", [
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "az.csv", "the trace has no requests (only a header"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n\n\n", "az.csv", "the trace has no requests (only a header"),
    ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n5,ChatGPT,10,0,10,API log\n",
     "b.csv", "no requests left to run (1 failed requests (0 output tokens) dropped)"),
])
def test_empty_after_filtering_is_an_error(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TraceError, match=re.escape(message)) as info:
        read_arrays(path)
    assert info.value.path == str(path)


def test_all_rows_skipped_is_an_error_that_shows_the_first(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "5,ChatGPT,abc,10,10,API log\n6,ChatGPT,10,true,10,API log\n")
    with pytest.raises(TraceError) as info:
        read_arrays(path, skip_bad_lines=True)
    assert str(info.value) == (f"{path}: no requests left to run (2 bad lines skipped); first: line 2, field "
                               "'Request tokens': not a number: 'abc'")


@pytest.mark.parametrize("line, field, message", [
    ('{"arrival_s": true, "prompt_tokens": 10, "output_tokens": 5}', "arrival_s", "not a number: true"),
    ('{"arrival_s": 2, "prompt_tokens": false, "output_tokens": 5}', "prompt_tokens", "not a number: false"),
    ('{"arrival_s": 2, "prompt_tokens": 10, "output_tokens": 1e30}', "output_tokens", "must be at most 10,000,000"),
    ('{"arrival_s": 2, "prompt_tokens": 10, "output_tokens": 9223372036854775808}', "output_tokens", "at most"),
    ('{"arrival_s": 2, "prompt_tokens": 1' + "0" * 400 + ', "output_tokens": 5}', "prompt_tokens", "at most"),
    ('{"arrival_s": 2e12, "prompt_tokens": 10, "output_tokens": 5}', "arrival_s", "must be at most 1e+12 seconds"),
    ('{"arrival_s": 2, "prompt_tokens": 10, "output_tokens": 5, "priority": 1e30}', "priority", "within +-2^63"),
    ('{"arrival_s": 2, "prompt_tokens": 10, "output_tokens": 5, "hash_ids": [-1]}', "hash_ids", "[0, 2^63)"),
])
def test_the_same_rule_on_every_line(tmp_path, line, field, message):
    # line 1 and line 3 (after a good line) and line 20,000 (a later chunk) get the same verdict
    for before in (0, 2, 19_999):
        path = tmp_path / f"t{before}.jsonl"
        path.write_text("".join(f'{{"arrival_s": {i * 1e-4}, "prompt_tokens": 10, "output_tokens": 5}}\n'
                                for i in range(before)) + line + "\n")
        with pytest.raises(TraceError) as info:
            read_arrays(path, format="native")
        assert (info.value.line, info.value.field) == (before + 1, field)
        assert message in str(info.value)


@pytest.mark.parametrize("value", ["now", "today", "2023", "9999-01-01 00:00:00", "-2023-01-01 00:00:00",
                                   "\u00b2\u00b2\u00b2\u00b2-01-01 00:00:00"])
def test_azure_time_that_numpy_would_misread(tmp_path, value):
    path = tmp_path / "az.csv"
    path.write_text(f"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,5\n{value},10,5\n")
    with pytest.raises(TraceError, match="not a timestamp") as info:
        read_arrays(path)
    assert (info.value.line, info.value.field) == (3, "TIMESTAMP")


def test_gzip_and_csv_damage_named(tmp_path):
    import gzip

    whole = gzip.compress(GOOD.encode() * 3000)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:-20])
    with pytest.raises(TraceError, match="truncated gzip file"):
        read_arrays(tmp_path / "cut.jsonl.gz")
    (tmp_path / "plain.csv.gz").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(TraceError, match="not a gzip file"):
        read_arrays(tmp_path / "plain.csv.gz")
    big = tmp_path / "big.csv"
    big.write_text('arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n"' + "x" * 200_000 + '",1,1\n')
    with pytest.raises(TraceError, match="not a readable CSV row") as info:
        read_arrays(big)
    assert info.value.line == 3
    wrong = tmp_path / "w.csv"
    wrong.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(TraceError, match="the CSV header has no column 'arrived_at'") as info:
        read_arrays(wrong, format="vidur")
    assert (info.value.line, info.value.field) == (1, "arrived_at")


def test_deeply_nested_json_is_a_bad_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(GOOD + '{"arrival_s": 1, "prompt_tokens": 10, "output_tokens": 5, "x": '
                    + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(TraceError, match="nested too deeply") as info:
        read_arrays(path)
    assert info.value.line == 2
    assert len(read_arrays(path, skip_bad_lines=True)) == 1
