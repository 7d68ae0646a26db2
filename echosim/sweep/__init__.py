"""Sweeps over policies x load x cluster, capacity search and the policy advisor (docs/SWEEP.md).

    from echosim.sweep import run_sweep, parse_spec
    result = run_sweep(parse_spec({"policies": ["ar", "eagle3"], "concurrency": [1, 8, 32]}), "runs/sweep")
    result.table      # pandas DataFrame, one row per cell
"""

from echosim.sweep.api import SweepResult, run_capacity, run_sweep
from echosim.sweep.grid import Cell, SweepSpec, expand, load_spec_file, parse_spec

__all__ = ["Cell", "SweepResult", "SweepSpec", "expand", "load_spec_file", "parse_spec", "run_capacity",
           "run_sweep"]
