"""`echosim dashboard`: the Streamlit what-if dashboard (dashboards/app.py) on 127.0.0.1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from echosim.commands.help_format import DefaultsHelpFormatter
from echosim.errors import UserError

APP = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "dashboard", help="the what-if dashboard (Streamlit) on 127.0.0.1",
        formatter_class=DefaultsHelpFormatter,
        description="Start the Streamlit what-if dashboard: policies against load, capacity, the budget split of "
                    "one step, cost per million tokens, validate folders and sweep tables from disk. Needs the "
                    "dashboard extra: pip install 'echo-spec[dashboard]'.")
    p.add_argument("--port", type=int, default=8501, help="port")
    p.add_argument("--address", default="127.0.0.1", help="address to listen on")
    p.add_argument("--runs", default="runs", help="folder the page lists validate folders and sweeps from")
    p.set_defaults(func=run)


def command(port: int, address: str = "127.0.0.1", runs: str = "runs") -> list[str]:
    # dashboards.serve: Streamlit with the pages' libraries imported before the server starts
    return [sys.executable, "-m", "dashboards.serve", "--server.address", address,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal",
            "--", "--runs", runs]


def run(args) -> int:
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise UserError("the dashboard needs Streamlit: pip install 'echo-spec[dashboard]'") from None
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    print(f"dashboard: http://{args.address}:{args.port}", file=sys.stderr)
    root = str(APP.parents[1])  # dashboards.serve must import from this checkout wherever we are run from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = command(args.port, args.address, args.runs)
    sys.stdout.flush()
    sys.stderr.flush()
    # become the server (no child left behind): Ctrl-C and SIGTERM reach Streamlit itself
    os.execve(cmd[0], cmd, env)
    return 0  # not reached
