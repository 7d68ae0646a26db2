"""Selection primitives against plain reference implementations, ties included (float32 fast paths must stay exact)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_helpers import ConstDrafter, ancestors_closed

from echosim.spec.drafters import RandomDrafter
from echosim.spec.drafting import draft
from echosim.spec.policies import ConfigError, make_policy
from echosim.spec.select import band_per_row, best_sorted, ranked_with_caps, top_per_request


def keys_with_ties(rng, B, S, ties):
    """Random keys; with `ties`, rounded so that many are equal (and many equal in float32 only)."""
    key = np.log(rng.random((B, S))) * 4
    if ties == "exact":
        key = np.round(key, 1)
    elif ties == "float32":  # distinct in float64, equal once rounded to float32
        key = np.round(key, 1) - rng.integers(0, 3, (B, S)) * 1e-9
    key[rng.random((B, S)) < 0.2] = -np.inf
    return key


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 12), S=st.integers(1, 70), n=st.integers(0, 80),
       ties=st.sampled_from(["none", "exact", "float32"]), per_row=st.booleans())
def test_top_per_request_takes_each_rows_best(seed, B, S, n, ties, per_row):
    rng = np.random.default_rng(seed)
    key = keys_with_ties(rng, B, S, ties)
    want = rng.integers(0, n + 1, B) if per_row else n
    got = top_per_request(key, want)
    assert np.all(np.diff(got) > 0)
    want = np.broadcast_to(want, (B,))
    for i in range(B):
        mine = got[got // S == i] % S
        finite = np.sort(key[i][np.isfinite(key[i])])[::-1]
        m = min(int(want[i]), len(finite))
        assert len(mine) == m
        # the chosen keys are the row's m largest (as a multiset: tied keys are interchangeable)
        assert np.array_equal(np.sort(key[i, mine])[::-1], finite[:m])


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), A=st.integers(1, 12), C=st.integers(1, 60), limit=st.integers(0, 200),
       ties=st.sampled_from(["none", "exact", "float32"]))
def test_band_per_row_is_exact_or_declines(seed, A, C, limit, ties):
    rng = np.random.default_rng(seed)
    sub = keys_with_ties(rng, A, C, ties)
    cap = rng.integers(0, C + 2, A)
    skip = np.minimum(rng.integers(0, 3, A), cap)
    got = band_per_row(sub, skip, cap, limit)
    # Reference: each row's keys ranked skip+1..cap, then the best `limit` of all of those.
    band = []
    for j in range(A):
        order = np.argsort(-sub[j], kind="stable")
        order = order[np.isfinite(sub[j, order])]
        band += [j * C + c for c in order[skip[j]:cap[j]]]
    band = np.array(band, np.int64)
    band = band[np.argsort(-sub.ravel()[band], kind="stable")][:limit]
    if got is None:  # allowed only when float32 sees a tie (at a row's boundary or at the batch-wide cut)
        assert ties != "none" or len(np.unique(sub.astype(np.float32))) < sub.size
        return
    assert np.all(np.diff(got) > 0)
    assert np.array_equal(np.sort(sub.ravel()[got]), np.sort(sub.ravel()[band]))
    # exact: the band of each row is its ranks skip+1.., never one of its top `skip`
    for j in range(A):
        top_skip = np.sort(sub[j])[::-1][:skip[j]]
        mine = sub[j, got[got // C == j] % C]
        assert len(mine) <= cap[j] - skip[j]
        if len(top_skip) and len(mine):
            assert mine.max() <= top_skip.min()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 16), n=st.integers(0, 200),
       prob=st.sampled_from([None, 0.5, 1.0]))
def test_best_sorted_keeps_an_ancestor_closed_best_set(seed, B, n, prob):
    drafter = RandomDrafter(vocab_size=40, concentration=0.3, seed=seed) if prob is None else ConstDrafter(prob)
    forest = draft(drafter, make_policy("tetris", dict(steps=4, topk=3)), np.zeros(B, np.int64),
                   np.zeros(B, np.int64))
    idx = np.flatnonzero(forest.valid.ravel())
    got = best_sorted(forest.score.ravel(), idx, n)
    assert len(got) == min(n, len(idx))
    assert np.all(np.diff(got) > 0)
    assert ancestors_closed(forest, got)
    want = np.sort(forest.score.ravel()[idx])[::-1][:n]
    assert np.array_equal(np.sort(forest.score.ravel()[got])[::-1], want)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 16), k=st.integers(1, 5), steps=st.integers(1, 5))
def test_the_forest_records_each_depths_beam(seed, B, k, steps):
    p = make_policy("echo", dict(steps=steps, topk=k, num_draft_tokens=2, remaining_num_draft_tokens=1,
                                 gates=[[1, 0.2]]))
    forest = draft(RandomDrafter(vocab_size=40, concentration=0.3, seed=seed), p, np.zeros(B, np.int64),
                   np.zeros(B, np.int64))
    off = forest.depth_offsets
    for i in range(B):
        for d in range(1, forest.max_depth + 1):
            slots, scores = forest.beam_slot[i, d - 1], forest.beam_score[i, d - 1]
            depth_scores = forest.score[i, off[d - 1]:off[d]]
            if d > forest.stop_depth[i]:
                assert (slots == -1).all() and np.isneginf(scores).all()
                continue
            live = slots >= 0
            assert np.array_equal(forest.score[i, slots[live]], scores[live])
            assert np.all(np.diff(scores[live]) <= 0)  # best first
            assert np.array_equal(scores[live], np.sort(depth_scores)[::-1][:live.sum()])
        # a request's top n (n <= k) are all beam nodes
        top = top_per_request(forest.score[i:i + 1], k) % forest.num_slots
        assert set(top.tolist()) <= set(forest.beam_slot[i].ravel().tolist())


def echo_reference(policy, forest):
    """ECHO's selection through the generic primitives only (floor, then two ranked tiers)."""
    c = policy.config
    B, S = forest.token.shape
    drafting = forest.stop_depth > 0
    truncated = drafting & forest.gated
    cap = np.where(truncated, c.remaining_num_draft_tokens - 1, c.num_draft_tokens - 1)
    bound = c.budget.upper_bound(B)
    hi = int(forest.depth_offsets[min(c.floor_tokens, forest.max_depth)])
    sub = top_per_request(forest.score[:, :hi], np.where(drafting, np.minimum(cap, c.floor_tokens), 0))
    floor = ((sub // hi) * S + sub % hi)[:bound]
    floor_n = np.bincount(floor // S, minlength=B)
    room = bound - len(floor)
    p1 = ranked_with_caps(forest.score, np.where(drafting & ~truncated, cap - floor_n, 0), room, floor)
    p2 = ranked_with_caps(forest.score, np.where(truncated, cap - floor_n, 0), room - len(p1), floor)
    return np.sort(np.concatenate([floor, p1, p2]))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.sampled_from([1, 3, 17, 64]), steps=st.integers(1, 6),
       topk=st.integers(1, 6), n=st.integers(2, 30), r=st.integers(1, 30), tau=st.floats(0.0, 0.9),
       tokens=st.integers(0, 400), floor=st.integers(0, 2), prob=st.sampled_from([None, None, 0.6, 1.0]))
def test_echo_fast_tiers_match_the_generic_ranking(seed, B, steps, topk, n, r, tau, tokens, floor, prob):
    cfg = dict(steps=steps, topk=topk, num_draft_tokens=n, remaining_num_draft_tokens=min(r, n),
               gates=[[min(2, steps), tau]], floor_tokens=floor, budget={"kind": "fixed", "tokens": tokens})
    try:
        p = make_policy("echo", cfg)
    except ConfigError:
        return
    drafter = RandomDrafter(vocab_size=40, concentration=0.3, seed=seed) if prob is None else ConstDrafter(prob)
    forest = draft(drafter, p, np.zeros(B, np.int64), np.zeros(B, np.int64))
    got, want = p.select(forest), echo_reference(p, forest)
    assert len(got) == len(want)
    assert ancestors_closed(forest, got)
    S = forest.num_slots
    for i in range(B):  # per request, the same keys (tied nodes are interchangeable)
        a = np.sort(forest.score.ravel()[got[got // S == i]])
        b = np.sort(forest.score.ravel()[want[want // S == i]])
        assert np.array_equal(a, b)
