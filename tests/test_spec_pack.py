import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echosim.spec.drafters import RandomDrafter
from echosim.spec.drafting import draft
from echosim.spec.forest import DraftForest, slot_layout
from echosim.spec.pack import PackError, pack, to_dense
from echosim.spec.policies import make_policy
from echosim.spec.verify import verify_greedy, verify_greedy_walk


def sglang_forest(parent_list, seq_lens, topk, depth):
    """A forest in SGLang's candidate numbering: slot c hangs from parent_list[c // topk] (root if 0)."""
    sd, sr, off = slot_layout(topk, topk, depth)
    B, S = len(parent_list), int(off[-1])
    c = np.arange(S)
    pt = c // topk
    par = np.stack([np.where(pt == 0, -1, np.asarray(pl)[np.minimum(pt, len(pl) - 1)]) for pl in parent_list])
    score = -np.broadcast_to(sd.astype(float), (B, S)).copy() - 1e-3 * c  # decreasing along every path
    return DraftForest(root_token=np.arange(B) + 100, kv_len=np.asarray(seq_lens), token=np.arange(B * S).reshape(B, S),
                       logp=np.full((B, S), -1.0, np.float32), score=score, parent=par.astype(np.int32),
                       valid=np.ones((B, S), bool), slot_depth=sd, slot_rank=sr, depth_offsets=off, k1=topk, k=topk)


def test_golden_against_sglang_build_tree():
    # Inputs and expected outputs of SGLang's own build-tree test (bs=2, topk=4, depth=4, N=8).
    parent_list = [[-1, 0, 1, 2, 3, 4, 8, 9, 10, 20, 24, 21, 28], [-1, 0, 1, 2, 3, 4, 5, 6, 7, 24, 28, 20, 21]]
    selected = np.array([[0, 1, 4, 8, 20, 24, 36], [0, 4, 5, 6, 7, 24, 36]])
    forest = sglang_forest(parent_list, [5, 10], topk=4, depth=4)
    S = forest.num_slots
    batch = pack(forest, np.sort((np.arange(2)[:, None] * S + selected).ravel()))
    assert batch.positions.tolist() == [5, 6, 6, 7, 7, 8, 8, 9, 10, 11, 12, 12, 12, 12, 13, 14]
    assert batch.retrive_next_token.reshape(2, 8).tolist() == [[1, 3, 4, 5, 6, 7, -1, -1], [1, 2, -1, 6, -1, -1, 7, -1]]
    assert batch.retrive_next_sibling.reshape(2, 8).tolist() == [[-1, 2, -1, -1, -1, -1, -1, -1],
                                                                  [-1, -1, 3, 4, 5, -1, -1, -1]]
    assert batch.retrive_index.tolist() == list(range(16))
    assert batch.qo_indptr.tolist() == [0, 8, 16]
    assert batch.tokens[0] == 100 and batch.tokens[8] == 101  # roots first
    full = batch.full_mask(1)
    assert full.shape == (8, 18) and full[:, :10].all()


def test_not_ancestor_closed_is_rejected():
    forest = sglang_forest([[-1, 0, 1, 2, 3, 4, 8, 9, 10, 20, 24, 21, 28]], [5], topk=4, depth=4)
    with pytest.raises(PackError, match="ancestor-closed"):
        pack(forest, np.array([0, 20]))  # 20 hangs from 4, which is not selected


def random_step(seed: int, B: int, policy: str, cfg: dict):
    p = make_policy(policy, cfg)
    forest = draft(RandomDrafter(vocab_size=64, seed=seed), p, np.arange(B) % 64, np.arange(B) * 3 + 5)
    return forest, p.select(forest)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 12), topk=st.integers(1, 4), steps=st.integers(1, 4),
       n=st.integers(1, 30), pad_to=st.sampled_from([1, 8, 64]))
def test_pack_round_trip_and_mask_rows(seed, B, topk, steps, n, pad_to):
    size = topk + (steps - 1) * topk * topk
    forest, sel = random_step(seed, B, "eagle3", dict(steps=steps, topk=topk,
                                                      num_draft_tokens=min(n, size) + 1))
    batch = pack(forest, sel, pad_to=pad_to)
    unchecked = pack(forest, sel, pad_to=pad_to, check=False)  # what the simulator runs: the same batch
    assert all(np.array_equal(getattr(batch, f), getattr(unchecked, f)) for f in vars(batch))
    T = batch.num_tokens
    assert len(batch.tokens) % pad_to == 0 and len(batch.tokens) >= T
    # Round trip: the packed nodes are exactly the selection, in order.
    assert np.array_equal(batch.node[:T][batch.node[:T] >= 0], sel)
    S = forest.num_slots
    req = batch.request_of_token()
    for t in range(T):
        i, local = req[t], t - batch.qo_indptr[req[t]]
        row = batch.request_mask(i)[local]
        # Mask row = ancestors and itself, walking parents in the forest.
        expect = {local}
        cur = t
        while batch.parent[cur] >= 0:
            cur = batch.qo_indptr[i] + batch.parent[cur]
            expect.add(int(cur - batch.qo_indptr[i]))
        assert set(np.nonzero(row)[0].tolist()) == expect
        if batch.node[t] >= 0:
            assert batch.tokens[t] == forest.token.ravel()[batch.node[t]]
            assert batch.positions[t] == forest.kv_len[i] + forest.slot_depth[batch.node[t] % S]
        else:
            assert local == 0 and batch.positions[t] == forest.kv_len[i]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 8))
def test_dense_pads_are_never_linked_or_accepted(seed, B):
    forest, sel = random_step(seed, B, "echo", dict(steps=3, topk=3, num_draft_tokens=12,
                                                     remaining_num_draft_tokens=3, gates=[[2, 0.2]]))
    batch = pack(forest, sel)
    dense = to_dense(batch, num_tokens=int(batch.tree_sizes.max()) + 3)
    linked = np.concatenate([dense.retrive_next_token.ravel(), dense.retrive_next_sibling.ravel()])
    pad_local = set(np.nonzero(dense.is_pad.any(axis=0))[0].tolist())
    for b in range(B):
        links = set(dense.retrive_next_token[b].tolist()) | set(dense.retrive_next_sibling[b].tolist())
        assert not (links & set(np.nonzero(dense.is_pad[b])[0].tolist()))
    assert linked.max() < dense.tokens.shape[1] and pad_local  # there are pads
    # Adversarial target: the argmax everywhere is the pad token, and pad rows attend only to themselves.
    target = np.zeros_like(dense.tokens)
    acc, _ = verify_greedy_walk(dense.retrive_next_token, dense.retrive_next_sibling, dense.tokens, target)
    real_match = (dense.tokens == 0) & ~dense.is_pad
    assert (acc <= real_match.sum(axis=1)).all()
    for b in range(B):
        for j in np.nonzero(dense.is_pad[b])[0]:
            assert dense.mask[b, j].sum() == 1 and dense.mask[b, j, j]
    # Ragged and dense verification agree.
    rng = np.random.default_rng(seed)
    tgt = rng.integers(0, 64, batch.num_tokens)
    res = verify_greedy(batch, tgt)
    dense_tgt = np.zeros_like(dense.tokens)
    dense_tgt[~dense.is_pad] = tgt
    acc, bonus = verify_greedy_walk(dense.retrive_next_token, dense.retrive_next_sibling, dense.tokens, dense_tgt)
    assert np.array_equal(acc, res.accept_len) and np.array_equal(bonus, res.bonus)
