"""`echosim replay --trace T --url http://127.0.0.1:PORT`: send a trace's requests to a server (ours or SGLang) at
their arrival times and write the per-request CSV and summary JSON (see echo_exec/replay.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from echosim.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "replay", help="replay a trace against an HTTP server (echosim serve or SGLang)",
        description="Send a trace's requests to SGLang's /generate at their arrival times (streamed) and write "
                    "requests.csv, summary.json and config.json. Prompts are the trace's text, or cut from a "
                    "prompt set to the trace's lengths in bytes (= tokens of the byte-level model; a subword "
                    "tokenizer counts fewer: the CSV records the server's count).")
    p.add_argument("--trace", required=True, help="trace file (any supported format) or a shipped sample's name")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:30000")
    p.add_argument("--concurrency", type=int, default=None, help="most requests in flight (default: no bound)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival times by X (0.5 = twice the rate); default 1")
    p.add_argument("--prompts", default=None,
                   help="prompt set (JSONL or text) for traces without text; default "
                        "Spec-Bench, shipped as echo_exec/prompts/spec_bench.jsonl.gz")
    p.add_argument("--out", default=None, help="output folder (default: runs/replay-<time>)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="clip prompts to N tokens")
    p.add_argument("--max-output-tokens", type=int, default=None, help="clip outputs to N tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0, greedy)")
    p.add_argument("--no-stream", action="store_true", help="do not stream (no TTFT/TPOT, only E2E)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request read timeout in seconds (default 600)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=run)


def run(args) -> int:
    import asyncio

    from echo_exec.replay import default_prompt_set, plan_from_trace, replay, summarize, write_outputs

    if not args.url.startswith(("http://", "https://")):
        raise UserError(f"--url must start with http:// or https://, got {args.url!r}")
    if args.concurrency is not None and args.concurrency < 1:
        raise UserError(f"--concurrency must be >= 1, got {args.concurrency}")
    if not args.temperature >= 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be positive, got {args.timeout}")
    items = plan_from_trace(args.trace, time_scale=args.time_scale, limit=args.limit, prompt_set=args.prompts,
                            max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("replay-%Y%m%d-%H%M%S")
    done = [0, 0]

    def progress(rec) -> None:
        done[0] += 1
        done[1] += not rec.ok
        if not args.quiet and sys.stderr.isatty():
            print(f"\r{done[0]}/{len(items)} requests, {done[1]} failed", end="", file=sys.stderr, flush=True)

    print(f"replaying {len(items)} requests over {items[-1].scheduled_s:.1f} s to {args.url}", file=sys.stderr)
    records = asyncio.run(replay(args.url, items, concurrency=args.concurrency, temperature=args.temperature,
                                 stream=not args.no_stream, request_timeout_s=args.timeout, progress=progress))
    if not args.quiet and sys.stderr.isatty():
        print(file=sys.stderr)
    summary = summarize(records)
    config = {"command": "replay", "trace": args.trace, "url": args.url, "concurrency": args.concurrency,
              "time_scale": args.time_scale, "limit": args.limit, "max_prompt_tokens": args.max_prompt_tokens,
              "max_output_tokens": args.max_output_tokens, "temperature": args.temperature,
              "stream": not args.no_stream, "prompts": str(args.prompts or default_prompt_set())}
    paths = write_outputs(out, records, summary, config)

    def fmt(x, unit=""):
        return "n/a" if x is None else f"{x:,.1f}{unit}"

    print(f"{summary['completed']}/{summary['completed'] + summary['failed']} requests completed in "
          f"{summary['makespan_s']:.1f} s; {fmt(summary['throughput_tok_s'])} output tok/s; MAT {fmt(summary['mat'])}"
          f"; TTFT p50 {fmt(summary['ttft_ms']['p50'], ' ms')}; TPOT p50 {fmt(summary['tpot_ms']['p50'], ' ms')}")
    if summary["failed"]:
        print(f"{summary['failed']} requests failed, e.g. {summary['errors'][0]}", file=sys.stderr)
    print(f"wrote {paths['requests']} and {paths['summary']}")
    return 0 if summary["completed"] else 1
