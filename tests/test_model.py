"""Our Llama / Qwen2 / Qwen3 against transformers' own, through our loader, on tiny random configs."""

import json

import pytest
import torch

from echo_exec.loader import load_model, save_model
from echo_exec.model import ModelConfig, Transformer
from echosim.errors import UserError

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the default init (norm scales and biases included) so a mismatch cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500.0)),
    "llama-bias-tied": ("LlamaConfig", "LlamaForCausalLM",
                        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM",
                            dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1000000.0, head_dim=24)),
    "qwen3-mha-untied": ("Qwen3Config", "Qwen3ForCausalLM",
                         dict(num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    cfg_cls, model_cls, extra = CASES[case]
    hf_cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra})
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(hf_cfg).eval()
    _randomize(hf, seed=1)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert ref.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # The family-specific switches were read from config.json.
    mt = json.loads((tmp_path / "config.json").read_text())["model_type"]
    assert ours.cfg.model_type == mt
    assert ours.cfg.qk_norm == (mt == "qwen3")
    assert ours.cfg.qkv_bias == (mt == "qwen2" or bool(extra.get("attention_bias")))


def test_our_checkpoints_load_in_transformers(tmp_path):
    """save_model writes a directory transformers reads as the same model (the shipped pair's format)."""
    cfg = ModelConfig(vocab_size=259, hidden_size=48, n_layers=2, n_heads=6, n_kv_heads=2,
                      intermediate_size=80, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=256,
                      eos_token_id=257)
    ours = Transformer(cfg)
    ours.init_weights(seed=3, std=0.2)
    save_model(ours, tmp_path)
    assert ModelConfig.from_hf(tmp_path / "config.json").as_dict() == cfg.as_dict()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 259, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_bad_model_dirs(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "llama"}))
    with pytest.raises(UserError, match="no model.safetensors"):
        load_model(tmp_path)
    cfg = dict(BASE, model_type="llama")
    del cfg["hidden_size"]
    with pytest.raises(UserError, match="hidden_size"):
        ModelConfig.from_hf(cfg)


def test_missing_and_misshaped_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = ModelConfig(vocab_size=50, hidden_size=32, n_layers=1, n_heads=4, n_kv_heads=2,
                      intermediate_size=40)
    save_model(Transformer(cfg), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    w = state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="up_proj"):
        load_model(tmp_path)
    state["model.layers.0.mlp.up_proj.weight"] = w[:, :10].contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="shape"):
        load_model(tmp_path)
