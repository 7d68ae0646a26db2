"""Traces: the native JSONL schema, readers for public trace formats, synthetic workload generators, and small
shipped samples. See traces/README.md."""

from traces.formats import FORMATS, detect_format
from traces.reader import TraceReader, iter_chunks, iter_requests, read_arrays
from traces.request import ReadStats, Request, TraceArrays
from traces.samples import list_samples, resolve_trace, sample_path
from traces.summary import TraceSummary, format_summary, summarize
from traces.writer import write_jsonl

__all__ = [
    "FORMATS", "ReadStats", "Request", "TraceArrays", "TraceReader", "TraceSummary", "detect_format",
    "format_summary", "iter_chunks", "iter_requests", "list_samples", "read_arrays", "resolve_trace",
    "sample_path", "summarize", "write_jsonl",
]
