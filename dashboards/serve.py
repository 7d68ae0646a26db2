"""Start Streamlit on dashboards/app.py with its libraries imported and its default view computed.

Streamlit imports a page's modules when the first browser session runs it; on a busy 2-core machine pandas,
altair and the simulator take seconds to import, and the default view's grid (12 cells) takes one to two seconds
to simulate. Both happen here, before the server listens: the page is run once headless (Streamlit's AppTest, in
this process), which fills Streamlit's in-memory cache and the runs folder's cell store, so the first browser
view is a cache hit (docs/BENCHMARKS.md, "Dashboard").

    python -m dashboards.serve --server.port 8501 -- --runs runs
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def preload() -> None:
    import altair  # noqa: F401
    import pandas  # noqa: F401

    import echosim.plots  # noqa: F401
    import echosim.sim.simulator  # noqa: F401
    import echosim.sim.step_view  # noqa: F401
    import echosim.sweep  # noqa: F401
    import echosim.sweep.advisor  # noqa: F401
    import traces  # noqa: F401


def warm(script_args: list[str], timeout_s: float = 120.0) -> None:
    """Run the default page once, as the server will (the page reads --runs from sys.argv). A failure here
    only costs the speed-up: the server still starts, and the page shows the error when it is opened."""
    from streamlit.testing.v1 import AppTest

    t0 = time.perf_counter()
    argv, sys.argv = sys.argv, [str(APP), *script_args]
    quiet = logging.getLogger("streamlit")
    level, quiet.level = quiet.level, logging.ERROR  # AppTest runs without a server: its context warnings
    try:
        at = AppTest.from_file(str(APP), default_timeout=timeout_s)
        at.run()
        problems = [e.message for e in at.exception] + [e.value for e in at.error]
        note = f"; the page reported: {problems[0]}" if problems else ""
        print(f"dashboard: default view computed in {time.perf_counter() - t0:.1f} s{note}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - never block the server on the warm-up
        print(f"dashboard: default view not precomputed ({type(exc).__name__}: {exc})", file=sys.stderr)
    finally:
        sys.argv = argv
        quiet.setLevel(level)


def main(argv: list[str]) -> int:
    preload()
    warm(argv[argv.index("--") + 1:] if "--" in argv else [])
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(APP), *argv]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
