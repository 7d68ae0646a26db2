"""The acceptance model and its synthetic drafter: interface, determinism, consistency with greedy verification."""

import json

import numpy as np
import pytest

from echosim.errors import UserError
from echosim.sim.acceptance import AcceptanceModel, AcceptParams, DraftParams, measure_mat
from echosim.spec.drafting import draft
from echosim.spec.pack import pack, to_dense
from echosim.spec.policies import make_policy
from echosim.spec.verify import verify_greedy, verify_greedy_walk

EAGLE3 = {"steps": 5, "topk": 8, "num_draft_tokens": 32}
PRESETS = ["qwen3-8b", "llama-3.1-8b", "llama-3.3-70b", "vicuna-13b", "qwen3-32b", "qwen3-235b-a22b"]


def calibrated(skill: float = 0.0) -> AcceptanceModel:
    """gamma = rank_bias = 0, beta = 1, no latents: P(child j is the target's token) = its draft prob q_j."""
    return AcceptanceModel("calibrated", DraftParams(conf_mean=[0.5], conf_ease=1.0, conf_sd=1.5),
                           AcceptParams(gamma=[0.0], beta=[1.0], rank_bias=0.0, sigma_request=0.0, sigma_step=0.0),
                           {"gsm8k": skill})


def one_step(model, policy, B=32, seed=0, difficulty=None, select_all=False):
    d = model.drafter(seed)
    ds = np.full(B, model.dataset_index("gsm8k"))
    z = np.zeros(B) if difficulty is None else np.full(B, float(difficulty))
    d.set_batch(z, ds)
    forest = draft(d, policy, np.zeros(B, np.int64), np.full(B, 100, np.int64))
    sel = np.flatnonzero(forest.valid.ravel()) if select_all else policy.select(forest)
    batch = pack(forest, sel)
    return forest, batch, d.target_argmax(batch)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_with_its_datasets(name):
    m = AcceptanceModel.preset(name)
    assert {"humaneval", "gsm8k", "cnn_dm", "alpaca", "mt_bench", "default"} <= set(m.datasets)
    assert m.policy["policy"] == "eagle3"
    make_policy("eagle3", {k: v for k, v in m.policy.items() if k != "policy"})  # a valid setting


def test_dataset_index_aliases_and_unknown_names():
    m = AcceptanceModel.preset("qwen3-8b")
    idx = m.dataset_index(np.array(["gsm8k", "summarization", "math_reasoning", "MT-Bench", "azure_conv", ""]))
    names = [m.datasets[i] for i in idx]
    assert names == ["gsm8k", "cnn_dm", "gsm8k", "mt_bench", "default", "default"]
    assert m.datasets[int(m.dataset_index("humaneval"))] == "humaneval"


def test_unknown_preset_is_a_one_line_user_error():
    with pytest.raises(UserError, match="unknown acceptance preset 'gpt-9'.*known: .*qwen3-8b") as exc:
        AcceptanceModel.preset("gpt-9")
    assert "\n" not in str(exc.value)


def test_save_load_round_trip(tmp_path):
    m = AcceptanceModel.preset("llama-3.1-8b")
    m.save(tmp_path / "m.json")
    again = AcceptanceModel.load(tmp_path / "m.json")
    assert again.to_json() == m.to_json()


def test_malformed_model_files_name_the_field(tmp_path):
    good = AcceptanceModel.preset("qwen3-8b").to_json()
    bad = json.loads(json.dumps(good))
    bad["accept"]["sigma_step"] = "big"
    (tmp_path / "a.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="a.json: field 'accept.sigma_step': must be a number"):
        AcceptanceModel.load(tmp_path / "a.json")
    del bad["draft"]
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="field 'draft.conf_mean': missing"):
        AcceptanceModel.load(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(UserError, match="c.json: not valid JSON"):
        AcceptanceModel.load(tmp_path / "c.json")


def test_difficulty_is_drawn_from_the_request_prior():
    m = AcceptanceModel.preset("qwen3-8b")
    z = m.sample_difficulty(20000, np.zeros(20000, np.int64), np.random.default_rng(0))
    assert abs(z.mean()) < 0.02 and abs(z.std() - m.accept_params.sigma_request) < 0.02


def test_drafts_are_sorted_distinct_and_a_valid_forest():
    forest, _, _ = one_step(AcceptanceModel.preset("qwen3-8b"), make_policy("eagle3", EAGLE3))
    forest.validate()
    v = forest.valid
    assert v[:, :8].all()  # every request drafted its root's 8 children
    lp = forest.logp[:, :8]
    assert (np.diff(lp, axis=1) < 0).all()  # siblings sorted, strictly
    assert (np.exp(lp).sum(axis=1) < 1).all()
    S = forest.num_slots
    for d in range(2, forest.max_depth + 1):  # each parent's k children: distinct tokens, probs sum below 1
        lo, hi = forest.depth_offsets[d - 1], forest.depth_offsets[d]
        tok = forest.token[:, lo:hi].reshape(len(v), -1, 8)
        assert (np.sort(tok, axis=2)[:, :, 1:] != np.sort(tok, axis=2)[:, :, :-1]).all()
        assert (np.exp(forest.logp[:, lo:hi].reshape(len(v), -1, 8)).sum(axis=2) < 1).all()
    assert S == 8 + 4 * 64


def test_same_seed_same_step_other_seed_differs():
    m, pol = AcceptanceModel.preset("qwen3-8b"), make_policy("eagle3", EAGLE3)
    f1, b1, t1 = one_step(m, pol, seed=3)
    f2, b2, t2 = one_step(m, pol, seed=3)
    f3, _, t3 = one_step(m, pol, seed=4)
    assert np.array_equal(f1.token, f2.token) and np.array_equal(f1.logp, f2.logp)
    assert np.array_equal(t1, t2)
    assert not np.array_equal(f1.logp, f3.logp)


def test_only_one_child_matches_and_matches_are_remembered():
    m, pol = AcceptanceModel.preset("qwen3-8b"), make_policy("eagle3", EAGLE3)
    forest, batch, target = one_step(m, pol, B=64, select_all=True)
    T = batch.num_tokens
    req = batch.request_of_token()
    has_parent = np.nonzero(batch.parent[:T] >= 0)[0]
    pglobal = batch.qo_indptr[req[has_parent]] + batch.parent[has_parent]
    match = batch.tokens[has_parent] == target[pglobal]
    per_parent = np.bincount(pglobal[match], minlength=T)
    assert per_parent.max() == 1  # never two children of one node
    # every drafted parent has children; some have a match, some none (the target's token is elsewhere)
    parents = np.unique(pglobal)
    assert 0 < (per_parent[parents] == 1).mean() < 1


def test_calibrated_drafter_matches_its_draft_probabilities():
    """With beta = 1 and no offsets, the top child is the target's token with probability q1 (on average over
    nodes), and the second child with probability q2."""
    m, pol = calibrated(), make_policy("eagle3", {"steps": 1, "topk": 4, "num_draft_tokens": 5})
    forest, batch, target = one_step(m, pol, B=20000, select_all=True)
    root_target = target[batch.qo_indptr[:-1]]
    q = np.exp(forest.logp[:, :4].astype(float))
    for j in range(2):
        hit = forest.token[:, j] == root_target
        assert abs(hit.mean() - q[:, j].mean()) < 0.012


def test_greedy_verify_through_the_core_agrees_with_the_sglang_walk():
    m, pol = AcceptanceModel.preset("qwen3-8b"), make_policy("eagle3", EAGLE3)
    forest, batch, target = one_step(m, pol, B=48)
    res = verify_greedy(batch, target)
    dense = to_dense(batch)
    N = dense.tokens.shape[1]
    t_dense = np.zeros((batch.batch_size, N), np.int64)
    req = batch.request_of_token()
    local = np.arange(batch.num_tokens) - batch.qo_indptr[req]
    t_dense[req, local] = target[:batch.num_tokens]
    acc, bonus = verify_greedy_walk(dense.retrive_next_token, dense.retrive_next_sibling, dense.tokens, t_dense)
    assert np.array_equal(res.accept_len, acc) and np.array_equal(res.bonus, bonus)
    assert res.accept_len.max() >= 2 and (res.accept_len <= 5).all()


def test_mat_falls_with_difficulty_and_rises_with_skill():
    m, pol = AcceptanceModel.preset("qwen3-8b"), make_policy("eagle3", EAGLE3)
    mats = []
    for z in (-1.0, 0.0, 1.0, 2.0):
        _, batch, target = one_step(m, pol, B=512, difficulty=z, seed=1)
        mats.append(verify_greedy(batch, target).accept_len.mean() + 1)
    assert all(a > b + 0.1 for a, b in zip(mats, mats[1:], strict=False)), mats
    lo = measure_mat(m.with_skill("gsm8k", -1.0), pol, "gsm8k", requests=256, steps=6)["mat"]
    hi = measure_mat(m.with_skill("gsm8k", 1.0), pol, "gsm8k", requests=256, steps=6)["mat"]
    assert 1.0 < lo < hi <= 6.0


def test_confident_requests_accept_more_so_gating_has_signal():
    """Requests whose best depth-3 path is above ECHO's 0.3 accept longer paths than the others."""
    m, pol = AcceptanceModel.preset("qwen3-8b"), make_policy("eagle3", EAGLE3)
    forest, batch, target = one_step(m, pol, B=2000, seed=2)
    lo, hi = forest.depth_offsets[2], forest.depth_offsets[3]
    c3 = forest.path_prob()[:, lo:hi].max(axis=1)
    acc = verify_greedy(batch, target).accept_len
    assert acc[c3 >= 0.3].mean() > acc[c3 < 0.3].mean() + 1.0


def test_no_drafting_and_missing_set_batch():
    m = AcceptanceModel.preset("qwen3-8b")
    d = m.drafter(0)
    d.set_batch(np.zeros(3), np.zeros(3, np.int64))
    ar = make_policy("ar")
    forest = draft(d, ar, np.zeros(3, np.int64), np.zeros(3, np.int64))
    batch = pack(forest, ar.select(forest))
    res = verify_greedy(batch, d.target_argmax(batch))
    assert (res.accept_len == 0).all()
    fresh = m.drafter(0)
    with pytest.raises(RuntimeError, match="set_batch"):
        draft(fresh, make_policy("eagle3", EAGLE3), np.zeros(3, np.int64), np.zeros(3, np.int64))
