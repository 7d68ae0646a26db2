"""The engine's torch tree verification equals the NumPy reference (echosim/spec/verify.py) on random batches."""

import numpy as np
import pytest
import torch

from echo_exec.sampling import apply_top_p, target_probs
from echo_exec.verify_torch import tree_index, tree_tensors, verify_greedy, verify_sampling
from echosim.spec import verify as ref
from echosim.spec.drafters import RandomDrafter
from echosim.spec.drafting import draft
from echosim.spec.pack import pack
from echosim.spec.policies import make_policy

CONFIGS = [("eagle3", dict(steps=4, topk=3, num_draft_tokens=12)),
           ("echo", dict(steps=4, topk=3, num_draft_tokens=12, remaining_num_draft_tokens=5)),
           ("tetris", dict(steps=3, topk=4)), ("ar", {}), ("smartspec", dict(max_k=4))]


def _batch(name, cfg, seed, B, V):
    p = make_policy(name, cfg)
    rng = np.random.default_rng(seed)
    forest = draft(RandomDrafter(vocab_size=V, seed=seed), p, rng.integers(0, V, B), rng.integers(0, 50, B))
    return pack(forest, p.select(forest))


class RecordingRng:
    """A Generator whose `random` draws are kept, in call order."""

    def __init__(self, seed):
        self.rng, self.calls = np.random.default_rng(seed), []

    def random(self, n):
        out = self.rng.random(n)
        self.calls.append(out)
        return out


def _coins_of(batch, res, calls):
    """Per-request coins [B, D+1] and bonus uniforms [B] as the reference consumed them: at level d it draws one
    coin per request whose walk is still at a node with children, in request order; then B bonus uniforms."""
    B = batch.batch_size
    D = int(batch.depth[:batch.num_tokens].max(initial=0))
    coins = np.zeros((B, D + 1))
    for d in range(len(calls) - 1):
        at = res.accept_index[:, d] if d < res.accept_index.shape[1] else np.full(B, -1)
        live = np.nonzero((res.accept_len >= d) & (at >= 0))[0]
        live = live[batch.retrive_next_token[at[live]] >= 0]
        assert len(live) == len(calls[d])
        coins[live, d] = calls[d]
    return coins, calls[-1]


@pytest.mark.parametrize("name,cfg", CONFIGS)
@pytest.mark.parametrize("seed", range(6))
def test_greedy_equals_reference(name, cfg, seed):
    V = 5  # a small vocabulary: long accepted paths are common
    batch = _batch(name, cfg, seed, B=1 + seed * 3, V=V)
    argmax = np.random.default_rng(seed + 100).integers(0, V, batch.num_tokens)
    want = ref.verify_greedy(batch, argmax)
    ti = tree_index(batch)
    got = verify_greedy(tree_tensors(batch, ti, "cpu"), torch.from_numpy(argmax)).numpy()
    assert np.array_equal(got.accept_len, want.accept_len)
    assert np.array_equal(got.accept_index, want.accept_index)
    assert np.array_equal(got.last, want.last) and np.array_equal(got.bonus, want.bonus)


@pytest.mark.parametrize("name,cfg", CONFIGS)
@pytest.mark.parametrize("seed", range(6))
def test_sampling_equals_reference(name, cfg, seed):
    V = 6
    batch = _batch(name, cfg, seed, B=2 + seed * 3, V=V)
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(V, 0.5), size=batch.num_tokens)
    rec = RecordingRng(seed + 1)
    want = ref.verify_sampling(batch, probs, rec)
    coins, bonus_u = _coins_of(batch, want, rec.calls)
    ti = tree_index(batch)
    got = verify_sampling(tree_tensors(batch, ti, "cpu"), torch.from_numpy(probs), torch.from_numpy(coins),
                          torch.from_numpy(bonus_u)).numpy()
    assert np.array_equal(got.accept_len, want.accept_len)
    assert np.array_equal(got.accept_index, want.accept_index)
    assert np.array_equal(got.bonus, want.bonus)


def test_one_hot_sampling_is_greedy():
    batch = _batch("eagle3", dict(steps=3, topk=2, num_draft_tokens=8), 3, B=12, V=4)
    argmax = np.random.default_rng(0).integers(0, 4, batch.num_tokens)
    tt = tree_tensors(batch, tree_index(batch), "cpu")
    g = verify_greedy(tt, torch.from_numpy(argmax))
    rng = np.random.default_rng(1)
    s = verify_sampling(tt, torch.from_numpy(np.eye(4)[argmax]), torch.from_numpy(rng.random((12, 4))),
                        torch.from_numpy(rng.random(12)))
    assert torch.equal(g.accept_len, s.accept_len) and torch.equal(g.bonus, s.bonus)


def test_target_probs_temperature_top_p_and_greedy_rows():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3, dtype=torch.float64)
    p = target_probs(logits, torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 0.8]))
    assert p[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # greedy row: one-hot argmax
    torch.testing.assert_close(p[1], torch.softmax(logits[1], -1))
    hot = torch.softmax(logits[2] / 0.5, -1)  # [0.867, 0.117, 0.016, 0.002]: 0.8 needs the first token only
    assert p[2].tolist() == [1.0, 0.0, 0.0, 0.0] and hot[0] > 0.8
    q = apply_top_p(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64), torch.tensor([0.7]))
    torch.testing.assert_close(q, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_lean_draft_forward_equals_the_model(family):
    """The drafter's fused forward computes Transformer.forward_packed: prefill chunk, then a tree step."""
    from echo_exec.drafter import LeanForward
    from echo_exec.model import KVCache, ModelConfig, Transformer, make_attn_meta

    cfg = ModelConfig(vocab_size=50, hidden_size=48, n_layers=2, n_heads=6, n_kv_heads=2, intermediate_size=64,
                      model_type=family, qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
                      o_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights(seed=1, std=0.2)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape))  # biases and norms away from 0 and 1
    m.eval()
    lean = LeanForward(m, 128)
    caches = [KVCache(cfg, 8, 8), KVCache(cfg, 8, 8)]
    rng = np.random.default_rng(0)
    slots = rng.permutation(64)
    steps = [(np.zeros(0, np.int64), slots[:20], np.arange(20), None),
             (slots[:20], slots[20:25], np.array([20, 21, 21, 22, 22]),
              np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]], bool))]
    with torch.inference_mode():
        for ctx, new, pos, tree in steps:
            meta = make_attn_meta([ctx], [new], [tree])
            tok = torch.from_numpy(rng.integers(0, 50, len(new)))
            want = m.forward_packed(tok, torch.from_numpy(pos), meta, caches[0])
            got = lean(tok, torch.from_numpy(pos), meta, caches[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].k[1], caches[0].k[1], atol=1e-5, rtol=1e-5)
