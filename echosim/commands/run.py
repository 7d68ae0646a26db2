"""`echosim run`: simulate a serving cluster with speculative decoding on a trace or a synthetic workload.

    echosim run --trace traces/azure_conv_2023_5min.jsonl
    echosim run --trace azure_conv_2023_5min --compare-policies ar,eagle3,echo
    echosim run --concurrency 32 --requests 128 --input-len 100 --output-len 500 --policy eagle3
    echosim run --rate 8 --cv 2 --requests 5000 --trace azure_conv_2023_5min   # lengths from the trace
    echosim run --config runs/azure_conv_2023_5min-echo-seed0/config.json          # rerun a run folder's run

bench_serving / vLLM spellings are accepted beside ours: --request-rate (--rate), --burstiness (gamma shape,
CV = 1 / sqrt(burstiness)), --num-prompts (--requests), --block-size (--block-tokens).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from echosim.commands.help_format import DefaultsHelpFormatter
from echosim.errors import UserError
from echosim.sim.policy_spec import parse_policy as _policy
from echosim.sim.policy_spec import policy_label as _label
from echosim.sim.policy_spec import split_items


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="simulate a serving cluster on a trace (or a synthetic workload)",
                              description="Simulate a serving cluster with speculative decoding. Writes a run "
                                          "folder (config.json, requests.csv, iterations.csv, summary.json) and "
                                          "prints a summary table.",
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML or JSON file of settings: flag names as keys (e.g. trace, policy, requests), or a run "
                        "folder's config.json (reruns that run); flags given on the command line win")
    w = p.add_argument_group("workload (trace replay, open-loop rate, or closed loop)")
    w.add_argument("--trace", help="trace file (native JSONL, Azure, Mooncake, BurstGPT, Vidur) or a shipped "
                                   "sample's name; with --rate or --concurrency it only gives the lengths")
    w.add_argument("--format", default=None, help="force the trace format (default: detect)")
    w.add_argument("--skip-bad-lines", action="store_true", help="skip malformed trace rows and count them")
    w.add_argument("--sort", action="store_true", help="sort an unsorted trace by arrival time (stable)")
    w.add_argument("--time-scale", type=float, default=1.0,
                   help="trace replay: multiply arrival times by X (0.5 = twice the rate)")
    w.add_argument("--rate", "--request-rate", dest="rate", type=float, default=None,
                   help="open loop: arrivals per second (Poisson)")
    w.add_argument("--cv", type=float, default=1.0, help="with --rate: gamma gaps with this CV (> 1 = bursty)")
    w.add_argument("--burstiness", type=float, default=None,
                   help="with --rate, bench_serving's spelling: gamma shape of the gaps (CV = 1 / sqrt(burstiness))")
    w.add_argument("--concurrency", type=int, default=None,
                   help="closed loop: keep C requests in flight (the paper's 'batch size')")
    w.add_argument("--requests", "--num-prompts", dest="requests", type=int, default=None,
                   help="number of requests (open loop: required; closed loop: default 4 x concurrency; "
                        "trace: the first N)")
    w.add_argument("--dataset", default=None,
                   help="with --rate/--concurrency: label every request with this dataset (per-dataset acceptance), "
                        "or with --trace draw only the trace's rows of this dataset")
    w.add_argument("--input-len", type=int, default=100, help="fixed prompt length without a trace")
    w.add_argument("--output-len", type=int, default=500, help="fixed output length without a trace")

    c = p.add_argument_group("cluster")
    c.add_argument("--model", default="qwen3-8b", help="target model (catalog name or config.json)")
    c.add_argument("--hardware", default="h100", help="GPU (h100, h200, a100-80gb, or a spec .json)")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per replica")
    c.add_argument("--replicas", type=int, default=1)
    c.add_argument("--router", default="round_robin",
                   help="round_robin | least_outstanding | least_kv | prefix (longest cached prefix first)")
    c.add_argument("--no-prefix-cache", action="store_true",
                   help="turn off the per-replica prefix (radix) cache; it is on by default as in SGLang and acts "
                        "only on traces with Mooncake hash_ids or prompt text")
    c.add_argument("--draft", default=None, help="draft model (default: the catalog's eagle3-<model> head)")
    c.add_argument("--cost-model", default="auto",
                   help="auto (the H100 fit on H100 and H200, roofline elsewhere) | fitted | roofline | a fitted .json")
    c.add_argument("--step-overhead-ms", type=float, default=None, help="CPU overhead per iteration (ms)")
    c.add_argument("--overhead-per-token-ms", type=float, default=0.0,
                   help="extra ms per token through the target (engine overhead the profiles do not see)")
    c.add_argument("--overhead-per-draft-row-ms", type=float, default=0.0, help="extra ms per drafted row")
    c.add_argument("--overhead-per-request-ms", type=float, default=0.0,
                   help="extra ms per request decoded in a step (an engine's sampling, emit and streaming work)")
    c.add_argument("--max-running", type=int, default=256, help="running requests per replica")
    c.add_argument("--max-batched-tokens", type=int, default=8192, help="tokens per iteration per replica")
    c.add_argument("--prefill-forward", choices=("mixed", "separate"), default="mixed",
                   help="prefill chunks in the verify forward (mixed, as vLLM) or in a forward of their own")
    c.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prefill tokens per iteration per replica, as SGLang's --chunked-prefill-size (default: "
                        "what --max-batched-tokens leaves after the verify trees)")
    c.add_argument("--block-tokens", "--block-size", dest="block_tokens", type=int, default=16,
                   help="KV-cache block size (tokens, 1 to 1024)")
    c.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    c.add_argument("--kv-blocks", "--num-kv-blocks", dest="kv_blocks", type=int, default=None,
                   help="KV capacity per replica in blocks (none = from GPU memory minus weights)")

    s = p.add_argument_group("speculation")
    s.add_argument("--policy", default="echo", help="policy name (ar, eagle3, echo, ...) or a policy .json")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="policy setting (JSON value), e.g. --set steps=3 --set 'budget={\"kind\":\"goodput\"}'")
    s.add_argument("--compare-policies", default=None, metavar="A,B,...",
                   help="run the same workload and seed under each policy, one table with ratios to the first; "
                        "each item is a name, a policy .json, or NAME{JSON settings}, e.g. "
                        "'ar,eagle3,echo{\"budget\":{\"kind\":\"goodput\",\"tokens\":31}}'")
    s.add_argument("--acceptance", default=None, help="acceptance preset or fitted file (default: the model's)")
    s.add_argument("--core", default="auto", help="auto | exact | table (see docs/SIMULATOR.md)")

    o = p.add_argument_group("output")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--out", default=None, help="run folder (default: runs/<workload>-<policy>)")
    o.add_argument("--no-save", action="store_true", help="do not write a run folder")
    o.add_argument("--no-plots", action="store_true", help="no PNG plots in the run folder")
    o.add_argument("--records", default=None, help="write per-node draft/accept records (JSON lines) here")
    o.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="goodput SLO on TTFT (ms)")
    o.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput SLO on TPOT (ms)")
    p.set_defaults(func=run, _defaults={a.dest: a.default for a in p._actions if a.dest != "help"},
                   _names={o.lstrip("-").replace("-", "_"): a.dest for a in p._actions for o in a.option_strings})


# A run folder's config.json ({"sim": ..., "workload": ...}) in flag names: what --config reruns.
CLUSTER_FLAGS = {"model": "model", "hardware": "hardware", "tp": "tp", "replicas": "replicas", "router": "router",
                 "draft": "draft", "cost_model": "cost_model", "step_overhead_ms": "step_overhead_ms",
                 "overhead_per_token_ms": "overhead_per_token_ms",
                 "overhead_per_draft_row_ms": "overhead_per_draft_row_ms",
                 "overhead_per_request_ms": "overhead_per_request_ms", "max_running": "max_running",
                 "max_batched_tokens": "max_batched_tokens", "max_prefill_tokens": "max_prefill_tokens",
                 "prefill_forward": "prefill_forward", "block_tokens": "block_tokens",
                 "gpu_memory_utilization": "gpu_memory_utilization", "kv_blocks": "kv_blocks"}


def _run_folder_settings(cfg: dict) -> dict:
    sim, w = cfg["sim"], cfg["workload"]
    flat = {flag: sim["cluster"][key] for key, flag in CLUSTER_FLAGS.items() if key in sim.get("cluster", {})}
    flat.update({k: sim[k] for k in ("policy", "acceptance", "core", "seed", "slo_ttft_ms", "slo_tpot_ms") if k in sim})
    flat.update(trace=w.get("trace"), time_scale=w.get("time_scale", 1.0), requests=w.get("requests"),
                input_len=w.get("prompt_tokens", 100), output_len=w.get("output_tokens", 500),
                skip_bad_lines=w.get("skip_bad_lines", False), format=w.get("trace_format"),
                sort=w.get("sort", False))
    if w.get("kind") == "closed":
        flat["concurrency"] = w["concurrency"]
    elif w.get("kind") in ("poisson", "gamma"):
        flat.update(rate=w["rate_rps"], cv=w.get("cv", 1.0))
    return flat


def apply_config(args) -> None:
    """Settings from --config under the flags the command line left at their defaults."""
    from echosim.sim.config import read_settings_file

    path = args.config
    settings = read_settings_file(path, "config")
    if "sim" in settings and "workload" in settings:
        settings = _run_folder_settings(settings)
    defaults = args._defaults
    for key, value in settings.items():
        dest = args._names.get(str(key).replace("-", "_"), str(key))
        if dest not in defaults or dest in ("config", "help"):
            raise UserError(f"unknown setting {key!r} (settings are `echosim run` flag names)", path=path, field=key)
        if getattr(args, dest) == defaults[dest]:  # the command line did not set it
            setattr(args, dest, value)


# Every number the command takes: (flag, attribute, low, high, low is allowed). Checked before anything runs, so
# that nan, inf, 0 or a negative count is one line naming the flag instead of a traceback, a hang or a NaN table.
_INT_FLAGS = (("--requests", "requests", 1), ("--concurrency", "concurrency", 1), ("--input-len", "input_len", 1),
              ("--output-len", "output_len", 1), ("--tp", "tp", 1), ("--replicas", "replicas", 1),
              ("--max-running", "max_running", 1), ("--max-batched-tokens", "max_batched_tokens", 1),
              ("--max-prefill-tokens", "max_prefill_tokens", 1), ("--block-tokens", "block_tokens", 1),
              ("--kv-blocks", "kv_blocks", 1), ("--seed", "seed", 0))
_POSITIVE = (("--time-scale", "time_scale"), ("--rate", "rate"), ("--cv", "cv"), ("--burstiness", "burstiness"),
             ("--slo-ttft-ms", "slo_ttft_ms"), ("--slo-tpot-ms", "slo_tpot_ms"))
_NON_NEGATIVE = (("--step-overhead-ms", "step_overhead_ms"), ("--overhead-per-token-ms", "overhead_per_token_ms"),
                 ("--overhead-per-draft-row-ms", "overhead_per_draft_row_ms"),
                 ("--overhead-per-request-ms", "overhead_per_request_ms"))


def check_numbers(args) -> None:
    """Raise UserError naming the first flag whose value is out of range (None = not given, skipped). Values may
    come from a --config file too, so their types are checked as well."""
    from traces.reader import MAX_TOKENS

    for flag, name, low in _INT_FLAGS:
        v = getattr(args, name)
        high = MAX_TOKENS if name in ("input_len", "output_len") else 2**63 - 1
        if v is not None and type(v) is not int:
            raise UserError(f"{flag} must be an integer, got {v!r}")
        if v is not None and not low <= v <= high:
            bound = f"in [{low:,}, {high:,}]" if high < 2**63 - 1 else f">= {low}"
            raise UserError(f"{flag} must be an integer {bound}, got {v}")
    for flag, name in _POSITIVE + _NON_NEGATIVE + (("--gpu-memory-utilization", "gpu_memory_utilization"),):
        v = getattr(args, name)
        if v is not None and type(v) not in (int, float):
            raise UserError(f"{flag} must be a number, got {v!r}")
    for flag, name in _POSITIVE:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UserError(f"{flag} must be a finite number > 0, got {v}")
    for flag, name in _NON_NEGATIVE:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise UserError(f"{flag} must be a finite number >= 0, got {v}")
    v = args.gpu_memory_utilization
    if not (math.isfinite(v) and 0 < v <= 1):
        raise UserError(f"--gpu-memory-utilization must be in (0, 1], got {v}")


def _workload(args):
    from echosim.sim.workload import WorkloadSpec

    if args.burstiness is not None:
        if not args.burstiness > 0:
            raise UserError(f"--burstiness must be positive, got {args.burstiness}")
        if args.cv != 1.0:
            raise UserError("give --cv or --burstiness, not both")
        args.cv = 1.0 / args.burstiness ** 0.5
    common = dict(trace=args.trace, requests=args.requests, prompt_tokens=args.input_len,
                  output_tokens=args.output_len, skip_bad_lines=args.skip_bad_lines, trace_format=args.format,
                  time_scale=args.time_scale, sort=args.sort, dataset=args.dataset)
    if args.concurrency is not None and args.rate is not None:
        raise UserError("give --rate (open loop) or --concurrency (closed loop), not both")
    if args.concurrency is not None:
        if args.requests is None:
            common["requests"] = 4 * args.concurrency
        return WorkloadSpec(kind="closed", concurrency=args.concurrency, **common)
    if args.rate is not None:
        return WorkloadSpec(kind="poisson" if args.cv == 1.0 else "gamma", rate_rps=args.rate, cv=args.cv, **common)
    if args.trace is None:
        raise UserError("give a workload: --trace FILE, --rate RPS or --concurrency C")
    if args.requests is not None and args.requests < 1:
        raise UserError(f"--requests must be >= 1, got {args.requests}")
    if args.dataset is not None:
        raise UserError("--dataset draws requests for --rate or --concurrency; a trace replay keeps its own labels")
    return WorkloadSpec(kind="trace", **common)


def run(args) -> int:
    from echosim.sim.config import ClusterConfig, SimConfig
    from echosim.sim.report import format_speed, format_table
    from echosim.sim.simulator import simulate

    if args.config:
        apply_config(args)
    check_numbers(args)
    workload = _workload(args)
    cluster = ClusterConfig(model=args.model, hardware=args.hardware, tp=args.tp, replicas=args.replicas,
                            router=args.router, draft=args.draft, cost_model=args.cost_model,
                            step_overhead_ms=args.step_overhead_ms, max_running=args.max_running,
                            overhead_per_token_ms=args.overhead_per_token_ms,
                            overhead_per_draft_row_ms=args.overhead_per_draft_row_ms,
                            overhead_per_request_ms=args.overhead_per_request_ms,
                            max_batched_tokens=args.max_batched_tokens, max_prefill_tokens=args.max_prefill_tokens,
                            prefill_forward=args.prefill_forward,
                            block_tokens=args.block_tokens,
                            gpu_memory_utilization=args.gpu_memory_utilization, kv_blocks=args.kv_blocks,
                            prefix_cache=not args.no_prefix_cache)
    if isinstance(args.policy, dict):  # from --config: the policy's settings themselves
        if "policy" not in args.policy:
            raise UserError("the config's policy is an object with 'policy'", path=args.config, field="policy")
        inline = json.dumps({k: v for k, v in args.policy.items() if k != "policy"})
        args.policy = args.policy["policy"] + (inline if inline != "{}" else "")
    specs = split_items(args.compare_policies) if args.compare_policies else [args.policy]
    if not specs:
        raise UserError("--compare-policies needs at least one policy")
    policies = [_policy(s, args.set) for s in specs]
    labels = []
    for cfg, s in zip(policies, specs, strict=True):
        label = _label(cfg, s)
        labels.append(label if label not in labels else f"{label}_{len(labels)}")
    if args.records and len(policies) > 1:
        raise UserError("--records writes one run's nodes; use it without --compare-policies")

    root = None
    if not args.no_save:
        if args.out:
            root = Path(args.out)
        else:
            stem = Path(args.trace).name.split(".")[0] if args.trace and workload.kind == "trace" else \
                f"{workload.kind}{args.concurrency or args.rate or ''}"
            root = Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stem}-{'-'.join(labels)}-seed{args.seed}")

    summaries = {}
    for label, cfg in zip(labels, policies, strict=True):
        config = SimConfig(cluster=cluster, policy=cfg, acceptance=args.acceptance or args.model, core=args.core,
                           seed=args.seed, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
        out = None if root is None else (root / label if len(policies) > 1 else root)
        result = simulate(config, workload, out_dir=out, records=args.records, progress=not args.no_progress)
        summaries[label] = result.summary
        if out is not None and not args.no_plots:
            from echosim.plots import plot_run

            plot_run(out, f"{label}: {cluster.model} on {cluster.replicas} x {cluster.tp} x {cluster.hardware}")
    for label in labels:
        warning = (summaries[label].get("load") or {}).get("warning")
        if warning:
            prefix = f"{label}: " if len(labels) > 1 else ""
            print(f"echosim: warning: {prefix}{warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(summaries if len(summaries) > 1 else summaries[labels[0]], indent=2))
        return 0
    title = (f"{cluster.model} on {cluster.replicas} x {cluster.tp} x {cluster.hardware}, "
             f"{_describe(workload)}, seed {args.seed}")
    print(format_table(summaries, title))
    for label in labels:
        s = summaries[label]
        prefix = f"{label}: " if len(labels) > 1 else ""
        print(prefix + format_speed(s))
        if s.get("bad_lines_skipped"):
            print(f"{prefix}skipped {s['bad_lines_skipped']:,} bad trace lines")
    if root is not None:
        print(f"run folder: {root}")
    return 0


def _describe(w) -> str:
    if w.kind == "trace":
        scale = f" x{w.time_scale:g} time" if w.time_scale != 1.0 else ""
        return f"trace {Path(w.trace).name}{scale}"
    lengths = f"lengths from {Path(w.trace).name}" if w.trace else f"in {w.prompt_tokens} / out {w.output_tokens}"
    if w.kind == "closed":
        return f"closed loop at {w.concurrency}, {w.requests:,} requests, {lengths}"
    return f"{w.kind} {w.rate_rps:g} req/s, {w.requests:,} requests, {lengths}"
