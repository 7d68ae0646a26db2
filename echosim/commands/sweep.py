"""`echosim sweep`: a grid of simulations (policies x load x models x hardware x TP x replicas x traces x seeds),
in parallel, resumable; a tidy table, the advisor's schedule, plots; or a capacity search (docs/SWEEP.md).

    echosim sweep --policies ar,eagle3,echo --concurrency 1,4,16,64 --requests 64 --out runs/sweep-demo
    echosim sweep --file sweep.yaml --ray
    echosim sweep --policies ar,eagle3,echo --capacity rate --target 0.99 --slo-ttft-ms 2000 --slo-tpot-ms 60
"""

from __future__ import annotations

import sys
from pathlib import Path

from echosim.commands.help_format import DefaultsHelpFormatter
from echosim.errors import UserError


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {text!r}") from None


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# flag -> (sweep-file key, parser)
GRID_FLAGS = {
    "rates": ("rates", _floats), "concurrency": ("concurrency", _ints), "loads": ("loads", _floats),
    "models": ("models", _strs), "hardware": ("hardware", _strs), "tp": ("tp", _ints),
    "replicas": ("replicas", _ints), "traces": ("traces", _strs), "seeds": ("seeds", _ints),
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="a grid of simulations in parallel: tidy table, advisor, plots; or a capacity search",
        formatter_class=DefaultsHelpFormatter,
        description="Simulate every cell of a grid (policies and their settings x request rates or concurrencies "
                    "x models x hardware x TP x replicas x traces x seeds) on a process pool (default) or Ray. "
                    "Cells are keyed by a hash of their resolved config: a rerun skips finished cells. Writes "
                    "sweep.csv/.parquet (a row per cell, every metric), crossover.csv, advice.csv/.json (best "
                    "policy per load by goodput), a run folder per cell (cells/<key>/) and plots.")
    p.add_argument("--file", default=None, help="sweep file (YAML or JSON; flags below replace its values)")
    g = p.add_argument_group("grid (comma-separated lists)")
    g.add_argument("--policies", default=None, metavar="A,B,...",
                   help="policies as `echosim run --compare-policies` reads them (NAME, NAME{JSON}, a .json)")
    g.add_argument("--rates", default=None, help="open loop: request rates (req/s)")
    g.add_argument("--concurrency", default=None, help="closed loop: concurrencies (= batch sizes)")
    g.add_argument("--loads", default=None, help="trace replay: rate multipliers (2 = twice the trace's rate)")
    g.add_argument("--models", default=None)
    g.add_argument("--hardware", default=None)
    g.add_argument("--tp", default=None)
    g.add_argument("--replicas", default=None)
    g.add_argument("--traces", default=None, help="trace files or shipped samples' names")
    g.add_argument("--seeds", default=None)
    w = p.add_argument_group("every cell")
    w.add_argument("--requests", type=int, default=None,
                   help="requests per cell (default: 4 x concurrency; 200 at a rate; the whole trace)")
    w.add_argument("--requests-per-slot", type=int, default=None,
                   help="closed loop without --requests: requests = this x concurrency (default 4)")
    w.add_argument("--input-len", type=int, default=None, help="prompt length without a trace (default 100)")
    w.add_argument("--output-len", type=int, default=None, help="output length without a trace (default 500)")
    w.add_argument("--cv", type=float, default=None, help="with rates: gamma gaps with this CV (default 1)")
    w.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput SLO on TTFT (default 2000 ms)")
    w.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput SLO on TPOT (default 100 ms)")
    c = p.add_argument_group("capacity search (instead of the grid's load axis)")
    c.add_argument("--capacity", choices=("rate", "replicas"), default=None,
                   help="rate: the highest rate meeting the target; replicas: the fewest replicas for each rate")
    c.add_argument("--target", type=float, default=None, help="SLO attainment to meet (default 0.99)")
    c.add_argument("--tol", type=float, default=None, help="relative tolerance of the rate (default 0.05)")
    c.add_argument("--rate-min", type=float, default=None, help="lowest rate probed (default 0.25 req/s)")
    c.add_argument("--rate-max", type=float, default=None, help="highest rate probed (default 256 req/s)")
    c.add_argument("--replicas-max", type=int, default=None, help="most replicas probed (default 64)")
    c.add_argument("--duration-s", type=float, default=None,
                   help="each probe sends at least rate x this many requests (default 60 s of arrivals)")
    r = p.add_argument_group("running")
    r.add_argument("--out", default=None, help="output folder (default runs/sweep-<file stem> or runs/sweep)")
    r.add_argument("--jobs", type=int, default=None, help="parallel cells (default: the CPUs this process may use)")
    r.add_argument("--serial", action="store_true", help="run the cells one after another in this process")
    r.add_argument("--ray", action="store_true", help="run the cells on Ray (pip install 'echo-spec[ray]')")
    r.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster ('auto' or host:port; its workers must see --out); default: "
                        "start a local Ray")
    r.add_argument("--no-plots", action="store_true", help="no PNG plots")
    r.add_argument("--cell-plots", action="store_true", help="also plot each cell's run folder")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def build_spec(args):
    """The sweep: the file's mapping with the flags laid over it, validated."""
    from echosim.sim.policy_spec import split_items
    from echosim.sweep.grid import load_spec_file, parse_spec

    data = load_spec_file(args.file) if args.file else {}
    if args.policies is not None:
        data["policies"] = split_items(args.policies)
    for flag, (key, parse) in GRID_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            data[key] = parse(value)
            if key in ("rates", "concurrency", "loads"):
                for other in {"rates", "concurrency", "loads"} - {key}:
                    data.pop(other, None)  # a load axis from the flags replaces the file's
    for flag, key in (("requests", "requests"), ("requests_per_slot", "requests_per_slot"),
                      ("input_len", "input_len"), ("output_len", "output_len"), ("cv", "cv"),
                      ("slo_ttft_ms", "slo_ttft_ms"), ("slo_tpot_ms", "slo_tpot_ms")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    cap = dict(data.get("capacity") or {})
    if args.capacity is not None:
        cap["search"] = args.capacity
    for flag in ("target", "tol", "rate_min", "rate_max", "replicas_max", "duration_s"):
        if getattr(args, flag) is not None:
            cap[flag] = getattr(args, flag)
    if cap:
        data["capacity"] = cap
        if cap.get("search", "rate") == "rate" and not any(k in data for k in ("rates", "concurrency", "loads")):
            data["rates"] = [cap.get("rate_min", 0.25)]  # the search sets the rate; any value passes the check
    return parse_spec(data, path=args.file)


def run(args) -> int:
    from echosim.sweep.api import run_capacity, run_sweep

    if args.ray and args.serial:
        raise UserError("give --ray or --serial, not both")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    spec = build_spec(args)
    backend = "ray" if args.ray or args.ray_address else "serial" if args.serial else "pool"
    out = Path(args.out) if args.out else Path("runs") / (f"sweep-{Path(args.file).stem}" if args.file else "sweep")
    common = dict(backend=backend, jobs=args.jobs, ray_address=args.ray_address, progress=not args.no_progress,
                  plots=not args.no_plots, path=args.file)
    if spec.capacity is not None:
        res = run_capacity(spec, out, **common)
        cols = [c for c in ("policy", "model", "hardware", "tp", "replicas", "load", "trace", "seed", "status",
                            "capacity", "first_failing", "probes") if c in res.table.columns]
        print(res.table[cols].to_string(index=False))
        print(_paths(res))
        return 0
    try:
        res = run_sweep(spec, out, cell_plots=args.cell_plots, **common)
    except KeyboardInterrupt:
        print(f"echosim: interrupted; finished cells are kept in {out / 'cells'} and listed in "
              f"{out / 'sweep.csv'}; run the same command again to finish the rest", file=sys.stderr)
        return 130
    print(f"{res.cells} cells: ran {res.ran}, reused {res.skipped} finished ({res.wall_s:.1f} s, {backend})")
    adv = res.paths.get("advice")
    if adv is not None:
        import pandas as pd

        advice = pd.read_csv(adv)
        if len(advice):
            print("best policy by goodput per load (advice.csv):")
            print(advice[["model", "hardware", "tp", "replicas", "load", "best_policy", "goodput_tok_s",
                          "gain_vs_ar"]].to_string(index=False))
    print(_paths(res))
    return 0


def _paths(res) -> str:
    lines = []
    for name, p in res.paths.items():
        if isinstance(p, list):
            lines.append(f"{name}: {', '.join(str(x) for x in p)}")
        else:
            lines.append(f"{name}: {p}")
    return "\n".join(lines)
