"""Strict replay (echosim/validate/crossval.py, `echosim validate`): the engine's step log, the overhead fit, the
comparison, and one small end-to-end run with the shipped pair behind a real server on 127.0.0.1."""

import json

import numpy as np
import pytest

from cost_models.interface import StepTime
from echo_exec.engine import Engine, IterationRecord, SamplingParams
from echo_exec.train_tiny import MODELS_DIR
from echosim.cli import main
from echosim.validate.crossval import METRICS, compare, format_breakdown, format_comparison, step_breakdown
from echosim.validate.step_overheads import SUSPECT_APE_PCT, Overheads, fit_overheads, priced_steps_ms, replay_drift

SMALL_EAGLE = {"steps": 3, "topk": 2, "num_draft_tokens": 6}


def test_engine_iteration_log_accounts_for_every_token():
    eng = Engine(MODELS_DIR / "tiny-target", MODELS_DIR / "tiny-draft", policy="eagle3", policy_config=SMALL_EAGLE,
                 max_running=4, num_kv_blocks=64, max_prefill_tokens=40, log_iterations=True)
    prompts = [list(b"def f(x):\n    return x + 1\n" * (i + 1)) for i in range(5)]
    eng.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    st, its = eng.stats(), eng.iterations
    assert len(its) == st["steps"] and all(it.step_ms > 0 for it in its)
    decode = [it for it in its if it.verify_tokens is not None]
    assert len(decode) == st["decode_steps"]
    assert sum(int(it.verify_tokens.sum()) for it in decode) == st["verify_tokens"]
    assert sum(it.accepted for it in decode) == st["verified_accepted"]
    assert sum(c for it in its for c, _ in it.prefill_chunks) == st["prefill_tokens"]
    assert all(sum(c for c, _ in it.prefill_chunks) <= 40 for it in its)  # the chunk budget
    for it in decode:
        B = len(it.verify_tokens)
        assert len(it.context_lens) == B and (it.context_lens > 0).all()
        assert len(it.draft_rows) == 3 and it.draft_rows[0] <= B  # depth 1: one row per drafting request
        assert all(r <= 2 * B for r in it.draft_rows[1:])          # deeper: its beam (topk 2)
        assert it.draft_ms + it.target_ms <= it.step_ms


class _LinearCost:
    """A stand-in step-time model: 2 ms per target token."""

    class params:  # noqa: N801
        step_overhead_ms = 0.5
        draft_depth_overhead_ms = 0.0

    def step_time(self, batch):
        return StepTime(0.0, 2.0 * float(batch.target_tokens), 0.0, 0.0)


def _iteration(rng, a, b, c, e=0.0):
    B = int(rng.integers(1, 9))
    verify = rng.integers(1, 12, B)
    depths = int(rng.integers(1, 4))  # a gate stops some steps' drafting early
    rows = tuple(float(rng.integers(1, 20)) if i < depths else 0.0 for i in range(3))
    tokens = int(verify.sum())
    ms = 2.0 * tokens + a + b * tokens + c * sum(rows) + e * depths
    return IterationRecord(start_s=0.0, step_ms=ms, verify_tokens=verify, context_lens=np.full(B, 100),
                           draft_rows=rows)


def test_overhead_fit_recovers_known_terms_and_shrugs_off_outliers():
    rng = np.random.default_rng(0)
    its = [_iteration(rng, 3.0, 0.25, 0.1, 0.8) for _ in range(200)]
    for it in its[:10]:  # a few steps stalled by the machine (GC, another process)
        it.step_ms *= 3
    over = fit_overheads(_LinearCost(), its)
    assert over.step_overhead_ms == pytest.approx(0.5 + 3.0, abs=0.1)  # the model's own overhead + the fitted one
    assert over.overhead_per_token_ms == pytest.approx(0.25, abs=0.01)
    assert over.overhead_per_draft_row_ms == pytest.approx(0.1, abs=0.01)
    assert over.overhead_per_draft_depth_ms == pytest.approx(0.8, abs=0.05)
    assert over.median_ape_pct < 1.0 and over.steps == 200
    # the fitted terms price the steps back: the clean ones to within 2%, the stalled ones at a third
    priced = priced_steps_ms(_LinearCost(), over, its)
    measured = np.array([it.step_ms for it in its])
    assert np.allclose(priced[10:], measured[10:], rtol=0.02)
    assert np.allclose(priced[:10], measured[:10] / 3, rtol=0.02)


def test_overhead_fit_hears_the_few_large_batches():
    """Calibration logs twenty batch-1 steps for each batch-16 one; the per-request term shows only in the large
    batches, under jitter and a few stalls in the batch-1 crowd."""
    rng = np.random.default_rng(2)
    its = []
    for B, n in ((1, 1000), (4, 250), (16, 50)):
        for _ in range(n):
            verify = rng.integers(2, 7, B)
            ms = 2.0 * verify.sum() + 3.0 + 0.1 * verify.sum() + 0.5 * B + rng.normal(0.0, 0.3)
            its.append(IterationRecord(start_s=0.0, step_ms=ms, verify_tokens=verify, context_lens=np.full(B, 100)))
    for it in its[:30]:
        it.step_ms += 20.0
    over = fit_overheads(_LinearCost(), its)
    assert over.overhead_per_request_ms == pytest.approx(0.5, abs=0.05)
    assert over.overhead_per_token_ms == pytest.approx(0.1, abs=0.02)
    assert over.step_overhead_ms == pytest.approx(0.5 + 3.0, abs=0.15)
    assert over.overhead_per_draft_row_ms == 0.0  # no step drafted: nothing to fit, nothing invented


def test_overhead_fit_splits_the_terms_by_the_phase_the_engine_timed():
    """Draft rows and requests move together (here rows = 9 per request), so the whole step's time cannot tell a
    per-request cost from a per-row one; the engine's phase timers
    can: drafting holds the per-row and per-depth work, verification the per-token and per-request work, the
    rest a constant. The fit follows the phases, so the simulator hands an adaptive budget the split the engine's
    timers show it (StepPricer.observed_ms)."""
    rng = np.random.default_rng(3)
    its = []
    for _ in range(300):
        B = int(rng.integers(1, 17))
        verify = rng.integers(1, 10, B)
        T = int(verify.sum())
        rows = (float(B), 4.0 * B, 4.0 * B)
        draft = 0.05 * sum(rows) + 0.7 * 3 + rng.normal(0.0, 0.05)
        target = 2.0 * T + 0.02 * T + 0.6 * B + rng.normal(0.0, 0.05)
        rest = 1.0 + rng.normal(0.0, 0.05)
        its.append(IterationRecord(start_s=0.0, step_ms=draft + target + rest, draft_ms=draft, target_ms=target,
                                   verify_tokens=verify, context_lens=np.full(B, 100), draft_rows=rows))
    over = fit_overheads(_LinearCost(), its)
    assert over.overhead_per_draft_row_ms == pytest.approx(0.05, abs=0.005)
    assert over.overhead_per_draft_depth_ms == pytest.approx(0.7, abs=0.05)
    assert over.overhead_per_request_ms == pytest.approx(0.6, abs=0.05)
    assert over.overhead_per_token_ms == pytest.approx(0.02, abs=0.01)
    assert over.step_overhead_ms == pytest.approx(0.5 + 1.0, abs=0.05)
    # without the phase times, the same steps fit as well in total but the split is not the engine's
    whole = [IterationRecord(start_s=0.0, step_ms=it.step_ms, verify_tokens=it.verify_tokens,
                             context_lens=it.context_lens, draft_rows=it.draft_rows) for it in its]
    lumped = fit_overheads(_LinearCost(), whole)
    assert lumped.median_ape_pct < 1.0
    assert abs(lumped.overhead_per_request_ms - 0.6) > 0.1 or abs(lumped.overhead_per_draft_row_ms - 0.05) > 0.01
    assert np.allclose(priced_steps_ms(_LinearCost(), lumped, whole), priced_steps_ms(_LinearCost(), over, whole),
                       rtol=0.02)


def test_overhead_fit_never_goes_negative():
    rng = np.random.default_rng(1)
    its = [_iteration(rng, 0.0, 0.0, 0.0) for _ in range(50)]
    for it in its:
        it.step_ms *= 0.8  # the model over-predicts: nothing left to attribute
    over = fit_overheads(_LinearCost(), its)
    assert over.overhead_per_token_ms >= 0 and over.overhead_per_draft_row_ms >= 0
    assert over.step_overhead_ms >= 0.5
    assert over.forward_share == pytest.approx(1.25, rel=1e-3)


def test_overheads_suspect_when_forwards_outrun_the_steps():
    ok = Overheads(1.0, 0.01, 0.1, 0.0, steps=400, median_ape_pct=5.0, forward_share=0.76)
    assert not ok.suspect
    assert Overheads(0.0, 0.01, 0.0, 0.0, steps=400, median_ape_pct=5.0, forward_share=1.25).suspect
    assert Overheads(1.0, 0.01, 0.1, 0.0, steps=400, median_ape_pct=46.8, forward_share=0.9).suspect


def test_replay_drift_is_the_median_ratio():
    its = [IterationRecord(start_s=0.0, step_ms=ms) for ms in (10.0, 12.0, 30.0)]
    assert replay_drift(its, np.array([10.0, 10.0, 10.0])) == 1.2  # one stalled step does not move it
    assert replay_drift([], np.zeros(0)) is None


def test_compare_signed_and_absolute_errors():
    engine = {"throughput_tok_s": 200.0, "mat": 4.0, "ttft_ms": {"mean": 100.0, "p50": 80.0, "p90": 0.0, "p99": None},
              "tpot_ms": {"mean": 10.0, "p50": 10.0, "p90": 12.0, "p99": 15.0},
              "e2e_ms": {"mean": 1000.0, "p50": 900.0, "p90": 1500.0, "p99": 2000.0}}
    sim = {**engine, "throughput_tok_s": 180.0, "mat": 4.4, "ttft_ms": {"mean": 125.0, "p50": 80.0, "p90": 5.0,
                                                                       "p99": 1.0}}
    rows = {r["metric"]: r for r in compare(engine, sim)}
    assert len(rows) == len(METRICS) == 14
    assert rows["throughput_tok_s"]["signed_pct"] == pytest.approx(-10.0)
    assert rows["throughput_tok_s"]["abs_pct"] == pytest.approx(10.0)
    assert rows["mat"]["signed_pct"] == pytest.approx(10.0)
    assert rows["ttft_ms.mean"]["signed_pct"] == pytest.approx(25.0)
    assert rows["ttft_ms.p50"]["signed_pct"] == 0.0
    assert rows["ttft_ms.p90"]["signed_pct"] is None  # no error relative to zero
    assert rows["ttft_ms.p99"]["engine"] is None and rows["ttft_ms.p99"]["abs_pct"] is None
    assert rows["mat"]["engine_rerun_abs_pct"] is None  # no rerun, no noise floor
    rerun_a = {**engine, "throughput_tok_s": 210.0}
    rerun_b = {**engine, "throughput_tok_s": 170.0}
    rows = {r["metric"]: r for r in compare(engine, sim, [rerun_a, rerun_b])}
    assert rows["throughput_tok_s"]["engine_rerun_abs_pct"] == pytest.approx(15.0)  # the larger of 5% and 15%
    assert rows["mat"]["engine_rerun_abs_pct"] == 0.0
    # the simulator against the three runs together: mean 193.33, range 170-210; 180 is inside, 4.4 MAT is not
    thr = rows["throughput_tok_s"]
    assert thr["engine_runs"] == 3 and thr["engine_mean"] == pytest.approx(580.0 / 3)
    assert (thr["engine_min"], thr["engine_max"]) == (170.0, 210.0)
    assert thr["signed_pct_vs_mean"] == pytest.approx(round((180.0 - 580.0 / 3) / (580.0 / 3) * 100, 2))
    assert thr["sim_in_engine_range"] is True and rows["mat"]["sim_in_engine_range"] is False
    assert "engine_mean" not in rows["ttft_ms.p99"]   # a run without the metric: no range
    table = format_comparison(list(rows.values()))
    header, rule, thr_line = table.splitlines()[:3]
    assert header.count("|") == rule.count("|") == thr_line.count("|") == 10
    assert "193.3 (170.0 - 210.0)" in thr_line and thr_line.rstrip(" |").endswith("yes")
    assert "no" in table.splitlines()[3]   # mat: outside the runs' range
    # one run: the table keeps its six columns
    assert format_comparison(compare(engine, sim)).splitlines()[0].count("|") == 7


def test_compare_takes_the_mean_of_several_simulated_seeds():
    """Several simulated runs of the same replay (seeds) are compared by their mean, with their range shown: one
    seed's MAT moved by up to 12% against another's on a 48-request replay."""
    engine = {"throughput_tok_s": 200.0, "mat": 3.0}
    seeds = [{"throughput_tok_s": t, "mat": m} for t, m in ((190.0, 2.7), (210.0, 3.3), (205.0, 3.15))]
    rows = {r["metric"]: r for r in compare(engine, seeds, [{"throughput_tok_s": 220.0, "mat": 2.8}])}
    mat = rows["mat"]
    assert mat["sim"] == pytest.approx(3.05) and (mat["sim_min"], mat["sim_max"]) == (2.7, 3.3)
    assert mat["sim_seeds"] == 3 and mat["signed_pct"] == pytest.approx(round(0.05 / 3.0 * 100, 2))
    assert mat["signed_pct_vs_mean"] == pytest.approx(round((3.05 - 2.9) / 2.9 * 100, 2))
    assert rows["throughput_tok_s"]["sim"] == pytest.approx(605.0 / 3)
    assert "ttft_ms.mean" in rows and rows["ttft_ms.mean"]["sim"] is None   # a metric no seed has
    table = format_comparison(list(rows.values()))
    assert "sim: mean of 3 seeds (lowest - highest)" in table.splitlines()[0]
    assert "3.050 (2.700 - 3.300)" in table
    # one seed, given alone or as a list of one, is the single-run comparison
    assert compare(engine, seeds[:1]) == compare(engine, seeds[0])


def test_validate_end_to_end_small(tmp_path, capsys, monkeypatch):
    """The whole run; its first overhead fit is made to look like a profile taken at another machine speed, so
    validate profiles once more and refits the overheads on the same calibration steps."""
    import dataclasses

    import echosim.validate.crossval as cv

    calls = {"profile": 0, "fit": 0}
    real_profile, real_fit = cv.profile_and_fit, cv.fit_overheads

    def profile(*a, **k):
        calls["profile"] += 1
        return real_profile(*a, **k)

    def fit(*a, **k):
        calls["fit"] += 1
        over = real_fit(*a, **k)
        return dataclasses.replace(over, forward_share=1.4) if calls["fit"] == 1 else over

    monkeypatch.setattr(cv, "profile_and_fit", profile)
    monkeypatch.setattr(cv, "fit_overheads", fit)
    out = tmp_path / "val"
    code = main(["validate", "--limit", "6", "--max-prompt-tokens", "48", "--max-output-tokens", "16",
                 "--max-running", "4", "--calibration-prompts", "8", "--policy", "eagle3",
                 "--policy-config", json.dumps(SMALL_EAGLE), "--time-scale", "0.25", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| throughput_tok_s |" in printed and "| e2e_ms.p99 |" in printed
    # `validate --replay` on the engine's replay folder, with the run's own fits: no engine runs, same errors
    again = tmp_path / "again"
    assert main(["validate", "--replay", str(out / "engine"), "--cost-model", str(out / "cost_fit.json"),
                 "--acceptance", str(out / "acceptance.json"), "--overheads", str(out / "overheads.json"),
                 "--policy", "eagle3", "--policy-config", json.dumps(SMALL_EAGLE), "--max-running", "4",
                 "--max-prompt-tokens", "48", "--max-output-tokens", "16", "--out", str(again)]) == 0
    replayed = json.loads((again / "validation.json").read_text())["metrics"]
    res = json.loads((out / "validation.json").read_text())
    assert [r["metric"] for r in replayed] == [r["metric"] for r in res["metrics"]]
    for mine, theirs in zip(replayed, res["metrics"], strict=True):  # arrivals go through the CSV's 6 decimals
        assert mine["engine"] == theirs["engine"], mine["metric"]
        # both sides are stored rounded to 3 decimals: one unit in that place apart, plus float slack
        assert mine["sim"] == pytest.approx(theirs["sim"], rel=1e-5, abs=1.5e-3), mine["metric"]
        assert mine["signed_pct"] == pytest.approx(theirs["signed_pct"], abs=0.011), mine["metric"]
    assert "| throughput_tok_s |" in capsys.readouterr().out
    rerun = json.loads((again / "config.json").read_text())
    assert rerun["replay"] == str(out / "engine") and rerun["acceptance"] == str(out / "acceptance.json")
    for name in ("config.json", "profile_target.csv", "profile_draft.csv", "cost_fit.json", "overheads.json",
                 "acceptance.json", "calibration_records.jsonl", "calibration_iterations.csv",
                 "engine/requests.csv", "engine/summary.json", "engine/iterations.csv", "sim/requests.csv",
                 "sim/summary.json", "sim/iterations.csv", "sim/trace.jsonl", "validation.json", "validation.md",
                 "engine_rerun1/summary.json"):
        assert (out / name).is_file(), name
    res = json.loads((out / "validation.json").read_text())
    eng, sim = res["engine"], res["sim"]
    assert eng["completed"] == 6 and eng["failed"] == 0 and sim["requests"] == 6
    # the simulator ran at 8 seeds (the default) and is compared by their mean; its files are the first seed's
    assert [x["seed"] for x in res["sim_seeds"]] == list(range(8))
    mats = [x["mat"] for x in res["sim_seeds"]]
    assert res["sim_seeds"][0]["mat"] == sim["mat"]
    mat_row = next(r for r in res["metrics"] if r["metric"] == "mat")
    assert mat_row["sim"] == pytest.approx(np.mean(mats)) and mat_row["sim_min"] == min(mats)
    assert len(res["sim_at_replay_speed_seeds"]) == 8
    assert "mean of 8 seeds" in (out / "validation.md").read_text()
    assert eng["output_tokens"] == sim["output_tokens"] == 6 * 16  # ignore_eos: the trace's lengths, both sides
    rows = {r["metric"]: r for r in res["metrics"]}
    assert all(rows[m]["engine"] is not None and rows[m]["sim"] is not None for m in rows)
    # the acceptance model fitted on other prompts predicts the engine's MAT, and the fitted step times its speed
    assert rows["mat"]["abs_pct"] < 25, rows["mat"]
    assert rows["throughput_tok_s"]["abs_pct"] < 60, rows["throughput_tok_s"]
    assert res["overheads"]["forward_share"] > 0.3
    assert res["engine_reruns"][0]["output_tokens"] == 6 * 16 and rows["mat"]["engine_rerun_abs_pct"] == 0.0
    # the step breakdown accounts for every step on both sides
    assert sum(r["engine_n"] for r in res["steps"]) == eng["iterations"]
    assert sum(r["sim_n"] for r in res["steps"]) == len((out / "sim" / "iterations.csv").read_text().splitlines()) - 1
    assert "| decode, batch 1 |" in printed and "Steps, engine against simulator" in (out / "validation.md").read_text()
    # the acceptance model is the maximum-likelihood fit of the records, its skill not moved to a target MAT; the
    # records' tree MAT is reported beside the records run's
    from echosim.sim.acceptance import AcceptanceModel
    from echosim.sim.acceptance_fit import fit_records
    from echosim.spec.records import read_records

    saved = AcceptanceModel.load(out / "acceptance.json")
    ml = fit_records(read_records(out / "calibration_records.jsonl"), name="engine-calibration").model
    assert saved.skills["default"] == pytest.approx(ml.skills["default"], abs=1e-3)
    assert "on the records' tree it gives MAT" in printed and "step-to-step autocorrelation" in printed
    # the engine's fitted cost per draft depth goes into the step-time fit the simulator prices with
    fit = json.loads((out / "cost_fit.json").read_text())
    assert fit["params"]["draft_depth_overhead_ms"] == pytest.approx(res["overheads"]["overhead_per_draft_depth_ms"])
    # the replay's steps against their calibrated price: a ratio near 1 on a steady machine
    assert 0.3 < res["replay_steps_over_priced"] < 3.0
    # the simulator again at the replays' own speed: every step priced that many times the calibrated price
    speed = res["replay_speed"]
    assert 0.3 < speed < 3.0 and (out / "sim_at_replay_speed" / "iterations.csv").is_file()
    at = {r["metric"]: r for r in res["metrics_at_replay_speed"]}
    assert at["mat"]["engine"] == rows["mat"]["engine"]
    slow = np.genfromtxt(out / "sim_at_replay_speed" / "iterations.csv", delimiter=",", names=True)
    base = np.genfromtxt(out / "sim" / "iterations.csv", delimiter=",", names=True)
    if len(slow) == len(base) and (slow["verified_tokens"] == base["verified_tokens"]).all():  # same decisions
        assert slow["step_ms"] == pytest.approx(base["step_ms"] * speed, rel=1e-3, abs=2e-4)
    assert "at the replays' own machine speed" in (out / "validation.md").read_text()
    # the suspect first fit: profiled again, refitted, both kept
    assert calls == {"profile": 2, "fit": 2} and "profiling again" in printed
    assert res["overheads_before_reprofile"]["forward_share"] == 1.4
    assert res["overheads_suspect"] == (res["overheads"]["forward_share"] > 1.0
                                        or res["overheads"]["median_ape_pct"] > SUSPECT_APE_PCT)



def test_step_breakdown_groups_steps_by_kind(tmp_path):
    head = "replica,start_s,end_s,batch,prefill_tokens,verified_tokens,accepted,draft_ms,verify_ms,lm_head_ms," \
           "overhead_ms,step_ms,kv_tokens,waiting\n"
    row = "0,0,0,{b},{p},{v},0,0,0,0,0,{ms},0,0\n"
    (tmp_path / "e.csv").write_text(head + row.format(b=1, p=0, v=4, ms=10) + row.format(b=1, p=0, v=6, ms=12)
                                    + row.format(b=5, p=0, v=20, ms=30) + row.format(b=2, p=100, v=8, ms=90)
                                    + row.format(b=0, p=50, v=0, ms=40))
    (tmp_path / "s.csv").write_text(head + row.format(b=20, p=0, v=40, ms=50))
    rows = {r["steps"]: r for r in step_breakdown(tmp_path / "e.csv", tmp_path / "s.csv")}
    assert set(rows) == {"decode, batch 1", "decode, batch 4-7", "decode, batch 16-31", "with prefill chunks"}
    one = rows["decode, batch 1"]
    assert (one["engine_n"], one["engine_step_ms"], one["engine_tokens_per_request"]) == (2, 11.0, 5.0)
    assert one["sim_n"] == 0 and one["sim_step_ms"] is None
    pre = rows["with prefill chunks"]
    assert pre["engine_n"] == 2 and pre["engine_prefill_tokens"] == 75.0
    assert pre["engine_tokens_per_request"] == 4.0  # the prefill-only step decodes nobody
    assert rows["decode, batch 16-31"]["sim_tokens_per_request"] == 2.0
    assert "| decode, batch 16-31 | 0 | 1 |" in format_breakdown(list(rows.values()))
    priced = {r["steps"]: r for r in step_breakdown(tmp_path / "e.csv", tmp_path / "s.csv",
                                                     np.array([9.0, 13.0, 33.0, 80.0, 40.0]))}
    assert priced["decode, batch 1"]["engine_priced_ms"] == 11.0
    assert priced["with prefill chunks"]["engine_priced_ms"] == 60.0
    table = format_breakdown(list(priced.values()))
    assert "engine steps priced by the model" in table and "| decode, batch 1 | 2 | 0 | 11.0 | 11.0 | - |" in table
    with pytest.raises(ValueError):
        step_breakdown(tmp_path / "e.csv", tmp_path / "s.csv", np.zeros(3))


@pytest.mark.parametrize("args, words", [
    (["--model", "{tmp}/nope"], ["not a model directory", "nope"]),
    (["--policy", "echo", "--policy-config", '{"steps": 0}'], ["policy_config", "steps"]),
    (["--policy", "nosuch"], ["unknown policy", "nosuch"]),
    (["--trace", "{tmp}/missing.jsonl"], ["no such trace file", "missing.jsonl"]),
    (["--limit", "0"], ["limit"]),
])
def test_validate_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, words):
    code = main(["validate", *[a.replace("{tmp}", str(tmp_path)) for a in args], "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("echosim: error:"), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "v").exists()  # nothing written before the inputs are checked


def test_calibration_reaches_the_largest_batch_with_more_prompts_than_files(tmp_path):
    """The default calibration has a prompt for every slot of its largest batch (at max_running 64, 16 prompts
    never ran a batch above 16), and asking for more prompts than there are files cuts other windows of them."""
    from echosim.validate.crossval import CrossValConfig, calibration_prompts

    cfg = CrossValConfig(model=str(MODELS_DIR / "tiny-target"), draft=None, policy="ar", max_running=64)
    assert cfg.batches() == [1, 16, 64] and cfg.n_calibration_prompts() == 64
    assert CrossValConfig(model="m", draft=None, max_running=4).n_calibration_prompts() == 16
    assert CrossValConfig(model="m", draft=None, max_running=64, calibration_prompts=8).n_calibration_prompts() == 8
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}.py"
        f.write_bytes(bytes(i * 40 + k % 37 for k in range(400)))  # file i's bytes: 40 i .. 40 i + 36
        files.append(f)
    prompts = calibration_prompts(files, 10, 32, seed=1)
    assert len(prompts) == 10 and all(len(p) == 32 for p in prompts)
    assert sorted({p[0] // 40 for p in prompts}) == [0, 1, 2]         # every file used
    assert calibration_prompts(files, 10, 32, seed=1) == prompts      # seeded
    assert len({tuple(p) for p in prompts}) > 3                       # other windows, not copies


@pytest.mark.parametrize("pair", ["tiny-draft", "wide-draft"])
def test_records_of_a_shipped_echo_tree_show_every_candidate(pair):
    """validate fits ECHO's acceptance model to a static tree of its draft shape; that tree must verify every
    candidate, else the fit falls back to the parametric draft marginal (the shipped 5 x 4 tree drafts 68
    candidates, and a 64-token cap left its fit parametric, with drafts surer at depth than the engine's)."""
    from echosim.spec.policies import make_policy
    from echosim.validate.crossval import CrossValConfig, drafted_candidates, records_shape, verifies_every_candidate

    shipped = json.loads((MODELS_DIR / pair / "policy-echo.json").read_text())
    shipped.pop("policy")
    shipped.pop("calibration", None)
    shape = records_shape(CrossValConfig(model="m", draft="d", policy="echo", policy_config=shipped))
    plan = make_policy("echo", shipped).plan(1)
    assert (shape["steps"], shape["topk"]) == (plan.depth, plan.k)
    assert shape["num_draft_tokens"] == 1 + drafted_candidates(plan) > 64
    assert verifies_every_candidate("eagle3", shape)
