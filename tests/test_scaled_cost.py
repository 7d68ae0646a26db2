"""A step-time model at another machine speed (cost_models/scaled.py): what `validate` simulates the replay with
at the speed the engine's steps showed."""

import numpy as np
import pytest

from cost_models.interface import StepBatch
from cost_models.scaled import ScaledCostModel
from echosim.sim.config import ClusterConfig, SimConfig, build_cost_model
from echosim.sim.simulator import simulate
from echosim.sim.workload import WorkloadSpec


def test_every_part_of_a_step_scales_and_the_shape_stays():
    inner = build_cost_model(ClusterConfig())
    slow = ScaledCostModel(inner, 1.5)
    batch = StepBatch.from_requests([1, 6, 6], [300, 900, 40], (3.0, 6.0, 6.0), [(128, 0)])
    a, b = inner.step_time(batch), slow.step_time(batch)
    for part in ("draft_ms", "verify_ms", "lm_head_ms", "overhead_ms"):
        assert getattr(b, part) == pytest.approx(1.5 * getattr(a, part))
    assert slow.ar_step_ms(np.array([1.0, 64.0]), 512.0) == pytest.approx(1.5 * inner.ar_step_ms(np.array([1.0, 64.0]),
                                                                                                  512.0))
    assert (slow.model, slow.hardware, slow.draft) == (inner.model, inner.hardware, inner.draft)
    with pytest.raises(ValueError, match="> 0"):
        ScaledCostModel(inner, 0.0)


def test_a_slower_machine_stretches_a_plain_run_by_its_factor():
    """Plain decoding decides nothing from time: at twice the step price the same steps take twice as long."""
    cfg = SimConfig(policy={"policy": "ar"})
    wl = WorkloadSpec(kind="closed", concurrency=8, requests=24, output_tokens=32)
    base = simulate(cfg, wl).summary
    slow = simulate(cfg, wl, cost=ScaledCostModel(build_cost_model(cfg.cluster), 2.0)).summary
    assert slow["iterations"] == base["iterations"]
    assert slow["makespan_s"] == pytest.approx(2.0 * base["makespan_s"], rel=1e-6)
    assert slow["throughput_tok_s"] == pytest.approx(base["throughput_tok_s"] / 2.0, rel=1e-6)
