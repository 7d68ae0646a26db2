import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from echosim.spec.drafters import RandomDrafter
from echosim.spec.drafting import draft
from echosim.spec.pack import pack
from echosim.spec.policies import make_policy
from echosim.spec.verify import verify_greedy, verify_sampling


def brute_force_accept(batch, target_argmax, i):
    """Longest root-to-node path of request i whose every token equals the target's argmax at its parent."""
    lo, hi = batch.qo_indptr[i], batch.qo_indptr[i + 1]
    best, best_node = 0, lo
    for t in range(lo + 1, hi):
        ok, cur, length = True, t, 0
        while batch.parent[cur] >= 0:
            par = lo + batch.parent[cur]
            ok &= batch.tokens[cur] == target_argmax[par]
            cur, length = par, length + 1
        if ok and length > best:
            best, best_node = length, t
    return best, target_argmax[best_node]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 100_000), B=st.integers(1, 6), policy=st.sampled_from(["eagle3", "echo", "tetris"]))
def test_greedy_matches_brute_force(seed, B, policy):
    cfg = {"eagle3": dict(steps=4, topk=3, num_draft_tokens=12), "echo": dict(steps=4, topk=3, num_draft_tokens=12,
           remaining_num_draft_tokens=5), "tetris": dict(steps=4, topk=3)}[policy]
    p = make_policy(policy, cfg)
    forest = draft(RandomDrafter(vocab_size=6, seed=seed), p, np.zeros(B, np.int64), np.full(B, 3))
    batch = pack(forest, p.select(forest))
    rng = np.random.default_rng(seed)
    # A small vocabulary makes long accepted paths common.
    target = rng.integers(0, 6, batch.num_tokens)
    res = verify_greedy(batch, target)
    for i in range(B):
        length, bonus = brute_force_accept(batch, target, i)
        assert res.accept_len[i] == length
        assert res.bonus[i] == bonus
        path = res.accept_index[i, : length + 1]
        assert (batch.depth[path] == np.arange(length + 1)).all()


def test_sampling_is_lossless_in_distribution():
    """The first two emitted tokens follow the target's joint distribution, whatever the draft tree."""
    V, trials = 5, 120_000
    rng = np.random.default_rng(7)
    p = make_policy("eagle3", dict(steps=2, topk=3, num_draft_tokens=6))
    # One tree, replicated across `trials` requests: every request sees the same drafts and target.
    one = draft(RandomDrafter(vocab_size=V, seed=3), p, np.array([0]), np.array([4]))
    from echosim.spec.forest import DraftForest

    tile = lambda a: np.repeat(a, trials, axis=0)  # noqa: E731
    forest = DraftForest(root_token=tile(one.root_token), kv_len=tile(one.kv_len), token=tile(one.token),
                         logp=tile(one.logp), score=tile(one.score), parent=tile(one.parent), valid=tile(one.valid),
                         slot_depth=one.slot_depth, slot_rank=one.slot_rank, depth_offsets=one.depth_offsets,
                         k1=one.k1, k=one.k, stop_depth=tile(one.stop_depth))
    batch = pack(forest, p.select(forest))
    n = int(batch.tree_sizes[0])
    # Target distribution per node of the tree; the distribution after a token depends on which node emitted it.
    node_probs = rng.dirichlet(np.ones(V), size=n)
    probs = np.tile(node_probs, (trials, 1))
    res = verify_sampling(batch, probs, rng)
    emitted = res.emitted(batch)
    first = np.array([e[0] for e in emitted])
    counts = np.bincount(first, minlength=V)
    assert stats.chisquare(counts, node_probs[0] * trials).pvalue > 1e-3
    # Second token given the first: after an accepted draft x at depth 1, the target's distribution at that node.
    local_tok = batch.tokens[:n]
    children = {int(local_tok[j]): j for j in range(1, n) if batch.parent[j] == 0}
    for x, j in children.items():
        rows = [e for e in emitted if e[0] == x and len(e) >= 2]
        second = np.bincount([e[1] for e in rows], minlength=V)
        assert len(rows) > 1000
        assert stats.chisquare(second, node_probs[j] * len(rows)).pvalue > 1e-3
    # Tokens not drafted at the root are bonus tokens: their count is still p(x) * trials (checked above) and the
    # acceptance rate at the root equals the target mass of the drafted children.
    mass = node_probs[0][list(children)].sum()
    assert abs((res.accept_len > 0).mean() - mass) < 4 * np.sqrt(mass * (1 - mass) / trials)


def test_sampling_with_one_hot_target_equals_greedy():
    p = make_policy("eagle3", dict(steps=3, topk=2, num_draft_tokens=8))
    forest = draft(RandomDrafter(vocab_size=4, seed=5), p, np.zeros(16, np.int64), np.full(16, 2))
    batch = pack(forest, p.select(forest))
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, batch.num_tokens)
    onehot = np.eye(4)[target]
    g = verify_greedy(batch, target)
    s = verify_sampling(batch, onehot, rng)
    assert np.array_equal(g.accept_len, s.accept_len) and np.array_equal(g.bonus, s.bonus)
