"""Start Streamlit on dashboards/app.py with the libraries its pages use already imported.

Streamlit imports a page's modules when the first browser session runs it; on a busy 2-core machine pandas,
altair and the simulator take seconds to import. Importing them here, before the server starts, moves that wait
from the first page view to start-up (docs/BENCHMARKS.md, "Dashboard").

    python -m dashboards.serve --server.port 8501 -- --runs runs
"""

from __future__ import annotations

import sys
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


def main(argv: list[str]) -> int:
    preload()
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(APP), *argv]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
