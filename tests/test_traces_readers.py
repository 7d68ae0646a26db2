"""Trace readers: every format parses, detection, the real Azure file, round trips, shipped samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import traces
from echosim.errors import UserError
from traces import TraceReader, detect_format, read_arrays, write_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "traces"
AZURE_2023 = Path(__file__).resolve().parents[1] / "traces" / "azure_conv_2023_1h.csv.gz"  # the public CSV, gzipped


@pytest.mark.parametrize("name, fmt", [
    ("mooncake_small.jsonl", "mooncake"),
    ("burstgpt_small.csv", "burstgpt"),
    ("burstgpt_sessions_small.csv", "burstgpt"),
    ("vidur_small.csv", "vidur"),
    ("azure_2024_small.csv", "azure"),
    ("native_full.jsonl", "native"),
])
def test_detection(name, fmt):
    assert detect_format(FIXTURES / name) == fmt


def test_detection_without_extension(tmp_path):
    (tmp_path / "trace").write_text('{"timestamp": 5, "input_length": 3, "output_length": 2}\n')
    assert detect_format(tmp_path / "trace") == "mooncake"
    (tmp_path / "trace.txt").write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,3,2\n")
    assert detect_format(tmp_path / "trace.txt") == "vidur"


def test_detection_rejects_unknown_header(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("time,in,out\n0,1,2\n")
    with pytest.raises(UserError, match=r"x\.csv:1: unknown trace format"):
        detect_format(path)
    with pytest.raises(UserError, match="no such trace file"):
        detect_format(tmp_path / "absent.csv")


def test_mooncake_keeps_hash_ids_and_ms():
    t = read_arrays(FIXTURES / "mooncake_small.jsonl")
    assert t.format == "mooncake"
    np.testing.assert_allclose(t.arrival_s, [0.0, 27.482, 30.535, 30.535, 61.05])
    assert t.prompt_tokens.tolist() == [6755, 7319, 1024, 700, 530]
    assert t.output_tokens.tolist() == [500, 490, 12, 3, 64]
    assert t.hash_ids[1] == tuple(range(13)) + (14, 15)
    # shared prefix: the first 13 blocks (13 x 512 tokens) of requests 0 and 1 are equal
    assert t.hash_ids[0][:13] == t.hash_ids[1][:13]


def test_burstgpt_drops_failures_and_counts_them():
    reader = TraceReader(FIXTURES / "burstgpt_small.csv")
    t = reader.arrays()
    assert t.prompt_tokens.tolist() == [472, 417, 1360, 36]     # the 0-response row (t=45) is gone
    np.testing.assert_allclose(t.arrival_s, [0.0, 113.0, 120.0, 169.0])   # from the first (t=5)
    assert reader.stats.failed_requests == 1 and reader.stats.bad_lines == 0
    assert t.dataset == ["Conversation log", "Conversation log", "API log", "API log"]


def test_burstgpt_newer_columns():
    t = read_arrays(FIXTURES / "burstgpt_sessions_small.csv")
    np.testing.assert_allclose(t.arrival_s, [0.0, 1.25, 3.75])
    assert t.output_tokens.tolist() == [40, 95, 33]
    assert t.stats.failed_requests == 1


def test_vidur_with_index_column():
    t = read_arrays(FIXTURES / "vidur_small.csv")
    np.testing.assert_allclose(t.arrival_s, [0.0, 0.125, 0.5, 2.0])
    assert t.prompt_tokens.tolist() == [2048, 512, 1530, 8]
    assert t.output_tokens.tolist() == [128, 256, 37, 400]


def test_azure_2024_seven_digits_and_utc_suffix():
    t = read_arrays(FIXTURES / "azure_2024_small.csv")
    # 00:00:00.0099300 -> .0300760 is 20.1460 ms; the last is 59.9999999 - 0.0099300 s later (100 ns exact)
    np.testing.assert_allclose(t.arrival_s, [0.0, 0.020146, 1.5, 59.9900699], rtol=0, atol=1e-9)
    assert t.prompt_tokens.tolist() == [4808, 3180, 110, 7242]


def test_native_optional_fields():
    reqs = list(traces.iter_requests(FIXTURES / "native_full.jsonl"))   # a blank line in the middle is fine
    assert [r.arrival_s for r in reqs] == [0.0, 0.25, 1.5]
    assert reqs[0].id == "q1" and reqs[0].dataset == "mt_bench" and reqs[0].priority == 1
    assert reqs[0].prompt == "Compose a travel blog post."
    assert reqs[1].id == "7" and reqs[1].dataset == "math_reasoning" and reqs[1].priority == 0   # "category"
    assert reqs[2].hash_ids == (3, 4, 5) and reqs[2].dataset is None


def test_round_trip_through_native(tmp_path):
    for name in ("native_full.jsonl", "mooncake_small.jsonl", "burstgpt_small.csv"):
        src = read_arrays(FIXTURES / name)
        out = tmp_path / f"{name}.jsonl"
        assert write_jsonl(out, src) == len(src)
        back = read_arrays(out)
        assert back.format == "native"
        np.testing.assert_allclose(back.arrival_s, src.arrival_s, atol=1e-7)
        assert back.prompt_tokens.tolist() == src.prompt_tokens.tolist()
        assert back.output_tokens.tolist() == src.output_tokens.tolist()
        assert back.hash_ids == src.hash_ids and back.dataset == src.dataset and back.id == src.id


def test_requests_and_arrays_agree_across_chunks():
    reader = TraceReader(FIXTURES / "mooncake_small.jsonl", chunk_rows=2)
    chunks = list(reader.chunks())
    assert [len(c) for c in chunks] == [2, 2, 1]
    whole = read_arrays(FIXTURES / "mooncake_small.jsonl")
    assert [r.prompt_tokens for r in reader.requests()] == whole.prompt_tokens.tolist()
    np.testing.assert_allclose(np.concatenate([c.arrival_s for c in chunks]), whole.arrival_s)


def test_real_azure_2023_conv():
    reader = TraceReader(AZURE_2023)
    t = reader.arrays()
    assert reader.format == "azure" and len(t) == 19_366
    assert t.arrival_s[0] == 0.0
    # 18:15:46.6805900 -> 18:15:50.9951690 and the last row 19:14:08.4025270
    assert t.arrival_s[1] == pytest.approx(4.314579, abs=1e-9)
    assert t.arrival_s[-1] == pytest.approx(3501.721937, abs=1e-6)
    assert np.all(np.diff(t.arrival_s) >= 0)
    assert t.prompt_tokens[:4].tolist() == [374, 396, 879, 91]
    assert t.output_tokens[:4].tolist() == [44, 109, 55, 16]
    assert int(t.prompt_tokens.max()) == 14_050 and int(t.output_tokens.max()) == 1_000
    # the same file in small chunks gives the same columns (the origin is kept across chunks)
    small = TraceReader(AZURE_2023, chunk_rows=1000).arrays()
    np.testing.assert_array_equal(small.arrival_s, t.arrival_s)


def test_shipped_azure_sample_is_the_first_five_minutes():
    full = read_arrays(AZURE_2023)
    sample = read_arrays(traces.sample_path("azure_conv_2023_5min"))
    n = int(np.sum(full.arrival_s <= 300.0))
    assert len(sample) == n
    np.testing.assert_allclose(sample.arrival_s, full.arrival_s[:n], atol=1e-7)
    assert sample.prompt_tokens.tolist() == full.prompt_tokens[:n].tolist()


def test_shipped_samples_small_and_loadable():
    assert {"azure_conv_2023_5min", "synthetic_bursty_4rps"} <= set(traces.list_samples())
    for name in traces.list_samples():
        path = traces.sample_path(name)
        assert path.stat().st_size < 1_000_000
        t = read_arrays(path)
        assert len(t) > 100 and t.arrival_s[0] >= 0
    here = Path(traces.__file__).parent
    assert (here / "NOTICE.md").is_file() and "Splitwise" in (here / "NOTICE.md").read_text()
    sample = traces.sample_path("azure_conv_2023_5min")
    for spec in ("traces/azure_conv_2023_5min.jsonl", "azure_conv_2023_5min",
                 "/elsewhere/traces/azure_conv_2023_5min"):
        assert traces.resolve_trace(spec).resolve() == sample
    with pytest.raises(UserError, match="no shipped trace sample 'nope'"):
        traces.sample_path("nope")


def test_sort_option_reorders(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n1.0,10,1\n3.0,30,3\n2.0,20,2\n")
    reader = TraceReader(path, sort=True)
    t = reader.arrays()
    np.testing.assert_allclose(t.arrival_s, [0.0, 1.0, 2.0])
    assert t.prompt_tokens.tolist() == [10, 20, 30] and reader.stats.sorted_rows


def test_byte_order_mark_and_bad_first_line(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
                     .encode("utf-8-sig"))
    assert read_arrays(path).prompt_tokens.tolist() == [374]
    path = tmp_path / "bad_first.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_tokens": 5\n{"arrival_s": 1, "prompt_tokens": 5, "output_tokens": 2}\n')
    with pytest.raises(UserError, match=r"bad_first\.jsonl:1: not valid JSON"):
        read_arrays(path)
    assert len(read_arrays(path, skip_bad_lines=True)) == 1


def test_shipped_azure_hour_is_the_source_of_the_5min_sample():
    # the benchmark's trace ships with the package; the 5-minute sample is its first 300 s, converted
    hour = read_arrays(traces.sample_path("azure_conv_2023_1h"))
    assert hour.format == "azure" and len(hour) == 19_366
    shipped = traces.sample_path("azure_conv_2023_1h")
    assert traces.resolve_trace("traces/azure_conv_2023_1h.csv.gz").resolve() == shipped
    assert traces.resolve_trace("/elsewhere/azure_conv_2023_1h") == shipped
    assert hour.duration_s == pytest.approx(3501.721937, abs=1e-6)
    sample = read_arrays(traces.sample_path("azure_conv_2023_5min"))
    n = len(sample)
    assert n == int(np.sum(hour.arrival_s <= 300.0)) == 1_445
    np.testing.assert_allclose(sample.arrival_s, hour.arrival_s[:n], atol=1e-7)
    assert sample.output_tokens.tolist() == hour.output_tokens[:n].tolist()
