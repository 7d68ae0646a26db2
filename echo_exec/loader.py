"""Load and save models as Hugging Face style directories: config.json + model.safetensors (or the sharded
model-0000x-of-0000y.safetensors with model.safetensors.index.json). Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from echo_exec.errors import ExecError
from echo_exec.model import EAGLE3_ARCH, Eagle3Head, ModelConfig, Transformer


def _weight_files(d: Path) -> list[Path]:
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    index = d / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / n for n in names]
    found = sorted(d.glob("*.safetensors"))
    if not found:
        raise ExecError("no model.safetensors in the model directory", path=str(d))
    return found


def load_model(model_dir: str | Path, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Transformer | Eagle3Head:
    """A Transformer from `model_dir` (config.json + safetensors), in eval mode, on `device` in `dtype`; an
    Eagle3Head when config.json names architectures ["LlamaForCausalLMEagle3"]."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    if not (d / "config.json").exists():
        raise ExecError("not a model directory (no config.json)", path=str(d))
    cfg = ModelConfig.from_hf(d / "config.json")
    with torch.device("meta"):
        model = Eagle3Head(cfg) if cfg.extra.get("architectures") == [EAGLE3_ARCH] else Transformer(cfg)
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(d):
        state.update(load_file(str(f), device=str(device)))
    expected = set(model.state_dict())
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise ExecError(f"weights missing from the checkpoint: {', '.join(missing[:5])}"
                        + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""), path=str(d))
    unexpected = sorted(k for k in set(state) - expected if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ExecError(f"unexpected weights in the checkpoint: {', '.join(unexpected[:5])}", path=str(d))
    for k, v in state.items():
        if k in expected and tuple(v.shape) != tuple(model.state_dict()[k].shape):
            raise ExecError(f"weight {k} has shape {tuple(v.shape)}, the config implies "
                            f"{tuple(model.state_dict()[k].shape)}", path=str(d))
    state = {k: v.to(dtype) for k, v in state.items() if k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


def save_model(model: Transformer, model_dir: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write config.json and model.safetensors (in `dtype`, default the model's; a tied lm_head is not
    duplicated). Files are written next to their targets and renamed, so a reader never sees half a
    checkpoint."""
    from safetensors.torch import save_file

    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp_w, tmp_c = d / "model.safetensors.tmp", d / "config.json.tmp"
    save_file(state, str(tmp_w), metadata={"format": "pt"})
    model.cfg.to_hf(tmp_c)
    os.replace(tmp_w, d / "model.safetensors")
    os.replace(tmp_c, d / "config.json")
