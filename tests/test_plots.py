"""PNG plots beside the CSVs of run, replay and validate folders; --no-plots; the CSV/JSON outputs unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from echosim.cli import main
from echosim.plots import plot_run, plot_validate, run_figures
from echosim.sim.config import SimConfig
from echosim.sim.simulator import simulate
from echosim.sim.workload import WorkloadSpec

PNG = b"\x89PNG\r\n\x1a\n"
RUN_PLOTS = {"throughput_latency.png", "batch_mat.png", "latency_cdf.png"}
TRACE = Path(__file__).resolve().parents[1] / "traces" / "azure_conv_2023_5min.jsonl"


def _pngs(folder: Path) -> set[str]:
    names = {p.name for p in folder.glob("*.png")}
    for n in names:
        data = (folder / n).read_bytes()
        assert data[:8] == PNG and len(data) > 5_000, n
    return names


def test_run_writes_plots_and_no_plots_leaves_the_same_csvs(tmp_path):
    args = ["run", "--trace", str(TRACE), "--requests", "60", "--policy", "eagle3", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--no-plots"]) == 0
    assert _pngs(tmp_path / "a") == RUN_PLOTS
    assert _pngs(tmp_path / "b") == set()
    data = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert data == ["config.json", "iterations.csv", "requests.csv", "summary.json"]
    for name in data:  # the plots are additional: every other file is byte for byte the same
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_compare_policies_plots_every_policy_folder(tmp_path):
    assert main(["run", "--concurrency", "2", "--requests", "6", "--input-len", "32", "--output-len", "24",
                 "--compare-policies", "ar,eagle3", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    for label in ("ar", "eagle3"):
        assert _pngs(tmp_path / "c" / label) == RUN_PLOTS


def test_run_figures_show_the_run(tmp_path):
    """The throughput panel integrates to the tokens the run decoded; the MAT panel is the summary's MAT."""
    out = tmp_path / "r"
    res = simulate(SimConfig(policy={"policy": "eagle3"}), WorkloadSpec(kind="closed", concurrency=4, requests=12,
                                                                         prompt_tokens=32, output_tokens=40), out)
    figs = run_figures(out)
    assert set(figs) == {"throughput_latency", "batch_mat", "latency_cdf"}
    (line,) = figs["throughput_latency"].axes[0].get_lines()
    x, y = line.get_xdata(), line.get_ydata()
    width = x[1] - x[0]
    decoded = res.summary["decode_request_steps"] + res.summary["accepted_drafts"]
    assert sum(y) * width == pytest.approx(decoded, rel=1e-6)
    (mat_line,) = figs["batch_mat"].axes[1].get_lines()
    mats = [m for m in mat_line.get_ydata() if not math.isnan(m)]
    assert min(mats) >= 1.0 and max(mats) <= 1 + 7  # at most num_draft_tokens - 1 drafts + the bonus


def test_replay_folder_plots(tmp_path):
    from echo_exec.replay import RequestRecord, summarize, write_outputs

    recs = [RequestRecord(index=i, request_id=str(i), arrival_s=0.1 * i, first_token_s=0.1 * i + 0.05,
                          finish_s=0.1 * i + 0.5 + 0.01 * i, prompt_tokens=20, output_tokens=16, steps=6,
                          accepted=10, finish_reason="length", scheduled_s=0.1 * i, target_prompt_tokens=20,
                          target_output_tokens=16, dataset="d", ok=True, error="") for i in range(30)]
    recs.append(RequestRecord(index=30, request_id="30", arrival_s=3.0, first_token_s=float("nan"),
                              finish_s=float("nan"), prompt_tokens=0, output_tokens=0, steps=0, accepted=0,
                              finish_reason="", scheduled_s=3.0, target_prompt_tokens=20, target_output_tokens=16,
                              dataset="d", ok=False, error="refused"))
    out = tmp_path / "replay"
    write_outputs(out, recs, summarize(recs), {"command": "replay"})
    assert {p.name for p in plot_run(out)} == RUN_PLOTS
    _pngs(out)
    figs = run_figures(out)
    mat = [m for m in figs["batch_mat"].axes[1].get_lines()[0].get_ydata() if not math.isnan(m)]
    assert mat and all(m == pytest.approx(16 / 6) for m in mat)


def test_validate_folder_plots_measured_against_simulated(tmp_path):
    from echosim.validate.crossval import compare

    out = tmp_path / "validate-eagle3"
    wl = WorkloadSpec(kind="closed", concurrency=2, requests=6, prompt_tokens=32, output_tokens=24)
    a = simulate(SimConfig(policy={"policy": "eagle3"}), wl, out / "engine").summary
    b = simulate(SimConfig(policy={"policy": "eagle3"}, seed=1), wl, out / "sim").summary
    rows = compare(a, b)
    (out / "validation.json").write_text(json.dumps({"metrics": rows}))
    names = {p.name for p in plot_validate(out)}
    assert {"validation.png", "validation_cdf.png"} <= names
    assert _pngs(out) == {"validation.png", "validation_cdf.png"}
    assert _pngs(out / "engine") == RUN_PLOTS and _pngs(out / "sim") == RUN_PLOTS


def test_one_step_view_is_the_policy_selection():
    """The one-step picture the dashboard draws: eagle3 verifies exactly num_draft_tokens per request (the root
    included); ECHO spends one budget over the batch; the accepted path lies within what was selected."""
    from echosim.plots import step_figure
    from echosim.sim.step_view import one_step

    v = one_step({"policy": "eagle3", "steps": 4, "topk": 4, "num_draft_tokens": 12}, 8)
    assert (v.verified == 12).all()
    assert (v.selected <= v.drafted).all() and v.selected.shape == (8, 4)
    assert (v.depth_tokens + v.width_tokens == v.selected.sum(axis=1)).all()
    assert (v.accepted <= v.depth_tokens).all()
    # ECHO's budget is the batch's (10 drafts x 16 requests): it moves across requests, the total holds
    e = one_step({"policy": "echo", "budget": {"kind": "per_request", "tokens": 10}}, 16)
    assert e.selected.sum() <= 160 and e.verified.max() > 11 and e.verified.min() < 11
    assert e.summary()["verified_tokens"] == int(e.verified.sum())
    ar = one_step({"policy": "ar"}, 4)
    assert (ar.verified == 1).all() and ar.summary()["waste"] == 0.0
    fig = step_figure(v)
    assert len(fig.axes) >= 2
