"""Fitting the acceptance model: maximum likelihood from records, the MAT calibration of the presets, the CLI."""

import json

import numpy as np
import pytest

from echosim.cli import main
from echosim.errors import UserError
from echosim.sim.acceptance import AcceptanceModel, AcceptParams, DraftParams, measure_mat
from echosim.sim.acceptance_fit import calibrate_skill, fit_records, infer_parent_accepted, simulate_records
from echosim.sim.reproduce import BATCH1
from echosim.spec.policies import make_policy
from echosim.spec.records import read_records, write_records

EAGLE3 = {"steps": 5, "topk": 8, "num_draft_tokens": 32}
TRUE = AcceptanceModel(
    "true", DraftParams(conf_mean=[2.0, 1.8, 1.6, 1.5, 1.4], conf_ease=1.0, conf_sd=1.5, rank_decay=1.2,
                        rank_sd=0.6),
    AcceptParams(gamma=[0.0, -0.2, -0.4, -0.5, -0.6], beta=[1.0, 1.3, 0.8, 1.0, 1.0], rank_bias=-0.3,
                 sigma_request=0.5, sigma_step=0.8),
    {"gsm8k": 0.3, "cnn_dm": -0.2})


@pytest.fixture(scope="module")
def records():
    return simulate_records(TRUE, make_policy("eagle3", EAGLE3), ["gsm8k", "cnn_dm"], requests=96, steps=100, seed=1)


@pytest.fixture(scope="module")
def fitted(records):
    return fit_records(records)  # the default, logit-normal, is the generating form: its parameters come back


def test_ml_fit_recovers_the_generating_parameters(fitted):
    m, a, d = fitted.model, fitted.model.accept_params, fitted.model.draft_params
    assert fitted.report["converged"]
    assert abs(a.sigma_step - 0.8) < 0.15 and abs(a.sigma_request - 0.5) < 0.2
    assert np.allclose(a.gamma, TRUE.accept_params.gamma, atol=0.2)
    assert np.allclose(a.beta, TRUE.accept_params.beta, atol=0.2)
    assert abs(a.rank_bias + 0.3) < 0.25
    assert abs((m.skills["gsm8k"] - m.skills["cnn_dm"]) - 0.5) < 0.3
    assert np.allclose(d.conf_mean, TRUE.draft_params.conf_mean, atol=0.3)
    assert abs(d.conf_ease - 1.0) < 0.25 and abs(d.conf_sd - 1.5) < 0.15
    # what matters downstream: the fitted model gives nearly the same MAT (the fit runs a few percent
    # optimistic, docs/ACCEPTANCE.md; a broken fit is off by far more)
    pol = make_policy("eagle3", EAGLE3)
    for ds in ("gsm8k", "cnn_dm"):
        want = measure_mat(TRUE, pol, ds, requests=256, steps=8)["mat"]
        got = measure_mat(m, pol, ds, requests=256, steps=8)["mat"]
        assert abs(got / want - 1) < 0.08, (ds, got, want)


def test_fit_quality_is_reported_per_depth_and_draft_prob(fitted):
    r = fitted.report
    assert r["pseudo_r2"] > 0.2 and r["auroc"] > 0.8
    for row in r["by_depth"] + r["by_q"]:
        assert abs(row["observed"] - row["predicted"]) < 0.08 or row["nodes"] < 200, row


def test_parent_accepted_is_written_read_and_inferred(records, tmp_path):
    path = tmp_path / "r.jsonl"
    write_records(path, records)
    back = read_records(path)
    assert np.array_equal(back.parent_accepted, records.parent_accepted)
    # an old file without the field still reads, and the fit infers the field from chained path probabilities
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({k: v for k, v in x.items() if k != "parent_accepted"}) + "\n"
                           for x in lines))
    legacy = read_records(old)
    assert legacy.parent_accepted is None
    assert (infer_parent_accepted(legacy) == records.parent_accepted).mean() > 0.995


def test_calibrate_skill_hits_a_target_mat():
    pol = make_policy("eagle3", EAGLE3)
    fit = calibrate_skill(TRUE, pol, "gsm8k", 3.0, requests=256, steps=8)
    assert abs(fit.simulated_mat - 3.0) < 0.03 and fit.evaluations <= 14
    again = measure_mat(TRUE.with_skill("gsm8k", fit.skill), pol, "gsm8k", requests=256, steps=8)["mat"]
    assert abs(again - fit.simulated_mat) < 1e-9  # same seed: deterministic


@pytest.mark.parametrize("preset,paper_name,dataset,col", [
    ("qwen3-8b", "Qwen3-8B", "gsm8k", 1), ("qwen3-8b", "Qwen3-8B", "cnn_dm", 2),
    ("qwen3-235b-a22b", "Qwen3-235B", "humaneval", 0), ("llama-3.1-8b", "LLaMA3.1-8B", "alpaca", 3)])
def test_presets_reproduce_the_paper_eagle3_mat(preset, paper_name, dataset, col):
    m = AcceptanceModel.preset(preset)
    stored = m.calibration["datasets"][dataset]["target_mat"]
    assert BATCH1[paper_name]["EAGLE-3"][col][0] == stored  # the paper's Table 1, as reproduce ships it
    pol = make_policy("eagle3", {k: v for k, v in m.policy.items() if k != "policy"})
    got = measure_mat(m, pol, dataset, requests=512, steps=6, seed=99)["mat"]
    assert abs(got / stored - 1) < 0.05, (preset, dataset, got, stored)


def test_cli_fit_acceptance(records, tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    write_records(path, records)
    out = tmp_path / "m.json"
    assert main(["fit-acceptance", "--records", str(path), "-o", str(out), "--base", "qwen3-8b"]) == 0
    text = capsys.readouterr().out
    assert "pseudo-R2" in text and "sigma_step" in text and "depth   gamma" in text
    m = AcceptanceModel.load(out)
    assert set(m.datasets) == {"cnn_dm", "gsm8k", "default"} and m.vocab_size == 151936


def test_cli_bad_records_and_bad_preset_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0, "request": 1, "depth": 1, "rank": 0, "draft_prob": 0.5, "path_prob": 0.5, '
                   '"accepted": true}\n{"step": 0, "request": 1, "depth": 1, "rank": "x"}\n')
    assert main(["fit-acceptance", "--records", str(bad), "-o", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:2" in err
    few = tmp_path / "few.jsonl"
    few.write_text(bad.read_text().splitlines()[0] + "\n")
    assert main(["fit-acceptance", "--records", str(few), "-o", str(tmp_path / "m.json")]) == 2
    assert "too few usable records" in capsys.readouterr().err
    flag = tmp_path / "flag.jsonl"
    flag.write_text(bad.read_text().splitlines()[0][:-1] + ', "parent_accepted": 1}\n')
    assert main(["fit-acceptance", "--records", str(flag), "-o", str(tmp_path / "m.json")]) == 2
    assert "field 'parent_accepted'" in capsys.readouterr().err
    assert main(["fit-acceptance", "--records", str(bad), "-o", str(tmp_path / "m.json"), "--base", "nope"]) == 2
    assert "unknown acceptance preset 'nope'" in capsys.readouterr().err


def test_fit_to_engine_records_predicts_the_engine_mat(tmp_path):
    """Records of the shipped pair in the real engine: the fitted model's MAT for another tree shape matches the
    engine's on other prompts (benchmarks/acceptance_from_engine.py does the same at full size)."""
    from echo_exec.engine import Engine, SamplingParams
    from echo_exec.train_tiny import MODELS_DIR, split_files

    _, held = split_files()
    files = [f for f in held if f.stat().st_size > 3000][:16]
    prompts = [list(f.read_bytes()[1000:1128]) for f in files]

    def engine(shape, batch, records=None):
        eng = Engine(MODELS_DIR / "tiny-target", MODELS_DIR / "tiny-draft", policy="eagle3", policy_config=shape,
                     max_running=8, records_path=records)
        eng.generate(batch, SamplingParams(max_new_tokens=64))
        eng.flush_records()
        return eng.stats()["avg_accept_length"]

    engine({"steps": 4, "topk": 4, "num_draft_tokens": 16}, prompts[:10], tmp_path / "r.jsonl")
    fit = fit_records(read_records(tmp_path / "r.jsonl"))
    chain = {"steps": 4, "topk": 1, "num_draft_tokens": 5}
    real = engine(chain, prompts[10:])
    predicted = measure_mat(fit.model, make_policy("eagle3", chain), "default", requests=512, steps=12)["mat"]
    assert real > 2.0 and abs(predicted / real - 1) < 0.1, (predicted, real)


def _top_logits(rec, depth: int, on_path: bool) -> np.ndarray:
    sel = (rec.depth == depth) & (rec.rank == 0) & (rec.parent_accepted if on_path else ~rec.parent_accepted)
    q = np.clip(rec.draft_prob[sel], 1e-12, 1 - 1e-12)
    return np.log(q) - np.log1p(-q)


def test_empirical_draft_marginal_reproduces_a_drafter_the_parametric_form_cannot():
    """A drafter whose top probabilities never fall below ~0.1 and drop off the target's path (as a real small
    draft model's do): the empirical fit gives back that marginal, on and off the path, and the same MAT."""
    from echosim.sim.acceptance import QUANTILE_PROBS

    on = np.quantile(np.random.default_rng(0).uniform(-2.0, 4.0, 4000), QUANTILE_PROBS)
    true = AcceptanceModel("floor", DraftParams(conf_mean=[0.0], conf_ease=1.0, conf_sd=0.8,
                                                conf_quantiles=[on.tolist()],
                                                conf_quantiles_off=[(on - 1.5).tolist()]),
                           TRUE.accept_params, {"default": 0.5})
    pol = make_policy("eagle3", {"steps": 4, "topk": 2, "num_draft_tokens": 15})
    rec = simulate_records(true, pol, ["default"], requests=96, steps=60, seed=3)
    emp = fit_records(rec, draft_marginal="empirical").model
    par = fit_records(rec).model
    back = simulate_records(emp, pol, ["default"], requests=96, steps=60, seed=4)
    for d in (1, 3):
        got, want = _top_logits(back, d, True), _top_logits(rec, d, True)
        assert abs(np.median(got) - np.median(want)) < 0.25 and got.min() > -2.2, d
    off_gap = np.median(_top_logits(rec, 3, False)) - np.median(_top_logits(rec, 3, True))
    got_gap = np.median(_top_logits(back, 3, False)) - np.median(_top_logits(back, 3, True))
    assert off_gap < -1.0 and abs(got_gap - off_gap) < 0.4
    # the parametric form spreads into the floor the drafter never goes below
    para = simulate_records(par, pol, ["default"], requests=96, steps=60, seed=4)
    assert (_top_logits(para, 1, True) < -2.2).mean() > 0.005 and (_top_logits(back, 1, True) < -2.2).sum() == 0
    want = measure_mat(true, pol, requests=256, steps=8)["mat"]
    assert abs(measure_mat(emp, pol, requests=256, steps=8)["mat"] / want - 1) < 0.06
    # it survives a round trip through JSON (4 decimals), and a bad quantile row is named
    back_json = AcceptanceModel.from_json(json.loads(json.dumps(emp.to_json()))).draft_params
    assert np.allclose(back_json.conf_quantiles_off, emp.draft_params.conf_quantiles_off, atol=1e-4)
    bad = emp.to_json()
    bad["draft"]["conf_quantiles"][0] = bad["draft"]["conf_quantiles"][0][::-1]
    with pytest.raises(UserError, match="conf_quantiles.*non-decreasing|non-decreasing.*conf_quantiles"):
        AcceptanceModel.from_json(bad, path="m.json")


def test_empirical_skill_moves_acceptance_not_the_drafter():
    """With the records' own draft marginal the drafter's confidence follows the ease's deviation from the
    dataset's skill: a skill calibrated to a measured MAT (calibrate_skill) leaves the draft distribution where
    the records put it."""
    from echosim.sim.acceptance import QUANTILE_PROBS

    on = np.quantile(np.random.default_rng(0).uniform(-2.0, 4.0, 4000), QUANTILE_PROBS)
    m = AcceptanceModel("floor", DraftParams(conf_mean=[0.0], conf_ease=1.0, conf_sd=0.8,
                                             conf_quantiles=[on.tolist()], conf_quantiles_off=[(on - 1.5).tolist()]),
                        TRUE.accept_params, {"default": 0.5})
    pol = make_policy("eagle3", {"steps": 4, "topk": 2, "num_draft_tokens": 15})
    lo, hi = m.with_skill("default", -0.5), m.with_skill("default", 2.0)
    top = [_top_logits(simulate_records(x, pol, ["default"], requests=64, steps=30, seed=5), 1, True)
           for x in (lo, hi)]
    assert abs(np.median(top[0]) - np.median(on)) < 0.2 and abs(np.median(top[1]) - np.median(on)) < 0.2
    assert measure_mat(hi, pol, requests=256, steps=8)["mat"] > measure_mat(lo, pol, requests=256, steps=8)["mat"] + 0.3


def _runner_up_shares(rec):
    """(top draft probability, runner-up's share of the mass the top left) of each sibling pair of an accepted
    parent (one parent per depth: a step's nodes at one depth are siblings)."""
    pa = infer_parent_accepted(rec)
    key = np.c_[rec.request, rec.step, rec.depth][pa]
    rank, q = rec.rank[pa], rec.draft_prob[pa]
    order = np.lexsort((rank, key[:, 2], key[:, 1], key[:, 0]))
    key, rank, q = key[order], rank[order], q[order]
    pair = np.all(key[1:] == key[:-1], axis=1) & (rank[:-1] == 0) & (rank[1:] == 1)
    return q[:-1][pair], q[1:][pair] / (1 - q[:-1][pair])


def test_rank_shares_follow_the_records_not_a_ratio_to_the_top():
    """A drafter whose runner-up takes about a quarter of the mass the top draft left, however sure the top is
    (as the shipped draft model's does): the ratio form gives a sure top draft's runner-up most of it; fitted with
    rank_shares, the model gives back the records' share in every bin of the top draft's probability."""
    from echosim.sim.acceptance import QUANTILE_PROBS, SHARE_EDGES

    share_logit = np.quantile(np.random.default_rng(1).normal(-1.0, 0.5, 4000), QUANTILE_PROBS)
    on = np.quantile(np.random.default_rng(0).uniform(-2.0, 4.0, 4000), QUANTILE_PROBS)
    draft = DraftParams(conf_mean=[0.0], conf_ease=1.0, conf_sd=0.8, conf_quantiles=[on.tolist()],
                        conf_quantiles_off=[(on - 1.5).tolist()])
    true = AcceptanceModel("shares", DraftParams(**{**draft.__dict__,
                                                   "share_quantiles": [share_logit.tolist()] * (len(SHARE_EDGES) + 1)}),
                           TRUE.accept_params, {"default": 0.5})
    pol = make_policy("eagle3", {"steps": 3, "topk": 3, "num_draft_tokens": 13})
    rec = simulate_records(true, pol, ["default"], requests=96, steps=50, seed=3)
    q0, share = _runner_up_shares(rec)
    assert abs(np.median(share[q0 > 0.9]) - 0.27) < 0.05  # sigmoid(-1.0)
    fitted = fit_records(rec, draft_marginal="empirical", rank_shares=True).model
    ratio = fit_records(rec, draft_marginal="empirical").model
    assert ratio.draft_params.share_quantiles is None
    for label, m, sure_share in (("shares", fitted, (0.22, 0.32)), ("ratio", ratio, (0.45, 1.0))):
        q0, share = _runner_up_shares(simulate_records(m, pol, ["default"], requests=96, steps=50, seed=4))
        assert sure_share[0] < np.median(share[q0 > 0.9]) < sure_share[1], label
    # the shares survive a round trip through JSON, and a wrong number of bins is named
    back = AcceptanceModel.from_json(json.loads(json.dumps(fitted.to_json())))
    assert np.allclose(back.draft_params.share_quantiles, fitted.draft_params.share_quantiles, atol=1e-4)
    bad = fitted.to_json()
    bad["draft"]["share_quantiles"] = bad["draft"]["share_quantiles"][:2]
    with pytest.raises(UserError, match="share_quantiles"):
        AcceptanceModel.from_json(bad, path="m.json")


def test_match_persistence_recovers_how_alike_a_requests_steps_are():
    """Records of a drafter whose difficulty is mostly the request's (hard stretches last): a model with the same
    total latent variance put on the steps shows little step-to-step autocorrelation; match_persistence moves
    the split back to about the records' own, and the total stays."""
    import dataclasses

    from echosim.sim.acceptance_fit import match_persistence, records_tree, step_autocorrelation

    accept = dataclasses.replace(TRUE.accept_params, sigma_request=0.9, sigma_step=0.3)
    true = AcceptanceModel("persistent", TRUE.draft_params, accept, {"default": 0.3})
    pol = make_policy("eagle3", {"steps": 4, "topk": 2, "num_draft_tokens": 11})
    rec = simulate_records(true, pol, ["default"], requests=256, steps=30, seed=7)
    assert records_tree(rec) == {"steps": 4, "topk": 2, "num_draft_tokens": 11}
    total = 0.9 ** 2 + 0.3 ** 2
    fleeting = AcceptanceModel("fleeting", TRUE.draft_params,
                               dataclasses.replace(accept, sigma_request=0.1, sigma_step=float(np.sqrt(total - 0.01))),
                               {"default": 0.3})
    before = step_autocorrelation(simulate_records(fleeting, pol, ["default"], requests=256, steps=30, seed=8))
    matched, info = match_persistence(fleeting, rec)
    a = matched.accept_params
    assert info["records_autocorrelation"] > before + 0.2  # the records' steps are far more alike
    assert 0.75 < a.sigma_request < 1.05, info  # the generating split, 0.9 / 0.3, comes back
    assert abs(a.sigma_request ** 2 + a.sigma_step ** 2 - total) < 1e-6
