"""Speculative sampling in the engine is lossless in distribution: on a tiny-vocabulary model, the joint
distribution of the first two emitted tokens over many batched trials equals the target's own (chi-square), with
a random draft model (frequent rejections, residual draws) and a copy of the target (long accepted paths), under
temperature and top-p."""

import numpy as np
import pytest
import torch
from scipy import stats

from echo_exec.engine import Engine, SamplingParams
from echo_exec.loader import save_model
from echo_exec.model import ModelConfig, Transformer
from echo_exec.sampling import target_probs

torch.set_num_threads(1)

V = 8
PROMPT = [1, 5, 2, 7]
TRIALS = 3000


def _save(path, hidden, seed, std):
    cfg = ModelConfig(vocab_size=V, hidden_size=hidden, n_layers=1, n_heads=2, n_kv_heads=1,
                      intermediate_size=2 * hidden, max_position_embeddings=64)
    m = Transformer(cfg)
    m.init_weights(seed=seed, std=std)
    save_model(m, path)
    return m.double().eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampling_models")
    target = _save(d / "target", 16, 0, 0.5)
    _save(d / "draft", 8, 3, 0.5)
    return d / "target", d / "draft", target


def _exact_joint(model, temperature, top_p):
    """P(first, second) of the target itself, [V, V]."""
    def probs(seq):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1:]
        return target_probs(logits, torch.tensor([temperature]), torch.tensor([top_p]))[0].numpy()

    p1 = probs(PROMPT)
    return np.stack([p1[x] * probs(PROMPT + [x]) for x in range(V)])


@pytest.mark.parametrize("policy,config,temperature,top_p,copy", [
    ("eagle3", dict(steps=3, topk=2, num_draft_tokens=6), 1.0, 1.0, False),
    ("eagle3", dict(steps=3, topk=2, num_draft_tokens=6), 1.0, 1.0, True),
    ("echo", dict(steps=3, topk=3, num_draft_tokens=7, remaining_num_draft_tokens=3, gates=[(1, 0.4)]), 0.7, 0.9,
     True),
])
def test_first_tokens_follow_the_target_distribution(pair, policy, config, temperature, top_p, copy):
    """A random draft (mostly rejected: residual draws) and a copy of the target as draft (long accepted paths)."""
    target_dir, draft_dir, target = pair
    eng = Engine(target_dir, target_dir if copy else draft_dir, policy=policy, policy_config=config,
                 dtype=torch.float64, max_running=500, seed=11)
    params = SamplingParams(max_new_tokens=3, temperature=temperature, top_p=top_p)
    outs = eng.generate([PROMPT] * TRIALS, params)
    s = eng.stats()
    assert s["avg_accept_length"] > (1.5 if copy else 1.02)  # drafts do get accepted
    first_two = np.array([o.output_ids[:2] for o in outs])
    counts = np.bincount(first_two[:, 0] * V + first_two[:, 1], minlength=V * V)
    expect = _exact_joint(target, temperature, top_p).ravel() * TRIALS
    assert counts[expect == 0].sum() == 0  # top-p removed tokens are never emitted
    big = expect >= 5  # pool the rare cells so the chi-square approximation holds
    obs = np.r_[counts[big], counts[~big].sum()]
    exp = np.r_[expect[big], expect[~big].sum()]
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_seeded_requests_repeat(pair):
    target_dir, draft_dir, _ = pair
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
    runs = []
    for policy in ("eagle3", "eagle3", "ar"):
        eng = Engine(target_dir, draft_dir, policy=policy, policy_config=None if policy == "ar" else
                     dict(steps=3, topk=2, num_draft_tokens=6), dtype=torch.float64)
        runs.append(eng.generate([PROMPT], params)[0].output_ids)
    assert runs[0] == runs[1]  # same seed, same policy: same tokens
