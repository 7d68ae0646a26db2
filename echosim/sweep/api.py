"""Running a sweep or a capacity search into an output folder:

    <out>/sweep.csv, sweep.parquet    one row per cell: labels, then every metric (echosim/sweep/table.py)
    <out>/crossover.csv               per policy: the load where its throughput falls below plain decoding's
    <out>/advice.csv, advice.json     per load: the best policy and settings by goodput (echosim/sweep/advisor.py)
    <out>/capacity.csv               capacity search: per configuration, the highest passing rate (or replicas)
    <out>/sweep.json                  the sweep as given and what this run did
    <out>/cells/<key>/                each cell's run folder (echosim/sweep/store.py)
    <out>/*.png                       plots (echosim/plots.py)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from echosim.sweep.advisor import advise, schedule
from echosim.sweep.capacity import search_cell
from echosim.sweep.grid import SweepSpec, expand
from echosim.sweep.runner import default_jobs, run_tasks
from echosim.sweep.store import CellStore, run_cells
from echosim.sweep.table import CONFIG_COLUMNS, crossovers, to_frame, write_table


@dataclass
class SweepResult:
    table: pd.DataFrame
    cells: int
    ran: int
    skipped: int
    wall_s: float
    out: Path
    paths: dict = field(default_factory=dict)
    interrupted: bool = False


def _write_meta(out: Path, spec: SweepSpec, extra: dict) -> None:
    (out / "sweep.json").write_text(json.dumps({"spec": spec.model_dump(), **extra}, indent=2, default=str) + "\n")


def write_outputs(df: pd.DataFrame, out: Path, plots: bool = True) -> dict:
    paths = dict(write_table(df, out))
    cross = crossovers(df)
    cross.to_csv(out / "crossover.csv", index=False)
    paths["crossover"] = out / "crossover.csv"
    advice = advise(df)
    advice.to_csv(out / "advice.csv", index=False)
    (out / "advice.json").write_text(json.dumps(schedule(advice), indent=2) + "\n")
    paths["advice"] = out / "advice.csv"
    if plots and not df.empty:
        from echosim.plots import plot_sweep

        paths["plots"] = plot_sweep(df, out, cross, group_by=CONFIG_COLUMNS)
    return paths


def _chunks(todo: list, jobs: int) -> list[list[int]]:
    """Indices of the cells to run, in the tasks a backend ships. Serial: one cell a task. Otherwise one task per
    simulator config (cells that differ only in load), so each worker builds a config's acceptance tables once
    instead of every worker building every table; the largest task is halved until there are 2 x jobs tasks,
    so the workers stay balanced."""
    if jobs <= 1:
        return [[i] for i in range(len(todo))]
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(todo):
        groups.setdefault(json.dumps(c.sim.to_json(), sort_keys=True), []).append(i)
    chunks = list(groups.values())
    while chunks and len(chunks) < 2 * jobs:
        big = max(range(len(chunks)), key=lambda k: len(chunks[k]))
        if len(chunks[big]) < 2:
            break
        c = chunks.pop(big)
        chunks[big:big] = [c[: len(c) // 2], c[len(c) // 2:]]
    return chunks


def run_sweep(spec: SweepSpec, out: str | Path, backend: str = "pool", jobs: int | None = None,
              ray_address: str | None = None, progress: bool = True, plots: bool = True,
              cell_plots: bool = False, on_cell=None, path: str | None = None, write: bool = True) -> SweepResult:
    """Every cell of the grid that is not already in `out`, then the table and its plots (write=False: the
    table only, no files beside the cells). Interrupted (Ctrl-C), it still writes the table of the cells
    finished so far, then re-raises."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = CellStore(out)
    store.clean_partial()
    cells = expand(spec, path)
    keys = list(dict.fromkeys(c.key for c in cells))
    todo = [c for c in {c.key: c for c in cells}.values() if not store.done(c.key)]
    skipped = len(keys) - len(todo)
    rows: dict[str, dict] = {k: store.row(k) for k in keys if store.done(k)}

    chunks = _chunks(todo, 1 if backend == "serial" else jobs or default_jobs())

    def collect(i: int, chunk_rows: list[dict]) -> None:
        for j, row in zip(chunks[i], chunk_rows, strict=True):
            rows[todo[j].key] = row
        if on_cell is not None:
            on_cell(len(rows), len(keys))

    interrupted = False
    try:
        run_tasks(run_cells, [([todo[j].to_json() for j in c], str(out), cell_plots) for c in chunks],
                  backend=backend, jobs=jobs, ray_address=ray_address, progress=progress, skipped=skipped,
                  on_result=collect, sizes=[len(c) for c in chunks], preload=("echosim.sim.simulator",))
    except KeyboardInterrupt:
        interrupted = True
        # whatever finished, reported to us or not (a worker may have completed a cell as we stopped)
        rows.update({k: store.row(k) for k in keys if k not in rows and store.done(k)})
    # a row per cell in grid order (two cells with one key share a row: the same resolved config)
    table = to_frame([{**rows[c.key], **c.labels} for c in cells if c.key in rows])
    paths = write_outputs(table, out, plots=plots and not interrupted) if write else {}
    wall = time.perf_counter() - t0
    if write:
        _write_meta(out, spec, {"cells": len(cells), "ran": len(rows) - skipped, "skipped": skipped,
                                "backend": backend, "interrupted": interrupted, "wall_s": round(wall, 3)})
    if interrupted:
        raise KeyboardInterrupt
    return SweepResult(table, len(cells), len(todo), skipped, wall, out, paths)


def run_capacity(spec: SweepSpec, out: str | Path, backend: str = "pool", jobs: int | None = None,
                 ray_address: str | None = None, progress: bool = True, plots: bool = True,
                 path: str | None = None) -> SweepResult:
    """The capacity search of spec.capacity for every configuration of the grid (the load axis set aside for a
    rate search; kept, as the rate to carry, for a replicas search). Probes are cells, stored and reused."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = CellStore(out)
    store.clean_partial()
    cap = spec.capacity
    if cap.search == "rate":
        spec = spec.model_copy(update={"rates": [cap.rate_min], "concurrency": None, "loads": None})
        configs = expand(spec, path, with_load=False)
    else:
        configs = [c for c in expand(spec, path) if c.labels["replicas"] == spec.replicas[0]]
    results = run_tasks(search_cell, [(c.to_json(), str(out), cap.model_dump()) for c in configs],
                        backend=backend, jobs=jobs, ray_address=ray_address, progress=progress, desc="capacity",
                        preload=("echosim.sim.simulator",))
    df = pd.DataFrame(results)
    paths = dict(write_table(df, out, stem="capacity"))
    if plots and not df.empty:
        from echosim.plots import plot_capacity

        paths["plots"] = plot_capacity(df, out)
    wall = time.perf_counter() - t0
    _write_meta(out, spec, {"configurations": len(configs), "backend": backend, "wall_s": round(wall, 3)})
    return SweepResult(df, len(configs), len(configs), 0, wall, out, paths)
