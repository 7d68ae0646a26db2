"""The what-if dashboard through Streamlit's AppTest: the default view, changing policies, bad input shown as one
line, the one-step page, validate folders and sweep tables from disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One runs folder for the module: cells simulated by one test are reused by the next (the disk cache)."""
    return tmp_path_factory.mktemp("dash_runs")


@pytest.fixture
def app(runs, monkeypatch):
    monkeypatch.setenv("ECHO_DASHBOARD_RUNS", str(runs))
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at) -> int:
    return len(at.get("vega_lite_chart")) + len(at.get("arrow_vega_lite_chart"))


def test_default_view_shows_policies_against_load_with_the_crossover(app):
    assert app.caption[0].value == "policies: ar, eagle3, echo | 12 cells"
    assert charts(app) == 7   # throughput, goodput, MAT, waste, latency, cost (all, within SLOs)
    # Qwen3-8B on one H100, closed loop 1..64: the static tree falls below plain decoding between 8 and 64
    warn = app.warning[0].value
    assert warn.startswith("Speculation stops paying") and "**eagle3** from" in warn
    load = float(warn.split("**eagle3** from ")[1].split(";")[0])
    assert 8 < load < 64
    best = app.dataframe[0].value
    assert list(best["load"]) == [1, 8, 32, 64]
    assert best["best_policy"].iloc[0] != "ar" and best["best_policy"].iloc[-1] == "ar"


def test_changing_policies_and_knobs_reruns_the_sweep(app):
    app.multiselect(key="policies").set_value(["ar", "eagle3", "ddd"]).run()
    assert not app.exception
    assert app.caption[0].value == "policies: ar, eagle3, ddd | 12 cells"
    app.number_input(key="eagle3.steps").set_value(3).run()
    assert app.caption[0].value == "policies: ar, eagle3[3], ddd | 12 cells"
    table = app.dataframe[1].value  # all cells
    assert set(table["policy"]) == {"ar", "eagle3[3]", "ddd"}
    assert json.loads(table[table["policy"] == "eagle3[3]"]["policy_config"].iloc[0])["steps"] == 3


def test_bad_input_is_one_line_in_the_page(app):
    app.text_input(key="loads_True").set_value("1,x").run()
    assert not app.exception
    (err,) = app.error
    assert err.value.startswith("error: field 'loads': expected comma-separated numbers") and "\n" not in err.value
    app.text_input(key="loads_True").set_value("1,4").run()
    app.text_input(key="extra_policies").set_value("nosuch").run()
    (err,) = app.error
    assert "nosuch" in err.value and "Traceback" not in err.value
    app.text_input(key="extra_policies").set_value('eagle3{"steps": 2').run()
    (err,) = app.error
    assert "not valid JSON" in err.value


def test_trace_replay_with_a_shipped_sample_and_a_load_multiplier(app):
    app.radio(key="mode").set_value("trace replay").run()
    app.number_input(key="trace_requests").set_value(40).run()
    app.text_input(key="loads_trace").set_value("1,4").run()
    assert not app.exception, [e.value for e in app.exception]
    assert "azure" in app.sidebar.caption[0].value.lower() or "requests over" in app.sidebar.caption[0].value
    assert app.caption[0].value == "policies: ar, eagle3, echo | 6 cells"


def test_one_step_page_shows_the_budget_split(app):
    app.switch_page("views/step.py").run()
    assert not app.exception, [e.value for e in app.exception]
    labels = [m.label for m in app.metric]
    assert labels[:3] == ["verified tokens", "depth / width", "MAT this step"]
    verified = int(app.metric[0].value.replace(",", ""))
    depth, width = (int(x.replace(",", "")) for x in app.metric[1].value.split(" / "))
    assert verified == depth + width + 16   # the roots of a batch of 16
    app.text_input(key="step_settings_echo").set_value('{"budget": {"kind": "fixed", "tokens": 64}}').run()
    assert int(app.metric[0].value.replace(",", "")) <= 64 + 16


def test_validate_folders_and_sweep_tables_from_disk(app, runs):
    from echosim.sim.config import SimConfig
    from echosim.sim.simulator import simulate
    from echosim.sim.workload import WorkloadSpec
    from echosim.sweep import parse_spec, run_sweep
    from echosim.validate.crossval import compare

    val = runs / "validate-eagle3"
    wl = WorkloadSpec(kind="closed", concurrency=2, requests=4, prompt_tokens=32, output_tokens=16)
    a = simulate(SimConfig(policy={"policy": "eagle3"}), wl, val / "engine").summary
    b = simulate(SimConfig(policy={"policy": "eagle3"}, seed=1), wl, val / "sim").summary
    (val / "validation.json").write_text(json.dumps({"metrics": compare(a, b)}))
    run_sweep(parse_spec({"policies": ["ar", "eagle3"], "concurrency": [1, 2], "requests": 4, "input_len": 32,
                          "output_len": 16}), runs / "sweep-small", backend="serial", progress=False, plots=False)
    app.switch_page("views/disk.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.selectbox(key="val").value == str(val)
    assert app.selectbox(key="sw").value == str(runs / "sweep-small")
    frames = [d.value for d in app.dataframe]
    assert any("signed_pct" in f.columns for f in frames)          # measured against simulated, per metric
    assert any("best_policy" in f.columns and list(f["load"]) == [1, 2] for f in frames)
    app.text_input(key="sw_path").set_value(str(runs / "nowhere")).run()
    assert any("no sweep.csv in this folder" in e.value for e in app.error)


def test_server_start_up_computes_the_default_view(tmp_path, capsys, monkeypatch):
    """dashboards.serve runs the default page once before listening: its 12 cells are in the runs folder's cell
    store and Streamlit's in-memory cache holds the grid, so the first browser view simulates nothing."""
    from dashboards import serve

    runs = tmp_path / "runs"
    serve.warm(["--runs", str(runs)])
    assert "default view computed in" in capsys.readouterr().err
    cells = runs / "dashboard" / "cells"
    assert len(list(cells.iterdir())) == 12
    for cell in cells.iterdir():   # empty the disk store: only the in-memory cache can serve the next view
        for f in cell.iterdir():
            f.unlink()
        cell.rmdir()
    monkeypatch.setattr("sys.argv", [APP, "--runs", str(runs)])   # as the server runs the page
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception and at.caption[0].value == "policies: ar, eagle3, echo | 12 cells"
    assert not list(cells.iterdir())   # nothing simulated again
