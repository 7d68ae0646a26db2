"""The online-adaptive budget (echosim/spec/adaptive.py): its invariants on random forests (hypothesis), how it
follows acceptance and step cost, its settings' errors, the simulator running it, and the engine staying lossless
with it at several settings (greedy output == plain decoding)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echosim.spec.adaptive import Adaptive, AdaptiveConfig, batched_step_time, convex_step_time
from echosim.spec.drafters import RandomDrafter
from echosim.spec.drafting import draft
from echosim.spec.pack import pack
from echosim.spec.policies import ConfigError, make_policy
from tests.spec_helpers import ConstDrafter, ancestors_closed


def flat_step(ms_per_token: float, base_ms: float = 10.0):
    def step_ms(tokens, batch_size):
        return base_ms + ms_per_token * np.asarray(tokens, np.float64)
    return step_ms


def run_step(policy, drafter, B, rng, keys=None, accept_p=None):
    """One step through the contract; the target accepts each tried node with probability accept_p (default:
    its draft probability), at most one child per node."""
    policy.set_batch(np.arange(B) if keys is None else keys)
    forest = draft(drafter, policy, np.zeros(B, np.int64), np.full(B, 32, np.int64))
    sel = policy.select(forest)
    S = forest.num_slots
    accepted = []
    accept_len = np.zeros(B, np.int64)
    if len(sel):
        chosen = set(sel.tolist())
        for b in range(B):
            cur = -1
            while True:
                kids = [s for s in range(S) if forest.parent[b, s] == cur and b * S + s in chosen]
                kids.sort(key=lambda s: forest.slot_rank[s])
                nxt = None
                for s in kids:
                    p = np.exp(forest.logp[b, s]) if accept_p is None else accept_p
                    if rng.random() < p:
                        nxt = s
                        break
                if nxt is None:
                    break
                accepted.append(b * S + nxt)
                accept_len[b] += 1
                cur = nxt
    policy.observe(forest, sel, accept_len, np.array(sorted(accepted), np.int64))
    return forest, sel, accept_len


INNER = [
    ("eagle3", dict(steps=4, topk=3, num_draft_tokens=12)),
    ("echo", dict(steps=4, topk=3, num_draft_tokens=12, remaining_num_draft_tokens=5, gates=[(2, 0.3)])),
    ("tetris", dict(steps=3, topk=3)),
    ("ddd", dict(steps=4, topk=3, num_draft_tokens=10, theta=-1.0, check_depths=(2,))),
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(INNER) - 1), B=st.integers(1, 12), seed=st.integers(0, 10_000),
       ms_per_token=st.floats(0.0, 20.0), steps=st.integers(1, 6), conc=st.floats(0.05, 2.0))
def test_selection_is_an_ancestor_closed_subset_of_the_inner_policys(which, B, seed, ms_per_token, steps, conc):
    name, cfg = INNER[which]
    policy = make_policy(name, dict(cfg, adaptive={"probe_every": 2}), flat_step(ms_per_token))
    inner = make_policy(name, cfg)
    drafter = RandomDrafter(vocab_size=50, concentration=conc, seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        forest, sel, _ = run_step(policy, drafter, B, rng)
        assert (np.diff(sel) > 0).all()
        assert ancestors_closed(forest, sel)
        assert set(sel.tolist()) <= set(inner.select(forest).tolist())  # never more than the inner policy
        if len(sel):
            pack(forest, sel)  # the pack's own checks: drafted, increasing, ancestor-closed
        g = policy._gains_upto(forest, forest.max_depth)
        S = forest.num_slots
        par = forest.parent
        has = forest.valid & (par >= 0)
        if has.any():  # gains strictly decrease along every path: each prefix of the gain order is closed
            b, s = np.nonzero(has)
            assert (g[b, s] < g[b, par[b, s]]).all()
        assert ((g >= 0) & (g < 1)).all()
        assert S == 0 or (g[~forest.valid] == 0).all()


def test_cheap_tokens_verify_everything_and_costly_ones_nothing():
    drafter = ConstDrafter(0.9)
    cheap = make_policy("eagle3", dict(steps=3, topk=2, num_draft_tokens=7, adaptive={}), flat_step(0.0))
    forest, sel, _ = run_step(cheap, drafter, 4, np.random.default_rng(0))
    assert len(sel) == 4 * 6  # every node of every request: free tokens always pay
    costly = make_policy("eagle3", dict(steps=3, topk=2, num_draft_tokens=7, adaptive={}), flat_step(1e4))
    _, sel, al = run_step(costly, drafter, 4, np.random.default_rng(0))
    assert len(sel) == 0 and (al == 0).all()  # plain decoding: no token is worth its time


def test_low_acceptance_turns_drafting_off_then_probes():
    """A draft the target never agrees with: the budget stops verifying, then stops drafting; it probes again
    after probe_every plain steps, and doubles the wait while probes find nothing."""
    policy = make_policy("eagle3", dict(steps=3, topk=2, num_draft_tokens=7,
                                        adaptive={"probe_every": 4, "probe_max": 16}), flat_step(0.5, 5.0))
    drafter = ConstDrafter(0.55)
    rng = np.random.default_rng(1)
    depths = []
    for _ in range(80):
        policy.observe_step(2, 2, 6.0, draft_depths=3, draft_rows=10, draft_ms=3.0, other_ms=0.5)
        forest, sel, _ = run_step(policy, drafter, 2, rng, keys=np.array([7, 8]), accept_p=0.0)
        depths.append(int(forest.stop_depth.max(initial=0)))
    assert depths[0] == 3  # no evidence yet: the full plan
    tail = np.array(depths[40:])
    assert (tail == 0).mean() > 0.8  # mostly plain decoding
    assert tail.max() > 0            # but it still probes
    assert policy.probe_interval == 16
    d, b = policy.table.cell(np.array([1]), np.log([0.55]))
    assert policy.table.rates()[d, b][0] < 0.3  # what it learned: the target rejects these drafts (prior 0.55)
    state = policy.state()
    assert state["drafting"] is False and state["steps"] == 80


def test_high_acceptance_keeps_drafting_deep_and_learns_per_request():
    policy = make_policy("eagle3", dict(steps=4, topk=2, num_draft_tokens=9, adaptive={}), flat_step(0.2))
    drafter = ConstDrafter(0.7)
    rng = np.random.default_rng(2)
    for _ in range(40):
        # request 1 is easy, request 2 hard: same draft probabilities, different target agreement
        policy.set_batch(np.array([1, 2]))
        forest = draft(drafter, policy, np.zeros(2, np.int64), np.full(2, 32, np.int64))
        sel = policy.select(forest)
        S = forest.num_slots
        acc, al = [], np.zeros(2, np.int64)
        for b, p in ((0, 0.95), (1, 0.1)):
            cur = -1
            while True:
                kid = [s for s in sel[sel // S == b] % S if forest.parent[b, s] == cur and forest.slot_rank[s] == 0]
                if not kid or rng.random() >= p:
                    break
                cur = kid[0]
                acc.append(b * S + cur)
                al[b] += 1
        policy.observe(forest, sel, al, np.array(sorted(acc), np.int64))
    assert forest.stop_depth[0] == 4
    factors = policy._factors(2)
    assert factors[0] > 1.1 and factors[1] < 0.5
    counts = np.bincount(sel // S, minlength=2)
    assert counts[0] > counts[1]  # the budget goes to the request that converts it


def test_step_cost_fit_follows_measured_times():
    policy = make_policy("eagle3", dict(adaptive={"forget": 0.98}), flat_step(0.1, 10.0))
    for i in range(200):  # the machine is 3x slower than the prior says
        t = 1 + i % 40
        policy.observe_step(1, t, 3 * (10.0 + 0.1 * t), draft_depths=4, draft_rows=13, draft_ms=4.0 + 0.3 * 13)
    v = policy._verify_ms(np.array([1.0, 40.0]), 1)
    assert abs(v[0] - 30.3) < 1.0 and abs(v[1] - 42.0) < 1.0
    d = policy._draft_ms(np.array([4.0]), np.array([13.0]))[0]
    assert abs(d - 7.9) < 0.5


def test_a_stalled_step_barely_moves_the_cost_fit_but_a_lasting_change_does():
    """A fresh engine's first verify once took 239 ms where 12 were due: taken at full weight, it taught the
    budget that drafts cost 12x their price, and it decoded plainly for the rest of the run. Robust weights let
    such a stall (first step or later) barely count, while a machine that really slows is still followed."""
    def fit(stalls, slow_from=None, steps=120):
        policy = make_policy("eagle3", dict(adaptive={}), flat_step(0.1, 10.0))
        for i in range(steps):
            t = 1 + i % 40
            ms = 10.0 + 0.1 * t
            if slow_from is not None and i >= slow_from:
                ms *= 1.5
            if i in stalls:
                ms *= 20.0
            policy.observe_step(1, t, ms, draft_depths=4, draft_rows=13, draft_ms=4.0 + 0.3 * 13,
                                other_ms=200.0 if i in stalls else 1.0)
        return policy

    clean = fit(())
    for stalls in ((0,), (1,), (50,), (119,)):
        stalled = fit(stalls)
        v0, v1 = clean._verify_ms(np.array([1.0, 40.0]), 1), stalled._verify_ms(np.array([1.0, 40.0]), 1)
        assert np.all(np.abs(v1 / v0 - 1) < 0.05), (stalls, v0, v1)
        assert abs(stalled.fixed_ms - clean.fixed_ms) < 0.5, stalls
        assert stalled.verify_cost.theta[1] < 1.2, stalls  # what the drafts cost stays near their price
    # 1.5x slower from step 40 on: followed as fast as forgetting allows (unweighted, the fit is as far along)
    slowed = fit((), slow_from=40, steps=200)
    v = slowed._verify_ms(np.array([1.0, 40.0]), 1)
    assert np.all(np.abs(v / (1.5 * np.array([10.1, 14.0])) - 1) < 0.1), v


def test_plain_steps_price_plain_decoding_while_drafting():
    """While drafting pays, every plain_every-th step is plain; the cost fit gives the plain step and the drafts
    scales of their own, so a tree whose drafts cost twice the profile's no longer makes plain decoding look
    twice as dear (one scale, learnt from tree steps alone, charged the surplus to plain steps too)."""
    prior = flat_step(0.5, 10.0)
    policy = make_policy("eagle3", dict(steps=3, topk=2, num_draft_tokens=7, adaptive={"plain_every": 4}), prior)
    drafter = ConstDrafter(0.9)
    rng = np.random.default_rng(3)
    B, plain = 4, []
    for _ in range(60):
        forest, sel, _ = run_step(policy, drafter, B, rng, keys=np.arange(B), accept_p=0.9)
        T = B + len(sel)
        true_ms = 10.0 + 0.5 * B + 1.0 * (T - B)  # each draft costs twice what the prior says
        policy.observe_step(B, T, true_ms, draft_depths=int(forest.stop_depth.max(initial=0)), draft_rows=4.0,
                            draft_ms=1.0, other_ms=0.0)
        plain.append(len(sel) == 0)
    assert policy.state()["drafting"] is True
    share = np.mean(plain[10:])
    assert 0.1 < share < 0.35  # about one step in five: a plain one
    v = policy._verify_ms(np.array([B, B + 10.0]), B)
    assert abs(v[0] - 12.0) < 1.0  # the plain step's price: what plain steps cost
    assert abs((v[1] - v[0]) / 10 - 1.0) < 0.15  # a draft's: twice the prior's
    off = make_policy("eagle3", dict(steps=3, topk=2, num_draft_tokens=7, adaptive={"plain_every": 0}), prior)
    kept = [len(run_step(off, drafter, B, rng, keys=np.arange(B), accept_p=0.9)[1]) > 0 for _ in range(20)]
    assert all(kept)  # plain_every 0: no plain steps while drafting pays


def test_settings_and_errors():
    p = make_policy("echo", {"adaptive": True})
    assert isinstance(p, Adaptive) and p.name == "echo"
    assert p.describe()["adaptive"] == vars(AdaptiveConfig()) | {}
    assert make_policy("echo", {"adaptive": False}).name == "echo"
    with pytest.raises(ConfigError, match="adaptive.*no setting 'bogus'"):
        make_policy("echo", {"adaptive": {"bogus": 1}})
    with pytest.raises(ConfigError, match="forget"):
        make_policy("eagle3", {"adaptive": {"forget": 1.5}})
    with pytest.raises(ConfigError, match="plain_every"):
        make_policy("eagle3", {"adaptive": {"plain_every": -1}})
    with pytest.raises(ConfigError, match="must be an object"):
        make_policy("eagle3", {"adaptive": 3})
    with pytest.raises(ConfigError, match="num_draft_tokens"):  # the inner policy's own checks still apply
        make_policy("eagle3", {"num_draft_tokens": 1, "adaptive": {}})
    # a round trip through describe()
    again = make_policy("echo", {k: v for k, v in p.describe().items() if k != "policy"})
    assert again.describe() == p.describe()


def test_simulator_runs_the_same_code():
    from echosim.sim.config import SimConfig
    from echosim.sim.simulator import simulate
    from echosim.sim.workload import WorkloadSpec

    cfg = SimConfig()
    cfg.policy = {"policy": "echo", "adaptive": {}}
    res = simulate(cfg, WorkloadSpec(kind="closed", concurrency=8, requests=24, output_tokens=100))
    spec = res.summary["speculation"]
    assert spec["core"] == "exact" and "adaptive" in spec["policy"]
    assert res.summary["mat"] > 1.0


@settings(max_examples=60, deadline=None)
@given(base=st.floats(1.0, 50.0), slope=st.floats(0.0, 2.0), knee=st.sampled_from([1, 8, 32, 128]),
       spikes=st.lists(st.floats(0.0, 100.0), min_size=9, max_size=9))
def test_the_profile_prior_drops_spikes_and_keeps_the_shape(base, slope, knee, spikes):
    """A flat-then-linear step measured on a busy machine (time only ever added): the prior lies on or under
    every measured point, is convex and non-decreasing, and grows past the last point instead of going flat."""
    counts = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    true = [base + slope * max(c - knee, 0) for c in counts]
    noisy = {c: t + (s if i % 3 != 2 else 0.0) for i, (c, t, s) in enumerate(zip(counts, true, spikes, strict=True))}
    f = convex_step_time(noisy)
    x = np.arange(1, 1025, dtype=np.float64)
    y = f(x, 1)
    assert (f(np.array(counts, float), 1) <= np.array([noisy[c] for c in counts]) + 1e-9).all()
    d = np.diff(y)
    assert (d >= -1e-9).all() and (np.diff(d) >= -1e-6).all()
    clean = dict(zip(counts, true, strict=True))
    assert np.allclose(convex_step_time(clean)(x, 1), base + slope * np.maximum(x - knee, 0))


def test_the_batched_prior_spreads_tokens_over_requests():
    grid = {1: {1: 10.0, 4: 10.5, 16: 14.0}, 8: {1: 12.0, 4: 20.0, 16: 56.0}, 32: {1: 20.0, 4: 50.0, 16: 170.0}}
    f = batched_step_time(grid)
    assert f(np.array([4.0]), 1)[0] == 10.5 and f(np.array([32.0]), 8)[0] == 20.0  # profiled (convex) points
    mid = f(np.array([16 * 4.0]), 16)[0]  # between batch 8 and 32 at 4 tokens a request
    assert 20.0 < mid < 50.0
    assert f(np.array([64 * 4.0]), 64)[0] == f(np.array([32 * 8.0]), 32)[0]  # past the grid: same total tokens
    for b in (1, 3, 8, 20, 32, 100):
        y = f(np.arange(b, 20 * b, dtype=float), b)
        assert (np.diff(y) >= -1e-9).all()


SHIPPED_ECHO = dict(steps=5, topk=4, num_draft_tokens=24, remaining_num_draft_tokens=24, gates=[],
                    budget={"kind": "per_request", "tokens": 23})  # echo_exec/models/tiny-draft/policy-echo.json
PRIOR_GRID = {1: {1: 10.0, 4: 10.5, 16: 14.0, 64: 40.0}, 8: {1: 12.0, 4: 20.0, 16: 56.0},
              32: {1: 20.0, 4: 50.0, 16: 170.0}}


def _walk_accept(forest, sel, rng, p_scale):
    """The target's verdict on a selection: down each request's selected tree, the first child (by rank) that
    passes a coin of probability p_scale * its draft probability; returns (accept_len, accepted flat nodes)."""
    B, S = forest.token.shape
    accept_len, accepted = np.zeros(B, np.int64), []
    if len(sel) == 0:
        return accept_len, np.zeros(0, np.int64)
    req, slot = sel // S, sel % S
    par = forest.parent[req, slot]
    for b in range(B):
        mine, cur = req == b, -1
        while True:
            kids = slot[mine & (par == cur)]
            kids = kids[np.argsort(forest.slot_rank[kids], kind="stable")]
            nxt = next((s for s in kids.tolist() if rng.random() < p_scale * np.exp(forest.logp[b, s])), None)
            if nxt is None:
                break
            accepted.append(b * S + nxt)
            accept_len[b] += 1
            cur = nxt
    return accept_len, np.array(sorted(accepted), np.int64)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(INNER)), seed=st.integers(0, 10_000), max_b=st.integers(1, 16),
       prior=st.sampled_from(["grid", "flat", "none"]), p_scale=st.floats(0.0, 1.2),
       max_requests=st.sampled_from([3, 4096]), plain_every=st.sampled_from([0, 3, 32]))
def test_same_decisions_as_the_reference_implementation(which, seed, max_b, prior, p_scale, max_requests,
                                                        plain_every):
    """The adaptive budget's per-step cost was cut (tables, cached rates, per-request arrays); its decisions must
    not change. The code from before (tests/adaptive_reference.py) and today's run side by side on the same
    closed loop (requests leave and join, random acceptance, measured times), with identical drafters: every
    plan, start, gate (the forest each drafts), selection and the final state must be equal."""
    from tests.adaptive_reference import ReferenceAdaptive

    name, cfg = ("echo", SHIPPED_ECHO) if which == len(INNER) else INNER[which]
    step_time = {"grid": batched_step_time(PRIOR_GRID), "flat": flat_step(0.3), "none": None}[prior]
    acfg = AdaptiveConfig(probe_every=2, probe_max=8, plain_every=plain_every, max_requests=max_requests)
    new = make_policy(name, dict(cfg, adaptive=vars(acfg)), step_time)
    old = ReferenceAdaptive(make_policy(name, cfg, step_time), acfg, step_time)
    drafters = [RandomDrafter(vocab_size=50, concentration=0.4, seed=seed) for _ in range(2)]
    rng = np.random.default_rng(seed)
    keys, next_key = list(range(max_b)), max_b
    for _ in range(14):
        B = len(keys)
        out = []
        for pol, drafter in zip((new, old), drafters, strict=True):
            pol.set_batch(np.array(keys))
            forest = draft(drafter, pol, np.zeros(B, np.int64), np.full(B, 32, np.int64))
            out.append((forest, pol.select(forest)))
        (fn, sn), (fo, so) = out
        for field in ("stop_depth", "gated", "valid", "token"):
            assert np.array_equal(getattr(fn, field), getattr(fo, field)), field
        assert np.array_equal(sn, so)
        accept_len, accepted = _walk_accept(fn, sn, rng, p_scale)
        T = B + len(sn)
        ms = 10.0 + 0.4 * T + float(rng.normal(0.0, 0.5))
        depth = int(fn.stop_depth.max(initial=0))
        for pol, forest in ((new, fn), (old, fo)):
            pol.observe(forest, sn, accept_len, accepted)
            pol.observe_step(B, T, ms, draft_depths=depth, draft_rows=4.0 * depth * B, draft_ms=0.5 * depth,
                             other_ms=1.0)
        # some requests finish, new ones join (the batch size moves)
        keys = [k for k in keys if rng.random() > 0.3]
        while len(keys) < max_b and rng.random() < 0.8:
            keys.append(next_key)
            next_key += 1
        keys = keys or [next_key]
        next_key += 1
    assert new.state() == old.state()
    assert new.last == old.last
