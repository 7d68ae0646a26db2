"""`echosim trace inspect FILE` and `echosim trace convert IN -o OUT.jsonl`: look at and normalise traces."""

from __future__ import annotations

import argparse
import json
import math


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("trace", help="inspect or convert request traces")
    sub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--format", default=None,
                        help="force a format (native, mooncake, azure, burstgpt, vidur); default: detect")
    common.add_argument("--skip-bad-lines", action="store_true",
                        help="skip malformed rows and count them instead of stopping at the first")
    common.add_argument("--sort", action="store_true",
                        help="sort rows by arrival time (reads the whole trace into memory)")

    ins = sub.add_parser("inspect", parents=[common], help="format, requests, duration, rate, lengths")
    ins.add_argument("file", help="trace file, or the name of a shipped sample (e.g. azure_conv_2023_5min)")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins.set_defaults(func=run_inspect)

    conv = sub.add_parser("convert", parents=[common], help="write a trace in the native JSONL schema")
    conv.add_argument("file", help="input trace (any supported format)")
    conv.add_argument("-o", "--output", required=True, help="output .jsonl file")
    conv.add_argument("--time-scale", type=float, default=1.0,
                      help="multiply arrival times by X (0.5 = twice the rate); default 1")
    conv.add_argument("--limit", type=int, default=None, help="keep only the first N requests")
    conv.set_defaults(func=run_convert)


def _reader(args):
    from traces import TraceReader, resolve_trace

    return TraceReader(resolve_trace(args.file), format=args.format, skip_bad_lines=args.skip_bad_lines,
                       sort=args.sort)


def run_inspect(args) -> int:
    from traces import format_summary, summarize

    reader = _reader(args)
    summary = summarize(reader.arrays())
    if args.json:
        print(json.dumps({"path": str(reader.path), **summary.to_dict()}, indent=2))
    else:
        print(format_summary(summary, str(reader.path)))
        for example in reader.stats.examples:
            print(f"  skipped {example}")
    return 0


def run_convert(args) -> int:
    from echosim.errors import UserError
    from traces import write_jsonl
    from traces.generators import scale_time

    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit must be >= 0, got {args.limit}")
    if not (math.isfinite(args.time_scale) and args.time_scale > 0):
        raise UserError(f"--time-scale must be a finite number > 0, got {args.time_scale}")
    reader = _reader(args)

    def chunks():
        left = args.limit
        for chunk in reader.chunks():
            if left is not None:
                if left <= 0:
                    return
                chunk = chunk.select(slice(0, left))
                left -= len(chunk)
            yield scale_time(chunk, args.time_scale) if args.time_scale != 1.0 else chunk

    count = write_jsonl(args.output, chunks())
    stats = reader.stats
    notes = [f"{stats.bad_lines:,} bad lines skipped"] if stats.bad_lines else []
    if stats.failed_requests:
        notes.append(f"{stats.failed_requests:,} failed requests dropped")
    print(f"wrote {count:,} requests ({reader.format} -> native) to {args.output}"
          + (f"; {', '.join(notes)}" if notes else ""))
    return 0
