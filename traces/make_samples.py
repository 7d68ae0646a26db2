"""Rebuild the shipped samples: `python -m traces.make_samples [path/to/azure_llm_2023_conv.csv]`.

- azure_conv_2023_5min.jsonl: the first 5 minutes (arrival_s <= 300) of the Azure LLM inference trace 2023,
  conversation service (CC-BY-4.0, see NOTICE.md), converted to the native schema.
- synthetic_bursty_4rps.jsonl: 600 requests, gamma arrivals at 4 req/s with CV 2, lengths resampled from the
  Azure sample above; seed 0.
- azure_conv_2023_1h.csv.gz: the whole hour (19,366 requests) as published, byte for byte, gzip-compressed (level 9,
  no file name or time in the gzip header, so that a rebuild gives the same bytes)."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

from traces.generators import synthetic_trace
from traces.reader import read_arrays
from traces.samples import HERE
from traces.writer import write_jsonl

AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else AZURE
    azure = read_arrays(source)
    first = azure.select(azure.arrival_s <= 300.0)
    write_jsonl(HERE / "azure_conv_2023_5min.jsonl", first)
    bursty = synthetic_trace(600, rate_rps=4.0, cv=2.0, lengths_from=first, seed=0)
    write_jsonl(HERE / "synthetic_bursty_4rps.jsonl", bursty)
    with open(HERE / "azure_conv_2023_1h.csv.gz", "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(source.read_bytes())
    for name in ("azure_conv_2023_5min.jsonl", "synthetic_bursty_4rps.jsonl", "azure_conv_2023_1h.csv.gz"):
        print(f"{name}: {(HERE / name).stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
