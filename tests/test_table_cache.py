"""The acceptance tables are kept across runs in one process (echosim/sim/speculation.py): a run that reuses them
must write the same run folder, byte for byte, as one that builds them."""

from __future__ import annotations

import numpy as np
import pytest

from echosim.sim import speculation
from echosim.sim.config import SimConfig
from echosim.sim.simulator import load_acceptance, simulate
from echosim.sim.speculation import Speculator, clear_table_cache
from echosim.sim.workload import WorkloadSpec
from echosim.spec.policies import make_policy

FILES = ("requests.csv", "iterations.csv", "summary.json")
GOODPUT = {"policy": "echo", "budget": {"kind": "goodput", "tokens": 31}}


def _run(policy: dict, out, seed: int = 5):
    config = SimConfig(policy=dict(policy), core="table", seed=seed)
    workload = WorkloadSpec(kind="closed", concurrency=12, requests=24, prompt_tokens=60, output_tokens=50)
    return simulate(config, workload, out_dir=out)


@pytest.mark.parametrize("policy", [{"policy": "eagle3"}, GOODPUT], ids=["eagle3", "echo-goodput"])
def test_a_cached_table_gives_the_same_run(tmp_path, monkeypatch, policy):
    builds = []
    make = Speculator._make_table
    monkeypatch.setattr(Speculator, "_make_table", lambda self, d: builds.append(d) or make(self, d))
    clear_table_cache()
    _run(policy, tmp_path / "built")
    assert len(builds) == 1
    _run(policy, tmp_path / "cached")
    assert len(builds) == 1  # the second run built nothing
    for name in FILES:
        assert (tmp_path / "built" / name).read_bytes() == (tmp_path / "cached" / name).read_bytes(), name
    _run(policy, tmp_path / "other-seed", seed=6)  # another seed is another table
    assert len(builds) == 2
    assert (tmp_path / "other-seed" / "requests.csv").read_bytes() != (tmp_path / "built" / "requests.csv").read_bytes()


def _tables(acceptance, order, policy="eagle3"):
    spec = Speculator(make_policy(policy), acceptance, seed=11, core="table", rows_per_bin=32)
    for d in order:
        spec._build_table(d)
    return spec


def test_a_cached_table_leaves_the_drafter_where_building_it_would():
    # the second dataset's table is drawn from the drafter's RNG after the first's: a cache hit on the first must
    # leave that RNG where the build would have, and the history is part of the key
    acceptance = load_acceptance("qwen3-8b")
    a, b = 0, len(acceptance.datasets) - 1
    clear_table_cache()
    fresh = _tables(acceptance, [a, b])
    clear_table_cache()
    _tables(acceptance, [a])   # caches a's table alone
    mixed = _tables(acceptance, [a, b])  # a from the cache, b built after it
    again = _tables(acceptance, [a, b])  # both from the cache
    for spec in (mixed, again):
        assert np.array_equal(spec._rows, fresh._rows)
        assert all(np.array_equal(x, y) for x, y in zip(spec._edges, fresh._edges, strict=True))
        assert spec.drafter.rng.bit_generator.state == fresh.drafter.rng.bit_generator.state
        assert spec.step_index == fresh.step_index
    # b built first is another table than b built after a
    assert not np.array_equal(_tables(acceptance, [b])._rows, fresh._rows[len(fresh._rows) // 2:])


def test_the_cache_is_bounded_and_its_tables_read_only(monkeypatch):
    monkeypatch.setattr(speculation, "TABLE_CACHE_SIZE", 2)
    clear_table_cache()
    acceptance = load_acceptance("qwen3-8b")
    for rows in (8, 16, 24):
        Speculator(make_policy("eagle3"), acceptance, seed=1, core="table", rows_per_bin=rows)._build_table(0)
    assert len(speculation._TABLE_CACHE) == 2
    entry = next(iter(speculation._TABLE_CACHE.values()))
    with pytest.raises(ValueError):
        entry.rows[0, 0] = 7
