"""The engine stays lossless under the online-adaptive budget, at every setting: greedy output is token for token
plain decoding's, whether the budget verifies whole trees, trims them, or turns drafting off (and probes), with
its cost learned from the engine's own measured steps or fixed by a bound step-time model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from echo_exec.engine import Engine, SamplingParams
from echosim.spec.policies import make_policy
from tests.test_engine import F64, SMALL, _run, models, prompts, reference  # noqa: F401  (fixtures)


def _costly(tokens, batch_size):
    # a prior where every verified draft costs a second: the first steps decode plainly, until the engine's
    # measured steps correct the fit
    return 1.0 + 1e3 * np.asarray(tokens, np.float64)


def _free(tokens, batch_size):
    return np.full(np.shape(tokens), 5.0)  # a prior where verification is free


SETTINGS = [
    ("echo", dict(SMALL["echo"], adaptive={}), None),
    ("echo", dict(SMALL["echo"], gates=[], adaptive={"forget": 0.5, "probe_every": 1, "probe_max": 2}), None),
    ("eagle3", dict(SMALL["eagle3"], adaptive={"request_trials": 0.5}), None),
    ("tetris", dict(SMALL["tetris"], adaptive={}), None),
    ("eagle3", dict(SMALL["eagle3"], adaptive={"probe_every": 2}), _costly),
    ("echo", dict(SMALL["echo"], adaptive={}), _free),
]


@pytest.mark.parametrize("i", range(len(SETTINGS)))
def test_adaptive_budget_is_lossless(models, prompts, reference, i):  # noqa: F811
    target, draft = models
    name, cfg, step_time = SETTINGS[i]
    trees = 0
    for batch, drafter in [(1, target), (16, draft), (16, target)]:
        n = 12 if batch == 1 else len(prompts)
        if step_time is None:
            eng, out = _run(target, drafter, name, prompts[:n], batch, cfg)
        else:
            policy = make_policy(name, cfg, step_time)
            eng, out = _run(target, drafter, policy, prompts[:n], batch)
        bad = [j for j, (a, b) in enumerate(zip(out, reference[:n], strict=True)) if a != b]
        assert not bad, f"{name} {cfg} batch {batch}: prompt {bad[0]} differs"
        st = eng.stats()
        state = st["policy_state"]
        assert state["steps"] > 0 and "verify_ms_model" in state
        assert st["policy_settings"]["adaptive"] == cfg["adaptive"] | {k: v for k, v in
                                                                       st["policy_settings"]["adaptive"].items()
                                                                       if k not in cfg["adaptive"]}
        trees += st["verify_tokens"] > st["decode_steps"]
        json.dumps(state)  # /server_info serializes it
        print(name, batch, drafter == target, st["avg_accept_length"], st["verify_tokens"] / st["decode_steps"])
    assert trees, "the budget never verified a draft: the tree path went untested"


def test_engine_profiles_its_step_as_the_cost_prior(models):  # noqa: F811
    target, draft = models
    eng = Engine(target, draft, policy="echo", policy_config=dict(SMALL["echo"], adaptive={}), dtype=F64)
    assert eng.policy.step_time is not None  # measured at start-up: the prior of the online fit
    table = eng.policy.step_time.table  # {batch: {tokens per request: ms}}, profiled here
    assert set(table) == {1, 8, 32} and all(ms > 0 for t in table.values() for ms in t.values())
    for b in (1, 4, 8, 32, 64):  # the prior never makes more tokens cheaper
        assert (np.diff(eng.policy.step_time(np.arange(b, 17 * b), b)) >= -1e-9).all()
    eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=12))
    assert eng.policy.verify_cost.samples > 0  # and the measured steps fit it
    st = eng.stats()  # the engine thread's CPU time (bench_serve's load-robust ratios): spent, never above wall
    assert 0 < st["step_cpu_ms"] <= st["step_ms"] + 1.0
