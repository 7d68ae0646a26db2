"""What the dashboard's pages share: the run folder, cached calls into the library, one-line errors.

No simulation happens here: every result comes from the same library functions the CLI calls (echosim.sweep's
run_sweep for grids, echosim.sim.step_view for one step, echosim.plots for figures, traces for uploads)."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

from echosim.spec.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def runs_dir() -> Path:
    """The folder given to `echosim dashboard --runs` (or ECHO_DASHBOARD_RUNS; default runs/): the page's cache
    and what it lists."""
    if os.environ.get("ECHO_DASHBOARD_RUNS"):
        return Path(os.environ["ECHO_DASHBOARD_RUNS"])
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--runs", default="runs")
    args, _ = p.parse_known_args(sys.argv[1:])
    return Path(args.runs)


def cache_dir() -> Path:
    return runs_dir() / "dashboard"


@st.cache_data(show_spinner=False, max_entries=64)
def sweep_table(spec_json: dict, out: str, backend: str = "serial") -> pd.DataFrame:
    """The grid's table: run_sweep into the dashboard's cell store (cells already there are reused, so a
    restarted dashboard shows past results at once), with a progress bar while cells run."""
    from echosim.sweep import parse_spec, run_sweep

    spec = parse_spec(spec_json)
    bar = st.progress(0.0, text="simulating")

    def on_cell(done: int, total: int) -> None:
        bar.progress(done / total, text=f"simulating: {done} / {total} cells")

    try:
        res = run_sweep(spec, out, backend=backend, progress=False, plots=False, on_cell=on_cell, write=False)
    finally:
        bar.empty()
    return res.table


@st.cache_data(show_spinner="drafting one step", max_entries=64)
def step_view(policy: dict, batch_size: int, cluster: dict, seed: int, kv_len: int):
    from echosim.sim.config import ClusterConfig
    from echosim.sim.step_view import one_step

    return one_step(policy, batch_size, ClusterConfig(**cluster), seed=seed, kv_len=kv_len)


def save_upload(name: str, data: bytes) -> Path:
    """An uploaded trace under the cache, at a path named by its content (so cells keyed by it are stable),
    keeping the file's own name (so errors name it)."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = cache_dir() / "uploads" / digest / Path(name).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


@st.cache_data(show_spinner="reading the trace", max_entries=32)
def inspect_trace(path: str) -> dict:
    """Format (detected as `echosim run` detects it), requests, duration, rate; raises the reader's one-line
    InputError (file, line, field) on bad input."""
    from traces import TraceReader, summarize

    reader = TraceReader(path)
    s = summarize(reader.arrays())
    return {"format": reader.format, **{k: v for k, v in vars(s).items() if not k.startswith("_")}}


def show_error(exc: Exception) -> None:
    """A user error as the CLI prints it: one line, no traceback."""
    st.error(f"error: {exc}" if isinstance(exc, InputError) else f"error: {type(exc).__name__}: {exc}")


def list_folders(marker: str) -> list[Path]:
    """Folders under the runs folder that hold `marker` (validation.json, sweep.csv), newest first."""
    root = runs_dir()
    if not root.is_dir():
        return []
    found = [p.parent for p in root.rglob(marker) if "dashboard" not in p.parts]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
