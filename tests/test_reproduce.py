"""`echosim reproduce paper`: rows, summary, report and plots on a tiny scale (the CI run is --quick)."""

from __future__ import annotations

import json

import pytest

from echosim.cli import main
from echosim.sim.reproduce import (
    BATCH1,
    CONCURRENCY,
    MODELS,
    Reproduction,
    Scale,
    preset_tree,
    reference_echo_policy,
    write_report,
)
from echosim.spec.policies import make_policy


def test_paper_tables_are_complete():
    assert set(BATCH1) == set(MODELS)
    for methods in BATCH1.values():
        assert all(len(v) == 5 for v in methods.values())
    assert sorted(CONCURRENCY) == [4, 8, 16, 32, 64]


def test_batch1_echo_is_the_reference_implementations_setting():
    """Batch 1 runs ECHO as the authors' reference code sets it per model: gates by loop index i at depth i + 2
    (those deeper than the tree never fire), a root gate 0.2 widening to 20, the same token budget when a
    request stops early; all_gated (the diagnostic floor) sets every gate's threshold to 1, not the root's."""
    q8 = reference_echo_policy("Qwen3-8B", (5, 8, 32))
    assert q8["gates"] == [[4, 0.3]] and q8["root_threshold"] == 0.2 and q8["root_width"] == 20
    assert q8["remaining_num_draft_tokens"] == q8["num_draft_tokens"] == 32 and q8["budget"]["tokens"] == 31
    assert reference_echo_policy("Qwen3-32B", (5, 8, 32))["gates"] == [[3, 0.2]]
    assert reference_echo_policy("LLaMA3.1-8B", (10, 10, 60))["gates"] == [[6, 0.3], [10, 0.5]]
    assert reference_echo_policy("Vicuna-13B", (10, 10, 60))["gates"] == [[3, 0.2], [6, 0.3]]  # the code's own
    floor = reference_echo_policy("LLaMA3.1-8B", (10, 10, 60), all_gated=True)
    assert floor["gates"] == [[6, 1.0], [10, 1.0]] and floor["root_threshold"] == 0.2
    for paper_model, (model, _) in MODELS.items():  # every batch-1 config is a valid policy
        cfg = reference_echo_policy(paper_model, preset_tree(model))
        pol = make_policy(cfg.pop("policy"), cfg)
        assert pol.config.root_width == 20 and pol.config.gates


def test_default_is_the_kernel_cost_model():
    """The engine overheads fitted to the paper's EAGLE-3 column are a sensitivity run, not the default."""
    assert Reproduction(Scale.named(True)).engine_overhead is False


def test_concurrency_rows_and_report(tmp_path):
    progress = []
    rep = Reproduction(Scale(1, 1, 1, 1), progress.append, only={"concurrency"})
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
    # the step times the paper's throughputs imply, against the simulated ones; marginal cost per added request
    assert "step times under concurrency" in text and "off (default)" in text
    for b in CONCURRENCY:
        step = rep.details[f"Qwen3-8B batch {b}"]["step_ms"]["EAGLE-3"]
        mat = rep.details[f"Qwen3-8B batch {b}"]["sim_mat"]["EAGLE-3"]
        assert step["paper"] == pytest.approx(b * mat / CONCURRENCY[b][3] * 1000, rel=1e-2)
        assert step["paper"] > step["sim"] > 0  # the paper's engine is slower than the H100's kernels
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
