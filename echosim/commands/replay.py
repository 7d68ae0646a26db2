"""`echosim replay --trace T --base-url http://127.0.0.1:PORT`: send a trace's requests to a server (ours, SGLang,
vLLM or any OpenAI-compatible one) at their arrival times and write the per-request CSV, the chunk timeline and the
summary JSON (see echo_exec/replay.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from echosim.commands.help_format import DefaultsHelpFormatter
from echosim.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "replay", help="replay a trace against an HTTP server (echosim serve, SGLang, vLLM, OpenAI-compatible)",
        formatter_class=DefaultsHelpFormatter,
        description="Send a trace's requests to a server at their arrival times (streamed) and write "
                    "requests.csv, chunks.csv (every chunk's arrival), summary.json (ours and bench_serving's key "
                    "names) and config.json. Prompts are the trace's text, or cut from a prompt set to the trace's "
                    "lengths: in --tokenizer's tokens when given, else in bytes (= tokens of the byte-level tiny "
                    "models). The CSV records the server's own prompt_tokens beside the trace's.")
    p.add_argument("--trace", required=True, help="trace file (any supported format) or a shipped sample's name")
    p.add_argument("--base-url", "--url", dest="url", required=True,
                   help="server base URL, e.g. http://127.0.0.1:30000")
    p.add_argument("--backend", choices=("sglang", "openai", "openai-chat"), default="sglang",
                   help="API: SGLang's /generate, OpenAI's /v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None,
                   help="model name for the OpenAI backends (none = the first one /v1/models lists)")
    p.add_argument("--tokenizer", default=None,
                   help="Hugging Face tokenizer directory (or tokenizer.json) of the served model: prompts are built "
                        "to the trace's exact token counts in it")
    p.add_argument("--prompt-mode", choices=("text", "ids"), default="text",
                   help="send prompts as text, or as token ids (needs --tokenizer; not with openai-chat)")
    p.add_argument("--max-concurrency", "--concurrency", dest="concurrency", type=int, default=None,
                   help="most requests in flight (none = no bound)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="redraw arrivals at this many requests/s as bench_serving does (inf = all at once; none = "
                        "the trace's own arrival times)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="with --request-rate: the gamma shape of the gaps (1 = Poisson, < 1 burstier)")
    p.add_argument("--seed", type=int, default=0, help="seed of redrawn arrivals")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply the trace's arrival times by X (0.5 = twice the rate)")
    p.add_argument("--prompts", default=None,
                   help="prompt set (JSONL or text) for traces without text (none = Spec-Bench, shipped as "
                        "echo_exec/prompts/spec_bench.jsonl.gz)")
    p.add_argument("--out", default=None, help="output folder (none = runs/replay-<time>)")
    p.add_argument("--num-prompts", "--limit", dest="limit", type=int, default=None,
                   help="replay only the first N requests")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="clip prompts to N tokens")
    p.add_argument("--max-output-tokens", type=int, default=None, help="clip outputs to N tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--warmup-requests", type=int, default=1,
                   help="requests sent first, one at a time, and not recorded")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="TTFT SLO for goodput and SLO attainment")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0, help="TPOT SLO for goodput and SLO attainment")
    p.add_argument("--no-stream", action="store_true", help="do not stream (no TTFT/TPOT/ITL, only E2E)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request read timeout in seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots in the output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    import asyncio

    from echo_exec.replay import HFTokenizer, default_prompt_set, plan_from_trace, replay, summarize, write_outputs

    if not args.url.startswith(("http://", "https://")):
        raise UserError(f"--base-url must start with http:// or https://, got {args.url!r}")
    if args.concurrency is not None and args.concurrency < 1:
        raise UserError(f"--max-concurrency must be >= 1, got {args.concurrency}")
    if not args.temperature >= 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be positive, got {args.timeout}")
    if args.warmup_requests < 0:
        raise UserError(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    for flag, v in (("--slo-ttft-ms", args.slo_ttft_ms), ("--slo-tpot-ms", args.slo_tpot_ms)):
        if not v > 0:
            raise UserError(f"{flag} must be positive, got {v}")
    if args.prompt_mode == "ids" and args.backend == "openai-chat":
        raise UserError("--prompt-mode ids: chat messages are text; use --backend openai or sglang")
    tokenizer = HFTokenizer(args.tokenizer) if args.tokenizer else None
    items = plan_from_trace(args.trace, time_scale=args.time_scale, limit=args.limit, prompt_set=args.prompts,
                            max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
                            tokenizer=tokenizer, prompt_mode=args.prompt_mode, request_rate=args.request_rate,
                            burstiness=args.burstiness, seed=args.seed)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("replay-%Y%m%d-%H%M%S")
    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="req", file=sys.stderr)

    def progress(rec) -> None:
        if bar is not None:
            bar.update(1)
            if not rec.ok:
                bar.set_postfix_str("failures")

    print(f"replaying {len(items)} requests over {items[-1].scheduled_s:.1f} s to {args.url} ({args.backend})",
          file=sys.stderr)
    server: dict = {}
    records = asyncio.run(replay(args.url, items, concurrency=args.concurrency, temperature=args.temperature,
                                 stream=not args.no_stream, request_timeout_s=args.timeout, backend=args.backend,
                                 model=args.model, warmup_requests=args.warmup_requests, progress=progress,
                                 server=server))
    if bar is not None:
        bar.close()
    summary = summarize(records, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, server=server)
    config = {"command": "replay", "trace": args.trace, "url": args.url, "backend": args.backend,
              "model": args.model, "tokenizer": args.tokenizer, "prompt_mode": args.prompt_mode,
              "max_concurrency": args.concurrency, "request_rate": args.request_rate, "burstiness": args.burstiness,
              "seed": args.seed, "time_scale": args.time_scale, "num_prompts": args.limit,
              "max_prompt_tokens": args.max_prompt_tokens, "max_output_tokens": args.max_output_tokens,
              "temperature": args.temperature, "warmup_requests": args.warmup_requests,
              "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms, "stream": not args.no_stream,
              "prompts": str(args.prompts or default_prompt_set())}
    paths = write_outputs(out, records, summary, config)
    if not args.no_plots and summary["completed"]:
        from echosim.plots import plot_run

        plot_run(out, f"replay of {Path(args.trace).name} against {args.url}")

    def fmt(x, unit=""):
        return "n/a" if x is None else f"{x:,.1f}{unit}"

    itl = summary["itl_ms"] or {}
    print(f"{summary['completed']}/{summary['completed'] + summary['failed']} requests completed in "
          f"{summary['makespan_s']:.1f} s; {fmt(summary['throughput_tok_s'])} output tok/s; MAT {fmt(summary['mat'])}"
          f"; TTFT p50 {fmt(summary['ttft_ms']['p50'], ' ms')}; TPOT p50 {fmt(summary['tpot_ms']['p50'], ' ms')}"
          f"; ITL p50 {fmt(itl.get('p50'), ' ms')}")
    if summary["failed"]:
        print(f"{summary['failed']} requests failed, e.g. {summary['errors'][0]}", file=sys.stderr)
    print(f"wrote {paths['requests']} and {paths['summary']}")
    return 0 if summary["completed"] else 1
