"""Hardware and model specs: loaded from the JSON catalog (cost_models/catalog/) or a Hugging Face config.json.

A model spec holds only what the step-time models need: layer shapes, heads, vocabulary, MoE structure. Adding a
model means adding a JSON file (Hugging Face config.json keys plus `name`, `aliases`, `source`) or pointing at a
config.json / model directory on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cost_models.errors import CostModelError

CATALOG_DIR = Path(__file__).parent / "catalog"


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    peak_bf16_tflops: float  # datasheet dense bf16 tensor-core peak
    hbm_tbps: float  # datasheet HBM bandwidth, TB/s
    memory_gb: float
    nvlink_gbps: float  # datasheet NVLink bandwidth (bidirectional, per GPU), GB/s
    source: str = ""
    sm_count: int = 132  # streaming multiprocessors: thread blocks of one wave (attention's critical path)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (per expert for Mixtral-style MoE)
    vocab_size: int  # rows of the LM head: an EAGLE-3 head's draft vocabulary (draft_vocab_size)
    num_experts: int = 0  # 0 = dense MLP
    experts_per_token: int = 0
    moe_intermediate_size: int = 0  # width of one expert
    qkv_in_features: int = 0  # 0 = hidden_size; EAGLE-3 heads read [embedding, hidden] = 2 x hidden_size
    gated_mlp: bool = True
    dtype_bytes: int = 2  # bf16 / fp16 weights and activations
    source: str = ""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def qkv_in(self) -> int:
        return self.qkv_in_features or self.hidden_size

    def weight_params(self) -> int:
        """Parameters read per forward of all experts (embedding excluded, LM head included)."""
        d, hd = self.hidden_size, self.head_dim
        attn = self.qkv_in() * (self.num_heads + 2 * self.num_kv_heads) * hd + self.num_heads * hd * d
        mult = 3 if self.gated_mlp else 2
        if self.is_moe:
            mlp = self.num_experts * mult * d * self.moe_intermediate_size + d * self.num_experts
        else:
            mlp = mult * d * self.intermediate_size
        return self.num_layers * (attn + mlp) + d * self.vocab_size


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


@cache
def _catalog(kind: str) -> dict[str, dict]:
    """name or alias (normalized) -> parsed JSON, for 'hardware' or 'models'."""
    out: dict[str, dict] = {}
    for path in sorted((CATALOG_DIR / kind).glob("*.json")):
        data = json.loads(path.read_text())
        data["_path"] = str(path)
        for key in [data.get("name", path.stem), path.stem, *data.get("aliases", [])]:
            out[_norm(key)] = data
    return out


def known_hardware() -> list[str]:
    return sorted({d["name"] for d in _catalog("hardware").values()})


def known_models() -> list[str]:
    return sorted({d["name"] for d in _catalog("models").values()})


def load_hardware(name_or_path: str | HardwareSpec) -> HardwareSpec:
    """A catalog name ('h100-sxm', 'h200', 'a100-80gb', or an alias) or a JSON file with the same fields."""
    if isinstance(name_or_path, HardwareSpec):
        return name_or_path
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        data = _read_json(path)
    else:
        data = _catalog("hardware").get(_norm(str(name_or_path)))
        if data is None:
            raise CostModelError(f"unknown hardware {name_or_path!r}; known: {', '.join(known_hardware())}")
    try:
        return HardwareSpec(name=data["name"], peak_bf16_tflops=float(data["peak_bf16_tflops"]),
                            hbm_tbps=float(data["hbm_tbps"]), memory_gb=float(data["memory_gb"]),
                            nvlink_gbps=float(data["nvlink_gbps"]), source=data.get("source", ""),
                            sm_count=int(data.get("sm_count", 132)))
    except KeyError as exc:
        raise CostModelError("missing field", path=data.get("_path"), field=exc.args[0]) from None


def load_model(name_or_path: str | Path | ModelSpec) -> ModelSpec:
    """A catalog name or alias ('qwen3-8b', 'meta-llama/Llama-3.1-8B'), a config.json file, or a directory with one."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    data = _catalog("models").get(_norm(str(name_or_path)))
    if data is None:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CostModelError(f"unknown model {str(name_or_path)!r} (neither a catalog name nor a config.json); "
                            f"known: {', '.join(known_models())}")
        data = _read_json(path)
        data.setdefault("name", path.parent.name if path.name == "config.json" else path.stem)
    return model_from_config(data, path=data.get("_path"))


def model_from_config(cfg: dict, path: str | None = None) -> ModelSpec:
    """A ModelSpec from Hugging Face config.json keys (llama, qwen2, qwen3, qwen3_moe, mixtral, EAGLE-3 heads)."""
    try:
        d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        ffn = int(cfg["intermediate_size"])
        moe_ffn = int(cfg.get("moe_intermediate_size") or (ffn if experts else 0))
        eagle3 = bool(cfg.get("eagle3")) or any("eagle3" in a.lower() for a in cfg.get("architectures") or [])
        return ModelSpec(
            name=str(cfg.get("name") or cfg.get("_name_or_path") or "model"),
            hidden_size=d,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or d // heads),
            intermediate_size=ffn,
            # an EAGLE-3 head's LM head spans its reduced draft vocabulary (config.json's draft_vocab_size)
            vocab_size=int(cfg.get("draft_vocab_size") or cfg["vocab_size"]),
            num_experts=experts,
            experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate_size=moe_ffn,
            qkv_in_features=2 * d if eagle3 else 0,
            gated_mlp=bool(cfg.get("gated_mlp", True)),
            source=str(cfg.get("source", path or "")),
        )
    except KeyError as exc:
        raise CostModelError("missing field", path=path, field=exc.args[0]) from None
    except (TypeError, ValueError) as exc:
        raise CostModelError(f"bad value: {exc}", path=path) from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CostModelError(f"cannot read JSON: {exc}", path=str(path)) from None
    if not isinstance(data, dict):
        raise CostModelError("expected a JSON object", path=str(path))
    data["_path"] = str(path)
    return data
