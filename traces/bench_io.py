"""Trace I/O speed and streaming memory: `python -m traces.bench_io [N]` (default N = 1,000,000 requests).

Writes an N-request synthetic native trace to a temporary folder, then times reading it back and measures the
peak traced memory (tracemalloc) of streaming it chunk by chunk."""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from traces.generators import synthetic_trace
from traces.reader import iter_chunks, iter_requests, read_arrays
from traces.writer import write_jsonl


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        t = time.perf_counter()
        write_jsonl(path, synthetic_trace(n, rate_rps=100.0, seed=1))
        print(f"write_jsonl     {n:,} requests: {time.perf_counter() - t:.2f} s "
              f"({path.stat().st_size / 1e6:.0f} MB)")
        t = time.perf_counter()
        read_arrays(path)
        print(f"read_arrays     {n:,} requests: {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        count = sum(1 for _ in iter_requests(path))
        print(f"iter_requests   {count:,} requests: {time.perf_counter() - t:.2f} s")
        for rows in (8_192, 16_384, 65_536):
            tracemalloc.start()
            count = sum(len(c) for c in iter_chunks(path, chunk_rows=rows))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(f"iter_chunks     chunk_rows={rows:,}: peak traced memory {peak / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
