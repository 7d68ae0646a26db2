"""The engine's packed path (paged KV cache, explicit positions, tree masks) equals the plain forward."""

import numpy as np
import pytest
import torch

from echo_exec.model import KVCache, ModelConfig, Transformer, make_attn_meta

V = 61
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


def _model(seed=0) -> Transformer:
    # Every switch on (GQA, qkv bias, q/k norm) so the packed path covers them all.
    cfg = ModelConfig(vocab_size=V, hidden_size=48, n_layers=2, n_heads=6, n_kv_heads=2, intermediate_size=72,
                      qkv_bias=True, qk_norm=True, rope_theta=1000.0)
    m = Transformer(cfg)
    m.init_weights(seed=seed, std=0.2)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
    return m.eval()


def _plain(m, seq) -> torch.Tensor:
    dev = m.lm_head.weight.device
    with torch.no_grad():
        return m(torch.as_tensor(seq, device=dev)[None])[0]


def _slots(blocks, bs):
    """The slots of a request owning `blocks` (in order), non-contiguous in the pool."""
    return np.concatenate([b * bs + np.arange(bs) for b in blocks])


def _step(m, cache, ctx, new, toks, pos, masks=None):
    dev = m.lm_head.weight.device
    attn = make_attn_meta(ctx, new, masks, device=dev)
    with torch.no_grad():
        return m.forward_packed(torch.as_tensor(np.concatenate(toks), device=dev),
                                torch.as_tensor(np.concatenate(pos), device=dev), attn, cache)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_then_decode_equals_plain(device):
    torch.manual_seed(0)
    m = _model().to(device)
    rng = np.random.default_rng(0)
    seq = rng.integers(0, V, 45)
    ref = _plain(m, seq)
    bs = 4
    cache = KVCache(m.cfg, num_blocks=20, block_size=bs, device=device)
    slots = _slots(rng.permutation(20)[:12], bs)
    got, p = [], 0
    for n in [13, 13] + [1] * 19:
        got.append(_step(m, cache, [slots[:p]], [slots[p:p + n]], [seq[p:p + n]], [np.arange(p, p + n)]))
        p += n
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-5, rtol=1e-5)


def test_mixed_batch_of_requests_equals_plain():
    """One packed call: request 0 prefills a chunk, requests 1 and 2 decode; all context lengths differ."""
    torch.manual_seed(1)
    m = _model(1)
    rng = np.random.default_rng(1)
    bs = 8
    cache = KVCache(m.cfg, num_blocks=30, block_size=bs)
    blocks = rng.permutation(30)
    seqs = [rng.integers(0, V, n) for n in (30, 17, 40)]
    slots = [_slots(blocks[0:5], bs), _slots(blocks[5:10], bs), _slots(blocks[10:16], bs)]
    # Prefill each request's context except the part the mixed call will process.
    new_len = [12, 1, 1]
    for r in range(3):
        c = len(seqs[r]) - new_len[r]
        _step(m, cache, [slots[r][:0]], [slots[r][:c]], [seqs[r][:c]], [np.arange(c)])
    ctx = [slots[r][:len(seqs[r]) - new_len[r]] for r in range(3)]
    new = [slots[r][len(seqs[r]) - new_len[r]:len(seqs[r])] for r in range(3)]
    toks = [seqs[r][-new_len[r]:] for r in range(3)]
    pos = [np.arange(len(seqs[r]) - new_len[r], len(seqs[r])) for r in range(3)]
    got = _step(m, cache, ctx, new, toks, pos)
    ref = torch.cat([_plain(m, seqs[r])[-new_len[r]:] for r in range(3)])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _tree(parents):
    """Ancestor-or-self mask of nodes in topological order (parent index; -1 = child of the context)."""
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    depth = np.zeros(n, dtype=np.int64)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
            depth[i] = depth[p] + 1
    return mask, depth


def _path(parents, i):
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


@pytest.mark.parametrize("device", DEVICES)
def test_tree_verify_equals_each_branch_then_commit_path(device):
    torch.manual_seed(2)
    m = _model(2).to(device)
    rng = np.random.default_rng(2)
    bs = 4
    cache = KVCache(m.cfg, num_blocks=40, block_size=bs, device=device)
    blocks = rng.permutation(40)
    trees = [[-1, -1, 0, 0, 1, 2, 5, 3], [-1, 0, 0, 1, -1]]
    ctx_seqs = [rng.integers(0, V, 21), rng.integers(0, V, 9)]
    node_toks = [rng.integers(0, V, len(t)) for t in trees]
    slots = [_slots(blocks[:10], bs), _slots(blocks[10:20], bs)]
    for r in range(2):
        c = len(ctx_seqs[r])
        _step(m, cache, [slots[r][:0]], [slots[r][:c]], [ctx_seqs[r]], [np.arange(c)])
    masks, depths = zip(*(_tree(t) for t in trees), strict=True)
    ctx = [slots[r][:len(ctx_seqs[r])] for r in range(2)]
    # Tree nodes go to the slots after the context (scratch space the engine reuses).
    new = [slots[r][len(ctx_seqs[r]):len(ctx_seqs[r]) + len(trees[r])] for r in range(2)]
    pos = [len(ctx_seqs[r]) + depths[r] for r in range(2)]
    got = _step(m, cache, ctx, new, node_toks, pos, list(masks))
    row = 0
    for r in range(2):
        for i in range(len(trees[r])):
            branch = np.concatenate([ctx_seqs[r], node_toks[r][_path(trees[r], i)]])
            torch.testing.assert_close(got[row], _plain(m, branch)[-1], atol=1e-5, rtol=1e-5)
            row += 1

    # Commit request 0's path to node 6 (nodes 0, 2, 5, 6): move its K/V to contiguous slots, then decode on.
    path = _path(trees[0], 6)
    c = len(ctx_seqs[0])
    cache.copy_slots(torch.as_tensor(new[0][path], device=device),
                     torch.as_tensor(slots[0][c:c + len(path)], device=device))
    seq = np.concatenate([ctx_seqs[0], node_toks[0][path]])
    nxt = rng.integers(0, V, 1)
    p = len(seq)
    out = _step(m, cache, [slots[0][:p]], [slots[0][p:p + 1]], [nxt], [np.arange(p, p + 1)])
    torch.testing.assert_close(out[0], _plain(m, np.concatenate([seq, nxt]))[-1], atol=1e-5, rtol=1e-5)


def test_packed_without_cache_and_logits_rows():
    torch.manual_seed(3)
    m = _model(3)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, V, 11), rng.integers(0, V, 5)]
    # Without a cache, slots index the packed tokens themselves.
    attn = make_attn_meta([np.zeros(0, np.int64)] * 2, [np.arange(11), np.arange(11, 16)])
    toks = torch.as_tensor(np.concatenate(seqs))
    pos = torch.as_tensor(np.concatenate([np.arange(11), np.arange(5)]))
    with torch.no_grad():
        got = m.forward_packed(toks, pos, attn, None)
        last = m.forward_packed(toks, pos, attn, None, logits_rows=torch.tensor([10, 15]))
    ref = torch.cat([_plain(m, s) for s in seqs])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, ref[[10, 15]], atol=1e-5, rtol=1e-5)


def test_a_ragged_batch_attends_in_groups_with_the_same_result():
    """Trees of 1 to 24 tokens side by side: attention runs per group of similar sizes (no request padded to the
    longest tree), and every token's logits equal the one padded call's."""
    import dataclasses

    from echo_exec.model import ragged_groups

    torch.manual_seed(0)
    m = _model()
    rng = np.random.default_rng(3)
    sizes = [24, 1, 2, 2, 3, 1, 5, 1, 1, 2, 9, 1]
    ctx_lens = rng.integers(5, 40, len(sizes))
    slots = rng.permutation(4000)
    ctx, new, toks, pos, masks, at = [], [], [], [], [], 0
    for n, c in zip(sizes, ctx_lens, strict=True):
        ctx.append(slots[at:at + c])
        new.append(slots[at + c:at + c + n])
        at += c + n
        toks.append(rng.integers(0, V, n))
        pos.append(c + np.arange(n))
        tree = np.tril(np.ones((n, n), bool)) & (rng.random((n, n)) < 0.5)
        np.fill_diagonal(tree, True)
        masks.append(tree)
    cache = KVCache(m.cfg, num_blocks=1000, block_size=4)
    for k in range(m.cfg.n_layers):   # some context already in the cache
        cache.k_flat(k).normal_()
        cache.v_flat(k).normal_()
    attn = make_attn_meta(ctx, new, masks)
    assert len(attn.groups or ()) == 6   # query counts 1, 2, 3-4, 5-8, 9-16, 17-32
    assert sorted(torch.cat([g.rows for g in attn.groups]).tolist()) == list(range(sum(sizes)))
    one_call = dataclasses.replace(attn, groups=None)
    tok = torch.as_tensor(np.concatenate(toks))
    p = torch.as_tensor(np.concatenate(pos))
    with torch.no_grad():
        grouped = m.forward_packed(tok, p, attn, cache)
        padded = m.forward_packed(tok, p, one_call, cache)
    torch.testing.assert_close(grouped, padded, atol=1e-5, rtol=1e-5)
    # a uniform batch, or one whose grouping saves little, stays one call
    q = np.array([3, 3, 3])
    kl = np.array([10, 10, 10])
    assert ragged_groups(q, kl, np.zeros((3, 10), np.int64), np.zeros((3, 3), np.int64), np.ones((3, 3, 10), bool)) \
        is None
    q = np.array([4, 3, 4])
    assert ragged_groups(q, kl, np.zeros((3, 10), np.int64), np.zeros((3, 4), np.int64), np.ones((3, 4, 10), bool)) \
        is None
