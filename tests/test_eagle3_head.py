"""The EAGLE-3 head (echo_exec.model.Eagle3Head): what training computes is what the engine's drafter computes, the
checkpoint is SGLang's LlamaForCausalLMEagle3 layout, and the engine drafting with it is lossless (greedy output
token for token the plain output) under the eagle3 and echo policies at batch 1 and 8 on 50 prompts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from echo_exec.drafter import Eagle3Drafter
from echo_exec.engine import Engine, SamplingParams
from echo_exec.loader import load_model, save_model
from echo_exec.model import EAGLE3_ARCH, Eagle3Head, ModelConfig, Transformer, make_attn_meta
from echo_exec.train_tiny import eagle3_config, init_weights, warm_start_eagle3

torch.set_num_threads(1)

V = 48
EOS = V - 1
F64 = torch.float64
SHIPPED = Path(__file__).resolve().parents[1] / "echo_exec" / "models"


def _target(seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=V, hidden_size=32, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=64,
                      eos_token_id=EOS, max_position_embeddings=512)
    m = Transformer(cfg)
    m.init_weights(seed=seed, std=0.3)  # large weights: peaked, seed-specific distributions
    return m


def _head(target: Transformer, seed: int = 1, std: float = 0.3) -> Eagle3Head:
    cfg = eagle3_config(target.cfg)
    cfg.extra["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [0, 1, 2]
    h = Eagle3Head(cfg)
    init_weights(h, seed, 1, std=std)
    return h


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("eagle3")
    t = _target()
    save_model(t, d / "target")
    save_model(_head(t), d / "head")
    return d / "target", d / "head"


def test_checkpoint_is_sglangs_eagle3_layout(pair):
    _, head_dir = pair
    cfg = json.loads((head_dir / "config.json").read_text())
    assert cfg["architectures"] == [EAGLE3_ARCH] and cfg["num_hidden_layers"] == 1
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert cfg["draft_vocab_size"] == V and cfg["target_hidden_size"] == 32
    from safetensors import safe_open

    with safe_open(str(head_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    # the names SGLang's LlamaForCausalLMEagle3.load_weights maps (midlayer -> layers.0, q/k/v -> qkv_proj, ...)
    want = {"embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight"} | {
        f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm",
                                         "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert names == want
    head = load_model(head_dir, dtype=F64)
    assert isinstance(head, Eagle3Head) and head.aux_layers == (0, 1, 2)
    assert head.fc.weight.shape == (32, 96) and head.midlayer.self_attn.q_proj.weight.shape == (32, 64)


def test_training_passes_equal_the_drafters_computation():
    """forward_train's pass k at row t (the training-time test) equals a packed forward over the keys the drafter
    gives that row: pass 0's rows 0..t (the committed pairs) and row t of passes 1..k (its own draft chain)."""
    torch.manual_seed(0)
    t = _target().double()
    head = _head(t).double()
    T, steps = 12, 3
    tokens = torch.randint(0, V, (1, T + steps))
    _, feats = t.forward_aux(tokens[:, :T], head.aux_layers)
    out = head.forward_train(feats, tokens, steps)
    with torch.no_grad():
        h0 = head.fc(feats[0])
        n = T
        logits0, outs0 = head.forward_packed(h0, tokens[0, 1:T + 1], torch.arange(T),
                                             make_attn_meta([np.zeros(0, np.int64)], [np.arange(n)]), None)
        torch.testing.assert_close(logits0, out[0][0], rtol=1e-9, atol=1e-9)
        row = 7
        chain_h = [outs0[row]]
        hs, toks, pos = list(h0[:row + 1]), list(tokens[0, 1:row + 2]), list(range(row + 1))
        for k in range(1, steps):
            hs.append(chain_h[-1])
            toks.append(tokens[0, row + k + 1])
            pos.append(row + k)
            n = len(hs)
            mask = np.zeros((n, n), bool)
            mask[:row + 1, :row + 1] = np.tril(np.ones((row + 1, row + 1), bool))
            mask[row + 1:, :row + 1] = True
            mask[row + 1:, row + 1:] = np.tril(np.ones((k, k), bool))
            lg, o = head.forward_packed(torch.stack(hs), torch.stack(toks), torch.tensor(pos),
                                        make_attn_meta([np.zeros(0, np.int64)], [np.arange(n)], [mask]), None)
            torch.testing.assert_close(lg[-1], out[k][0, row], rtol=1e-9, atol=1e-9)
            chain_h.append(o[-1])


def test_warm_start_copies_the_targets_last_layer():
    t = _target()
    head = _head(t)
    warm_start_eagle3(head, t, 0)
    last = t.model.layers[-1]
    assert torch.equal(head.lm_head.weight, t.lm_head.weight)
    assert torch.equal(head.midlayer.mlp.down_proj.weight, last.mlp.down_proj.weight)
    assert torch.equal(head.midlayer.self_attn.q_proj.weight[:, 32:], last.self_attn.q_proj.weight)
    assert torch.equal(head.fc.weight[:, -32:], torch.eye(32))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    lens = np.r_[1, 2, 70, rng.integers(1, 30, 47)]  # one-token prompts, and one chunked prefill
    return [rng.integers(0, V - 1, n).tolist() for n in lens]


def _generate(target, draft, policy, prompts, batch, config=None, **kw):
    eng = Engine(target, draft, policy=policy, policy_config=config, dtype=F64, max_running=batch,
                 max_prefill_tokens=32, **kw)
    return eng, [o.output_ids for o in eng.generate(prompts, SamplingParams(max_new_tokens=16))]


@pytest.mark.parametrize("policy,config", [
    ("eagle3", dict(steps=3, topk=3, num_draft_tokens=8)),
    ("echo", dict(steps=4, topk=3, num_draft_tokens=10, remaining_num_draft_tokens=4, gates=[(2, 0.3)])),
])
def test_engine_with_the_head_is_lossless(pair, prompts, policy, config):
    target, head = pair
    _, ref = _generate(target, None, "ar", prompts, 16)
    for batch in (1, 8):
        eng, out = _generate(target, head, policy, prompts, batch, config)
        assert isinstance(eng.drafter, Eagle3Drafter)
        bad = [i for i, (a, b) in enumerate(zip(out, ref, strict=True)) if a != b]
        assert not bad, f"{policy} batch {batch}: prompt {bad[0]} differs"


def test_a_head_for_another_target_is_refused(pair, tmp_path):
    from echo_exec.errors import ExecError

    _, head = pair
    small = Transformer(ModelConfig(vocab_size=V, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    intermediate_size=64, eos_token_id=EOS))
    small.init_weights(seed=3)
    save_model(small, tmp_path / "t2")
    with pytest.raises(ExecError, match="reads layers"):
        Engine(tmp_path / "t2", head, policy="eagle3")


def test_engine_with_the_head_survives_preemption(pair, prompts):
    """A pool that holds only a few requests: preempted requests re-prefill, the head's features restart."""
    target, head = pair
    _, ref = _generate(target, None, "ar", prompts[:12], 16)
    eng, out = _generate(target, head, "eagle3", prompts[:12], 8, dict(steps=3, topk=3, num_draft_tokens=8),
                         num_kv_blocks=12, block_size=8)
    assert out == ref
    assert eng.stats()["preemptions"] > 0


def test_shipped_head_is_lossless_and_accepts():
    """The trained head on held-out code: the same tokens as plain decoding, and real acceptance."""
    from echo_exec.train_tiny import split_files

    _, held = split_files()
    files = [f for f in held if f.stat().st_size > 4000][:6]
    prompts = [list(f.read_bytes()[2000:2064]) for f in files]
    target, head = SHIPPED / "tiny-target", SHIPPED / "tiny-eagle3"
    params = SamplingParams(max_new_tokens=24)
    ref = [o.output_ids for o in Engine(target, None, policy="ar", dtype=F64, max_running=6).generate(prompts, params)]
    for batch in (1, 6):
        eng = Engine(target, head, policy="eagle3", policy_config=dict(steps=4, topk=4, num_draft_tokens=16),
                     dtype=F64, max_running=batch)
        assert [o.output_ids for o in eng.generate(prompts, params)] == ref, batch
        assert eng.stats()["avg_accept_length"] > 1.5
