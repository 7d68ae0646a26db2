"""The what-if dashboard: `echosim dashboard` (streamlit run dashboards/app.py, on 127.0.0.1).

Pages: what-if (policies against load), one step's super-tree, validate folders and sweep tables from disk.
The pages hold widgets and charts only; results come from the library (docs/DASHBOARD.md)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run dashboards/app.py` puts dashboards/, not the project, on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

VIEWS = Path(__file__).resolve().parent / "views"

st.set_page_config(page_title="echo: speculation under load", layout="wide")
nav = st.navigation([
    st.Page(VIEWS / "whatif.py", title="What-if", default=True),
    st.Page(VIEWS / "step.py", title="One step"),
    st.Page(VIEWS / "disk.py", title="Validate & sweeps"),
])
nav.run()
