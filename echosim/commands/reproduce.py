"""`echosim reproduce paper`: the ECHO paper's tables and claims, simulated with its published settings, side by
side with its figures (report.md, rows.json, plots). The library logic is echosim/sim/reproduce.py.

    echosim reproduce paper --quick                      # CI: every row, few requests (minutes)
    nohup echosim reproduce paper --out runs/paper &     # full: progress in runs/paper/progress.log
"""

from __future__ import annotations

import argparse

TABLES = ("batch1", "concurrency", "crossover", "ablation")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="reproduce the ECHO paper's tables in the simulator",
                              description="Simulate every table and claim of the ECHO paper the simulator can speak "
                                          "to, with the paper's published settings, and write a side-by-side report "
                                          "(paper, simulated, error, ordering right or wrong, why off) with plots.")
    p.add_argument("target", choices=["paper"], help="what to reproduce")
    p.add_argument("--quick", action="store_true", help="few requests per point (every row still runs): for CI")
    p.add_argument("--out", default=None, help="report folder (default runs/reproduce-paper[-quick])")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(TABLES)}")
    p.add_argument("--engine-overhead", action="store_true",
                   help="sensitivity run, not the default: add engine overheads (per step, target token, drafted row) "
                        "fitted to the paper's Qwen3-8B EAGLE-3 throughputs and carried to every model (by default "
                        "the step times are the kernel cost model's alone)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from echosim.errors import UserError
    from echosim.sim.reproduce import Reproduction, Scale, write_report

    only = None
    if args.only:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        bad = only - set(TABLES)
        if bad:
            raise UserError(f"--only: unknown table(s) {', '.join(sorted(bad))}; known: {', '.join(TABLES)}")
    out = Path(args.out or f"runs/reproduce-paper{'-quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "progress.log", "w")  # noqa: SIM115 (closed below; the full run takes a while)

    def progress(msg: str) -> None:
        log.write(msg + "\n")
        log.flush()
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    command = ("echosim reproduce paper" + (" --quick" if args.quick else "")
               + (f" --only {args.only}" if args.only else "")
               + (" --engine-overhead" if args.engine_overhead else ""))
    try:
        rep = Reproduction(Scale.named(args.quick), progress, only, engine_overhead=args.engine_overhead)
        summary = rep.run()
    finally:
        log.close()
    path = write_report(rep, summary, out, command)
    print(path.read_text())
    print(f"report: {path}")
    return 0
