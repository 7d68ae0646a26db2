"""`echosim reproduce paper`: rows, summary, report and plots on a tiny scale (the CI run is --quick)."""

from __future__ import annotations

import json

import pytest

from echosim.cli import main
from echosim.sim.reproduce import BATCH1, CONCURRENCY, MODELS, Reproduction, Scale, write_report


def test_paper_tables_are_complete():
    assert set(BATCH1) == set(MODELS)
    for methods in BATCH1.values():
        assert all(len(v) == 5 for v in methods.values())
    assert sorted(CONCURRENCY) == [4, 8, 16, 32, 64]


def test_concurrency_rows_and_report(tmp_path):
    progress = []
    rep = Reproduction(Scale(1, 1, 1, 1), progress.append, only={"concurrency"}, engine_overhead=False)
    summary = rep.run()
    rows = [r for r in rep.rows if r.table == "concurrency"]
    assert [r.key for r in rows] == [f"Qwen3-8B batch {b}" for b in CONCURRENCY]
    for r in rows:
        assert r.paper is not None and abs(r.error - (r.simulated - r.paper)) <= 0.02
        assert r.ordering_ok == ((r.simulated > 0) == (r.paper > 0))
        assert r.within_5pt == (abs(r.error) <= 5)
    assert summary["gain_rows"] == 5 and 0 <= summary["within_5_points"] <= 1
    assert len(progress) == 10 and progress[0].startswith("[1] concurrency")
    path = write_report(rep, summary, tmp_path, "echosim reproduce paper --only concurrency")
    text = path.read_text()
    assert "| Qwen3-8B batch 16 | ECHO over EAGLE-3 (%) | 36.24 |" in text and "Why rows may be off" in text
    assert (tmp_path / "gains.png").stat().st_size > 1000
    data = json.loads((tmp_path / "rows.json").read_text())
    assert len(data["rows"]) == 5 and data["summary"]["gain_rows"] == 5


def test_cli_bad_only(tmp_path, capsys):
    assert main(["reproduce", "paper", "--only", "tables", "--out", str(tmp_path)]) == 2
    assert "--only" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_reproduction_runs_every_table(tmp_path, capsys):
    """The CI run: every table at the quick scale (about 3 minutes on 2 cores)."""
    assert main(["reproduce", "paper", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "rows.json").read_text())
    tables = {r["table"] for r in data["rows"]}
    assert tables == {"batch1", "concurrency", "crossover", "highload", "verify_cost", "ablation"}
    s = data["summary"]
    assert s["echo_vs_eagle3_rows"] == 37 and s["gain_rows"] == 35
    assert (tmp_path / "report.md").is_file() and (tmp_path / "crossover.png").is_file()
    assert "progress.log" in {p.name for p in tmp_path.iterdir()}
