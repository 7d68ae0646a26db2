"""echosim sweep: grid expansion, backends that agree, resuming after an interrupt, capacity search, advisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cost_models.interface import StepTime
from echosim.cli import main
from echosim.sim.config import ClusterConfig, SimConfig
from echosim.sim.errors import SimError
from echosim.sim.simulator import simulate
from echosim.sim.workload import WorkloadSpec
from echosim.sweep import expand, parse_spec, run_sweep
from echosim.sweep.advisor import advise
from echosim.sweep.capacity import search_rate, search_replicas
from echosim.sweep.grid import load_spec_file
from echosim.sweep.table import crossovers

ROOT = Path(__file__).resolve().parents[1]
# small cells: a closed loop of a few short requests (about 0.2 s each)
SMALL = {"requests": 6, "input_len": 32, "output_len": 24}


def small_spec(**kw) -> dict:
    return {"policies": ["ar", "eagle3"], "concurrency": [1, 3], **SMALL, **kw}


# --- grid ----------------------------------------------------------------------------------------------------


def test_grid_is_the_product_of_its_axes_with_policy_settings_expanded():
    spec = parse_spec({"policies": ["ar", 'echo{"budget":{"kind":"goodput","tokens":31}}',
                                    {"policy": "eagle3", "grid": {"steps": [3, 5], "num_draft_tokens": [6, 16]}}],
                       "concurrency": [1, 8], "tp": [1, 2], "seeds": [0, 1], **SMALL})
    cells = expand(spec)
    assert len(cells) == 6 * 2 * 2 * 2
    labels = {c.labels["policy"] for c in cells}
    assert labels == {"ar", "echo[goodput-31]", "eagle3[3,6]", "eagle3[3,16]", "eagle3[5,6]", "eagle3[5,16]"}
    assert len({c.key for c in cells}) == len(cells)          # every resolved config distinct
    assert [c.key for c in expand(spec)] == [c.key for c in cells]   # stable across expansions
    e = next(c for c in cells if c.labels["policy"] == "eagle3[5,16]" and c.labels["tp"] == 2)
    assert e.sim.policy == {"policy": "eagle3", "steps": 5, "num_draft_tokens": 16}
    assert e.sim.cluster.tp == 2 and e.workload.kind == "closed"
    # dotted keys reach into nested settings
    cells = expand(parse_spec({"policies": [{"policy": "echo", "budget": {"kind": "goodput"},
                                             "grid": {"budget.tokens": [16, 31]}}], "rates": [2.0], **SMALL}))
    assert [c.sim.policy["budget"] for c in cells] == [{"kind": "goodput", "tokens": 16},
                                                       {"kind": "goodput", "tokens": 31}]
    assert cells[0].workload.kind == "poisson" and cells[0].workload.rate_rps == 2.0


@pytest.mark.parametrize("data, field", [
    ({"policies": ["ar"], "rates": [1], "concurrency": [2]}, "concurrency"),
    ({"policies": ["ar"], "concurrency": [0]}, "concurrency"),
    ({"policies": ["ar"], "concurrency": [1], "colours": [1]}, "colours"),
    ({"policies": ["ar"], "concurrency": [1], "cluster": {"max_runing": 4}}, "cluster.max_runing"),
    ({"policies": ["ar"]}, "rates"),
    ({"policies": ["ar"], "concurrency": [1], "capacity": {"target": 1.5}}, "capacity.target"),
])
def test_bad_sweep_specs_name_the_field(data, field):
    with pytest.raises(SimError) as e:
        expand(parse_spec(data, path="s.yaml"))
    assert e.value.field == field
    assert "\n" not in str(e.value)


def test_bad_sweep_file_is_one_line_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policies: [ar, eagle3\nconcurrency: [1, 2]\n")
    with pytest.raises(SimError) as e:
        load_spec_file(bad)
    assert e.value.line is not None and str(bad) in str(e.value)
    assert main(["sweep", "--file", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("echosim: error:") and "bad.yaml" in err[0]
    assert main(["sweep", "--policies", "nosuch", "--concurrency", "1", "--requests", "2", "--serial",
                 "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "nosuch" in capsys.readouterr().err


# --- running -------------------------------------------------------------------------------------------------


def test_sweep_writes_table_advice_crossover_cells_and_plots(tmp_path):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("policies: [ar, eagle3]\nconcurrency: [1, 3]\nrequests: 6\ninput_len: 32\n"
                         "output_len: 24\n")
    out = tmp_path / "sw"
    assert main(["sweep", "--file", str(spec_file), "--out", str(out), "--serial", "--no-progress"]) == 0
    df = pd.read_csv(out / "sweep.csv")
    assert len(df) == 4 and list(df["policy"]) == ["ar", "eagle3", "ar", "eagle3"]
    for col in ("throughput_tok_s", "goodput_tok_s", "mat", "ttft_ms_p99", "tpot_ms_p50", "e2e_ms_p90",
                "verification_waste", "step_split_draft", "slo_attainment"):
        assert col in df.columns
    assert (df.loc[df["policy"] == "ar", "mat"] == 1.0).all()
    for key in df["key"]:  # every cell is a whole run folder
        for f in ("config.json", "requests.csv", "iterations.csv", "summary.json", "cell.json"):
            assert (out / "cells" / key / f).is_file()
    pq = pytest.importorskip("pyarrow.parquet")
    assert pq.read_table(out / "sweep.parquet").num_rows == 4
    advice = pd.read_csv(out / "advice.csv")
    assert list(advice["load"]) == [1, 3]
    for r in advice.to_dict("records"):
        best = df[df["load"] == r["load"]].sort_values("goodput_tok_s").iloc[-1]
        assert r["best_policy"] == best["policy"] and r["goodput_tok_s"] == pytest.approx(best["goodput_tok_s"])
    assert json.loads((out / "advice.json").read_text())[0]["policy"]["policy"] in ("ar", "eagle3")
    assert (out / "crossover.csv").is_file()
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _run(backend: str, out: Path, **kw) -> pd.DataFrame:
    res = run_sweep(parse_spec(small_spec()), out, backend=backend, jobs=2, progress=False, plots=False, **kw)
    assert res.ran == 4 and res.skipped == 0
    return res.table


def test_pool_gives_the_serial_table(tmp_path):
    serial = _run("serial", tmp_path / "serial")
    pool = _run("pool", tmp_path / "pool")
    pd.testing.assert_frame_equal(serial, pool)
    # and the CSVs on disk are byte-identical
    assert (tmp_path / "serial" / "sweep.csv").read_bytes() == (tmp_path / "pool" / "sweep.csv").read_bytes()


def test_local_ray_gives_the_pool_table(tmp_path):
    pytest.importorskip("ray")
    pool = _run("pool", tmp_path / "pool")
    ray_table = _run("ray", tmp_path / "ray")
    pd.testing.assert_frame_equal(pool, ray_table)
    assert (tmp_path / "pool" / "sweep.csv").read_bytes() == (tmp_path / "ray" / "sweep.csv").read_bytes()


@pytest.mark.parametrize("jobs", ["1", "2"])   # in this process, and on the pool
def test_rerun_after_an_interrupt_runs_only_the_missing_cells(tmp_path, jobs):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-sweep: the finished cells stay, the
    table lists them, and the same command again runs only the rest."""
    out = tmp_path / "sw"
    JOBS = jobs  # noqa: N806
    # cells of a few hundred ms each (the acceptance-table cache makes tiny cells a few ms: all 8 could finish
    # between two polls of a loaded machine, before the interrupt lands)
    cmd = [sys.executable, "-m", "echosim.cli", "sweep", "--policies", "ar,eagle3", "--concurrency", "1,2,3,4",
           "--requests", "400", "--input-len", "32", "--output-len", "128", "--jobs", JOBS, "--no-plots",
           "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # SIGINT back to its default in the child: a shell without job control starts background jobs with SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler (a CI run launched with `&` saw exit 0)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    cells = out / "cells"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(cells.glob("*/cell.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    done = {p.parent.name: p.stat().st_mtime_ns for p in cells.glob("*/cell.json")}
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert 2 <= len(done) < 8
    table = pd.read_csv(out / "sweep.csv")
    assert set(table["key"]) == set(done)                     # the partial table lists exactly the finished cells

    rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"8 cells: ran {8 - len(done)}, reused {len(done)} finished" in rerun.stdout
    assert not list(cells.glob(".tmp-*"))
    for key, mtime in done.items():                           # finished cells were not run again
        assert (cells / key / "cell.json").stat().st_mtime_ns == mtime
    assert len(pd.read_csv(out / "sweep.csv")) == 8
    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "8 cells: ran 0, reused 8 finished" in again.stdout


# --- capacity search -----------------------------------------------------------------------------------------


def test_rate_search_brackets_a_known_threshold_within_tolerance():
    for threshold in (0.3, 1.0, 7.3, 100.0):
        res = search_rate(lambda r, t=threshold: 1.0 if r <= t else 0.2, 0.99, 0.25, 256.0, 0.02)
        assert res.status == "ok"
        assert res.capacity <= threshold < res.first_failing
        assert res.first_failing / res.capacity - 1 <= 0.02
        assert len(res.probes) <= 20
    assert search_rate(lambda r: 0.0, 0.9, 1.0, 64.0, 0.05).status == "below_min"
    top = search_rate(lambda r: 1.0, 0.9, 1.0, 64.0, 0.05)
    assert top.status == "above_max" and top.capacity == 64.0


def test_replica_search_finds_the_fewest_replicas():
    for need in (1, 2, 5, 17):
        res = search_replicas(lambda n, k=need: 1.0 if n >= k else 0.5, 0.99, 64)
        assert res.status == "ok" and res.capacity == need
    assert search_replicas(lambda n: 0.0, 0.99, 8).status == "above_max"


class ConstantStep:
    """A synthetic step-time model: every iteration takes the same time, whatever the batch."""

    def __init__(self, ms: float):
        self.ms = ms

    def step_time(self, batch) -> StepTime:
        return StepTime(0.0, self.ms, 0.0, 0.0)


def test_capacity_search_on_the_simulator_finds_the_service_rate():
    """One request at a time (max_running 1), plain decoding, every iteration 10 ms, 20 output tokens: a
    request holds the replica 20 iterations = 0.2 s, so evenly spaced arrivals are served without queueing up
    to 5 req/s and queue without bound above it. With a TTFT SLO of 1.5 iterations the capacity is 5 req/s."""
    cfg = SimConfig(cluster=ClusterConfig(max_running=1, kv_blocks=4096), policy={"policy": "ar"},
                    slo_ttft_ms=15.0, slo_tpot_ms=1000.0)

    def attainment(rate: float) -> float:
        wl = WorkloadSpec(kind="gamma", rate_rps=rate, cv=0.01, requests=60, prompt_tokens=16, output_tokens=20)
        return simulate(cfg, wl, cost=ConstantStep(10.0)).summary["slo_attainment"]

    res = search_rate(attainment, 0.9, 0.5, 64.0, 0.01)
    assert res.status == "ok"
    assert res.capacity == pytest.approx(5.0, rel=0.02)
    assert res.first_failing / res.capacity - 1 <= 0.01
    assert res.capacity <= 5.0 * 1.001


def test_capacity_cli_writes_a_table(tmp_path, capsys):
    out = tmp_path / "cap"
    cmd = ["sweep", "--policies", "ar", "--capacity", "rate", "--target", "0.9", "--tol", "0.25", "--rate-min", "1",
           "--rate-max", "64", "--duration-s", "0.5", "--requests", "24", "--input-len", "32", "--output-len", "32",
           "--slo-ttft-ms", "40", "--slo-tpot-ms", "40", "--serial", "--no-progress", "--out", str(out)]
    assert main(cmd) == 0
    df = pd.read_csv(out / "capacity.csv")
    assert len(df) == 1 and df["status"][0] in ("ok", "above_max")
    probes = [tuple(map(float, p.split(":"))) for p in df["probe_points"][0].split(";")]
    passing = [r for r, a in probes if a >= 0.9]
    assert df["capacity"][0] == pytest.approx(max(passing))
    if df["status"][0] == "ok":
        assert df["first_failing"][0] / df["capacity"][0] - 1 <= 0.25
    assert (out / "capacity.png").is_file()
    # probes are cells (at least rate x duration_s requests each): a rerun reuses every one
    cells = [json.loads(p.read_text())["cell"] for p in (out / "cells").glob("*/cell.json")]
    assert len(cells) == len(probes)
    for c in cells:
        assert c["workload"]["requests"] == max(24, int(np.ceil(c["workload"]["rate_rps"] * 0.5)))
    assert main(cmd) == 0
    assert len(list((out / "cells").glob("*/cell.json"))) == len(cells)


# --- tables --------------------------------------------------------------------------------------------------


def _table(rows) -> pd.DataFrame:
    base = {"load_kind": "concurrency", "model": "m", "hardware": "h", "tp": 1, "replicas": 1, "trace": "",
            "seed": 0, "slo_attainment": 1.0, "mat": 1.0}
    return pd.DataFrame([{**base, "policy_config": json.dumps({"policy": p}), "policy": p, "load": x,
                          "throughput_tok_s": t, "goodput_tok_s": g} for p, x, t, g in rows])


def test_crossover_is_interpolated_where_throughput_falls_below_ar():
    df = _table([("ar", 1, 100, 100), ("spec", 1, 200, 200), ("ar", 4, 400, 400), ("spec", 4, 300, 300),
                 ("always", 1, 150, 150), ("always", 4, 500, 500)])
    cross = crossovers(df).set_index("policy")
    # ratio 2.0 at load 1, 0.75 at load 4: crosses 1.0 at 1 + (1 - 2) / (0.75 - 2) * 3 = 3.4
    assert cross.loc["spec", "crossover_load"] == pytest.approx(3.4)
    assert cross.loc["spec", "last_load_ahead"] == 1 and cross.loc["spec", "first_load_behind"] == 4
    assert np.isnan(cross.loc["always", "crossover_load"])
    assert crossovers(df[df["policy"] != "ar"]).empty


def test_advisor_picks_the_best_goodput_per_load():
    df = _table([("ar", 1, 100, 90), ("spec", 1, 200, 180), ("ar", 4, 400, 400), ("spec", 4, 300, 300)])
    adv = advise(df)
    assert list(adv["best_policy"]) == ["spec", "ar"]
    assert adv["gain_vs_ar"][0] == pytest.approx(2.0)
    assert adv["gain_vs_runner_up"][1] == pytest.approx(400 / 300, rel=1e-3)


# --- properties ----------------------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

_values = hs.one_of(hs.none(), hs.integers(-3, 70), hs.floats(-1, 100), hs.just(float("nan")), hs.text(max_size=6),
                    hs.lists(hs.one_of(hs.integers(-1, 40), hs.floats(0, 40), hs.text(max_size=4)), max_size=3),
                    hs.dictionaries(hs.text(max_size=5), hs.integers(), max_size=2))
_keys = hs.sampled_from(["policies", "rates", "concurrency", "loads", "models", "hardware", "tp", "replicas",
                         "traces", "seeds", "requests", "cluster", "capacity", "slo_ttft_ms", "colour"])


@settings(max_examples=150, deadline=None)
@given(hs.dictionaries(_keys, _values, max_size=6))
def test_any_sweep_mapping_expands_or_fails_with_one_line(data):
    """Whatever a sweep file holds: a grid of distinct cells, or one SimError line (never another exception)."""
    try:
        spec = parse_spec(data, path="s.yaml")
        cells = expand(spec)
    except SimError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("s.yaml") or "policy" in str(exc)
        return
    kind = "rates" if spec.rates else "concurrency" if spec.concurrency else "loads"
    loads = getattr(spec, kind) or [1.0]
    n = len(spec.seeds) * len(spec.traces) * len(spec.models) * len(spec.hardware) * len(spec.tp) * \
        len(spec.replicas) * len(loads)
    assert len(cells) % n == 0 and len(cells) >= n
    for c in cells:
        assert c.key == type(c).from_json(c.to_json()).key   # a cell survives shipping to a worker


@settings(max_examples=200, deadline=None)
@given(hs.floats(0.25, 255.0), hs.floats(0.001, 0.5))
def test_rate_search_brackets_any_threshold(threshold, tol):
    res = search_rate(lambda r: 1.0 if r <= threshold else 0.0, 0.99, 0.25, 256.0, tol)
    assert res.status == "ok"
    assert res.capacity <= threshold < res.first_failing
    assert res.first_failing / res.capacity - 1 <= tol


@pytest.mark.parametrize("jobs", [1, 2, 3, 8])
def test_pool_tasks_keep_each_simulator_config_together(jobs):
    """The pool ships cells in chunks of one simulator config (so a worker builds that config's acceptance
    tables once): every cell exactly once, a chunk never mixes configs, at least 2 x jobs chunks when there are
    enough cells, one cell a task for a single worker."""
    from echosim.sweep.api import _chunks

    cells = expand(parse_spec({"policies": ["ar", "eagle3", "echo"], "concurrency": [1, 2, 4, 8, 16],
                               "seeds": [0, 1]}))
    chunks = _chunks(cells, jobs)
    assert sorted(i for c in chunks for i in c) == list(range(len(cells)))
    for c in chunks:
        assert len({json.dumps(cells[i].sim.to_json(), sort_keys=True) for i in c}) == 1
    if jobs == 1:
        assert all(len(c) == 1 for c in chunks)
    else:
        assert len(chunks) >= min(2 * jobs, len(cells)) and len(chunks) >= 6   # 6 configs
    assert _chunks([], jobs) == []
