"""Where a sweep keeps its cells: <out>/cells/<key>/, one simulator run folder per cell (config.json,
requests.csv, iterations.csv, summary.json) plus cell.json (the cell and its table row), written last.

A cell is done when cell.json exists. A cell runs in <out>/cells/.tmp-<key>-<pid>/ and is renamed into place when
complete, so an interrupted sweep leaves either a whole cell or a temporary folder that the next run removes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from echosim.sweep.grid import Cell
from echosim.sweep.table import summary_row


class CellStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.cells = self.root / "cells"

    def path(self, key: str) -> Path:
        return self.cells / key

    def done(self, key: str) -> bool:
        return (self.cells / key / "cell.json").is_file()

    def row(self, key: str) -> dict:
        return json.loads((self.cells / key / "cell.json").read_text())["row"]

    def clean_partial(self) -> int:
        """Remove the temporary folders an interrupted run left; how many."""
        if not self.cells.is_dir():
            return 0
        partial = [p for p in self.cells.iterdir() if p.name.startswith(".tmp-")]
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
        return len(partial)


def run_cell(cell_json: dict, root: str, plots: bool = False) -> dict:
    """Simulate one cell into its folder under `root` (skipped if already done); its table row. A top-level
    function of plain data, so that a process pool and Ray can both ship it."""
    from echosim.sim.simulator import simulate

    store = CellStore(root)
    cell = Cell.from_json(cell_json)
    if store.done(cell.key):
        return store.row(cell.key)
    store.cells.mkdir(parents=True, exist_ok=True)
    tmp = store.cells / f".tmp-{cell.key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    result = simulate(cell.sim, cell.workload, out_dir=tmp)
    row = {"key": cell.key, **cell.labels, **summary_row(result.summary)}
    if plots:
        from echosim.plots import plot_run

        plot_run(tmp)
    (tmp / "cell.json").write_text(json.dumps({"cell": cell.to_json(), "row": row}, indent=2) + "\n")
    final = store.path(cell.key)
    try:
        os.rename(tmp, final)
    except OSError:  # another worker finished the same cell first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def run_cells(cells_json: list[dict], root: str, plots: bool = False) -> list[dict]:
    """run_cell for each cell of a chunk, in one worker: cells of one simulator config share the drafter's
    acceptance tables, which a process builds once and keeps (echosim.sim.speculation's table cache)."""
    return [run_cell(c, root, plots) for c in cells_json]
