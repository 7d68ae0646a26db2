"""The fixed-threshold ablation: one tau calibrated for all depths, gating at every depth; paper defaults."""

import numpy as np
from spec_helpers import ConstDrafter
from test_spec_calibrate import synthetic_records

from echosim.spec.calibrate import calibrate, calibrate_fixed
from echosim.spec.drafting import draft
from echosim.spec.policies import EchoConfig, make_policy


def test_defaults_are_the_papers_qwen3_8b_settings():
    assert EchoConfig() == EchoConfig.from_sglang(5, 8, 32, 3, 0.3, 20)
    assert EchoConfig().gates == [(4, 0.3)]


def test_echo_fixed_differs_from_echo_with_one_gate():
    """With the paper's single sweet spot (depth 4), echo gates only there; echo_fixed gates at every depth with
    the same tau. A chain of 0.6-probability drafts (c_d = 0.6^d: 0.6, 0.36, ...) runs to depth 4 under echo and
    stops at depth 2 under echo_fixed (tau 0.45); a 0.8 chain (0.8, 0.64, 0.51, 0.41) stops at 4 under both."""
    cfg = dict(gates=[[4, 0.45]])
    echo, fixed = make_policy("echo", cfg), make_policy("echo_fixed", cfg)
    z = np.zeros(3, np.int64)
    assert (draft(ConstDrafter(0.6), echo, z, z).stop_depth == 4).all()
    assert (draft(ConstDrafter(0.6), fixed, z, z).stop_depth == 2).all()
    assert (draft(ConstDrafter(0.8), echo, z, z).stop_depth == 4).all()
    assert (draft(ConstDrafter(0.8), fixed, z, z).stop_depth == 4).all()


def test_fixed_threshold_setting_and_bounds():
    p = make_policy("echo_fixed", dict(gates=[[4, 0.3]], fixed_threshold=0.05))
    z = np.zeros(2, np.int64)
    assert (draft(ConstDrafter(0.6), p, z, z).stop_depth == 5).all()  # 0.6^4 = 0.13 >= 0.05 everywhere
    try:
        make_policy("echo_fixed", dict(fixed_threshold=1.5))
    except ValueError as exc:
        assert "fixed_threshold" in str(exc)
    else:
        raise AssertionError("a threshold above 1 must be refused")


def test_calibrate_fixed_pools_all_depths():
    rec = synthetic_records()
    per_depth = calibrate(rec, max_gates=1, token_cost=0.05)
    fixed = calibrate_fixed(rec, token_cost=0.05)
    assert fixed.config.gate_mode == "fixed" and 0.0 <= fixed.config.fixed_threshold <= 1.0
    # one tau for every depth cannot beat the per-depth calibration's gain on a single sweet spot
    assert fixed.predicted_gain <= per_depth.predicted_gain + 1e-9
    free = calibrate_fixed(rec, token_cost=0.0)
    assert free.config.fixed_threshold == 0.0  # free verification: never truncate


def test_calibrate_cli_fixed(tmp_path, capsys):
    import json

    from echosim.cli import main
    from echosim.spec.policies import load_policy
    from echosim.spec.records import write_records

    rec = tmp_path / "rec.jsonl"
    write_records(rec, synthetic_records(n=400))
    out = tmp_path / "fixed.json"
    assert main(["calibrate", "--records", str(rec), "-o", str(out), "--fixed", "--token-cost", "0.05"]) == 0
    assert "one threshold for every depth" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["policy"] == "echo_fixed"
    p = load_policy(out)
    assert p.name == "echo_fixed" and p.config.fixed_threshold == data["fixed_threshold"]
