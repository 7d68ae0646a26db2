"""`echosim` command line. Each subcommand lives in echosim/commands/<name>.py and defines
`add_parser(subparsers)` (which sets `func`) so that importing the CLI stays cheap (torch loads only when needed)."""

from __future__ import annotations

import argparse
import importlib
import sys

from echosim import __version__
from echosim.errors import UserError

# Order here is the order in `echosim --help`. One module per subcommand (or group of subcommands).
COMMANDS = [
    "run",        # simulate a trace (echosim/commands/run.py)
    "trace",      # trace inspect / convert
    "calibrate",  # sweet-spot depths and thresholds from per-node records
    "fit",        # fit a step-time model to kernel profiles
    "profile",    # time a real forward of a model shape
    "train_tiny", # echosim train-tiny: the shipped tiny model pair
    "fit_acceptance",  # echosim fit-acceptance: the acceptance model from per-node records
    "serve",      # the engine behind an HTTP server (SGLang /generate, OpenAI /v1/completions)
    "replay",     # replay a trace against an HTTP server
    "validate",   # strict replay: the same trace through the engine and the simulator, their errors
    "sweep",      # a grid of simulations, capacity search, policy advisor (echosim/commands/sweep.py)
    "dashboard",  # the Streamlit what-if dashboard (dashboards/app.py)
    "reproduce",  # echosim reproduce paper: the ECHO paper's tables in the simulator
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echosim",
        description="ECHO speculative decoding under load: scheduler core, simulator, real engine.",
    )
    parser.add_argument("--version", action="version", version=f"echosim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"echosim.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"echosim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("echosim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
