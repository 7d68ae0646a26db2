"""Synthetic workload generators: rates, burstiness (CV), lengths, time scaling, closed loop, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from echosim.errors import UserError
from traces import TraceArrays, read_arrays, write_jsonl
from traces.generators import (
    LengthDist,
    at_rate,
    closed_loop,
    gamma_arrivals,
    lengths_from_trace,
    paper_closed_loop,
    poisson_arrivals,
    scale_rate,
    scale_time,
    synthetic_trace,
)


def _cv(arrivals: np.ndarray) -> float:
    gaps = np.diff(np.concatenate(([0.0], arrivals)))
    return float(gaps.std() / gaps.mean())


def test_poisson_rate_and_cv():
    t = poisson_arrivals(200_000, 8.0, seed=3)
    assert np.all(np.diff(t) >= 0) and t[0] > 0
    assert len(t) / t[-1] == pytest.approx(8.0, rel=0.01)
    assert _cv(t) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_rate_and_cv(cv):
    t = gamma_arrivals(200_000, 20.0, cv=cv, seed=1)
    assert len(t) / t[-1] == pytest.approx(20.0, rel=0.03)
    assert _cv(t) == pytest.approx(cv, rel=0.05)


def test_deterministic_given_seed():
    a = synthetic_trace(1000, rate_rps=5, cv=3, prompt_tokens=LengthDist("lognormal", mean=800, cv=1.5),
                        output_tokens=LengthDist("uniform", low=10, high=20), seed=7)
    b = synthetic_trace(1000, rate_rps=5, cv=3, prompt_tokens=LengthDist("lognormal", mean=800, cv=1.5),
                        output_tokens=LengthDist("uniform", low=10, high=20), seed=7)
    c = synthetic_trace(1000, rate_rps=5, cv=3, prompt_tokens=LengthDist("lognormal", mean=800, cv=1.5),
                        output_tokens=LengthDist("uniform", low=10, high=20), seed=8)
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    np.testing.assert_array_equal(a.prompt_tokens, b.prompt_tokens)
    assert not np.array_equal(a.arrival_s, c.arrival_s)


def test_length_distributions():
    rng = np.random.default_rng(0)
    fixed = LengthDist("fixed", mean=100).sample(10, rng)
    assert fixed.tolist() == [100] * 10
    uni = LengthDist("uniform", low=10, high=20).sample(50_000, rng)
    assert uni.min() == 10 and uni.max() == 20 and uni.mean() == pytest.approx(15, abs=0.1)
    logn = LengthDist("lognormal", mean=500, cv=1.0, high=100_000).sample(200_000, rng)
    assert logn.min() >= 1 and logn.mean() == pytest.approx(500, rel=0.02)
    assert logn.std() / logn.mean() == pytest.approx(1.0, rel=0.05)
    with pytest.raises(UserError, match="unknown length distribution"):
        LengthDist("zipf", mean=3).sample(3, rng)


def test_lengths_from_trace_keep_pairs():
    src = TraceArrays(np.arange(3.0), np.array([10, 20, 30]), np.array([1, 2, 3]))
    p, o = lengths_from_trace(src, 1000, seed=0)
    assert set(zip(p.tolist(), o.tolist(), strict=True)) == {(10, 1), (20, 2), (30, 3)}
    t = synthetic_trace(100, rate_rps=2, lengths_from=src, seed=0)
    assert np.all(t.prompt_tokens == t.output_tokens * 10)


def test_time_scaling():
    t = synthetic_trace(10_000, rate_rps=4, seed=0)
    fast = scale_rate(t, 2.0)
    np.testing.assert_allclose(fast.arrival_s, t.arrival_s / 2)
    np.testing.assert_array_equal(fast.prompt_tokens, t.prompt_tokens)
    np.testing.assert_allclose(scale_time(t, 3.0).arrival_s, t.arrival_s * 3)
    target = at_rate(t, 11.0)
    assert (len(target) - 1) / target.duration_s == pytest.approx(11.0, rel=1e-12)
    assert t.arrival_s[0] == synthetic_trace(10_000, rate_rps=4, seed=0).arrival_s[0]   # input unchanged
    with pytest.raises(UserError, match="time_scale must be a positive number"):
        scale_time(t, 0)


def test_paper_closed_loop():
    w = paper_closed_loop(16, 64)
    assert w.concurrency == 16 and len(w.requests) == 64
    assert set(w.requests.prompt_tokens.tolist()) == {100} and set(w.requests.output_tokens.tolist()) == {500}
    assert np.all(w.requests.arrival_s == 0)
    with pytest.raises(UserError, match="at least 8 requests"):
        closed_loop(4, 8)


def test_generated_trace_round_trips(tmp_path):
    t = synthetic_trace(500, rate_rps=3, cv=2, dataset="mt_bench", seed=2)
    write_jsonl(tmp_path / "g.jsonl", t)
    back = read_arrays(tmp_path / "g.jsonl")
    np.testing.assert_allclose(back.arrival_s, t.arrival_s, atol=1e-7)
    assert back.dataset == ["mt_bench"] * 500
