"""What the simulator tells an adaptive budget about its priced steps (echosim/sim/pricing.py `observed_ms`): the
priced step split as the engine times its own, so the budget learns the same costs on both sides
(docs/ADAPTIVE.md, "The simulator against the engine")."""

import numpy as np
import pytest

from echosim.sim.config import ClusterConfig, SimConfig, build_cost_model
from echosim.sim.pricing import StepPricer
from echosim.sim.simulator import simulate
from echosim.sim.workload import WorkloadSpec
from echosim.spec.adaptive import Adaptive


def _pricer(**kw):
    return StepPricer(build_cost_model(ClusterConfig()), **kw)


@pytest.mark.parametrize("B", [1, 8, 64])
def test_the_budget_sees_the_draft_side_overheads_as_drafting(B):
    pricer = _pricer(per_token_ms=0.05, per_draft_row_ms=0.02, per_request_ms=0.5)
    rows = (float(B), 4.0 * B, 4.0 * B)
    T, kv = 6.0 * B, 300.0 * B
    parts = pricer.price_parts(T, kv + T, 300.0 * T, float(B), T, rows, 300.0, float(B))
    verify, draft, other = pricer.observed_ms(parts, T, rows, 300.0, float(B))
    assert verify + draft + other == pytest.approx(sum(parts))  # no time made or lost
    _, d_lm, d_over = pricer._draft_cached(rows, 300.0)
    # drafting: every draft forward with its LM head, each depth's fixed cost and the per-row work
    assert draft == pytest.approx(parts[0] + d_lm + d_over + 0.02 * sum(rows))
    # verification: the target's forward and LM head, the per-token and the per-request work (the engine times
    # its per-request work in its verify phase); the rest: per step alone, whatever the batch
    plain = pricer.price_parts(T, kv + T, 300.0 * T, float(B), T, (), 300.0, float(B))
    assert verify == pytest.approx(plain[1] + plain[2] + 0.05 * T + 0.5 * B)
    assert other == pytest.approx(plain[3] - 0.05 * T - 0.5 * B) == pytest.approx(pricer._base_overhead)
    # a plain step has no drafting to report
    assert pricer.observed_ms(plain, T, (), 300.0, float(B))[1] == 0.0


def test_the_simulated_budget_is_taught_the_drafting_it_pays_for(monkeypatch):
    """Per-row drafting overhead lands in the draft time the budget fits (it went to `other` before, and the
    simulated budget saw drafting several times cheaper than the engine measures it)."""
    seen = []
    real = Adaptive.observe_step

    def spy(self, batch_size, verify_tokens, verify_ms, draft_depths=0, draft_rows=0.0, draft_ms=0.0, other_ms=None):
        seen.append((draft_rows, draft_ms))
        return real(self, batch_size, verify_tokens, verify_ms, draft_depths, draft_rows, draft_ms, other_ms)

    monkeypatch.setattr(Adaptive, "observe_step", spy)
    cfg = SimConfig(cluster=ClusterConfig(overhead_per_draft_row_ms=0.3))
    cfg.policy = {"policy": "echo", "adaptive": {}}
    simulate(cfg, WorkloadSpec(kind="closed", concurrency=8, requests=16, output_tokens=40))
    rows, ms = np.array(seen).T
    drafted = rows > 0
    assert drafted.any()
    assert (ms[drafted] >= 0.3 * rows[drafted]).all()


def test_an_adaptive_run_reports_what_its_budget_learnt(tmp_path):
    """summary.json carries the adaptive budget's final estimates (as the engine's /server_info and validate's
    engine side do), so a run can be set against a measured one on the costs each side learnt; a static policy's
    summary has none."""
    import json

    from echosim.validate.crossval import budget_states, format_budget_states

    cfg = SimConfig()
    cfg.policy = {"policy": "echo", "adaptive": {}}
    out = tmp_path / "adaptive"
    out.mkdir()
    res = simulate(cfg, WorkloadSpec(kind="closed", concurrency=8, requests=16, output_tokens=40), out_dir=out)
    state = json.loads((out / "summary.json").read_text())["budget_state"]
    assert state == json.loads(json.dumps(res.summary["budget_state"]))
    assert state["steps"] > 0 and set(state["verify_ms_model"]) == {"prior_scale", "prior_scale_drafts", "base"}
    cfg.policy = {"policy": "echo"}
    assert "budget_state" not in simulate(cfg, WorkloadSpec(kind="closed", concurrency=8, requests=16,
                                                            output_tokens=40)).summary
    # validate's table: one row per side that has a budget, in the state's own units
    rows = budget_states([{"throughput_tok_s": 1.0}, {"budget_state": state}], {"budget_state": state})
    assert [r["side"] for r in rows] == ["engine run 2", "sim"]
    table = format_budget_states(rows).splitlines()
    assert len(table) == 4 and "prior_scale / prior_scale_drafts / base" in table[0]
    assert all(line.count("|") == table[0].count("|") for line in table)
