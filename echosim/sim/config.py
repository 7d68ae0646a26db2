"""What one simulated cluster is: model, hardware, replicas, batching limits, KV cache, policy, seed.

Everything here is plain data, saved as config.json in the run folder, plus the few derived quantities that the
replicas need (the step-time model, the KV capacity in blocks) with one-line errors for impossible setups.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from echosim.sim.errors import SimError

ROUTERS = ("round_robin", "least_outstanding", "least_kv", "prefix")
PREFILL_FORWARDS = ("mixed", "separate")
CORE_MODES = ("auto", "exact", "table")
# KV-cache block (page) size cap: vLLM offers 1 to 128 tokens per block, SGLang's page size is 1 to a few hundred;
# a block past this is a typo (and with the KV capacity in blocks, a huge block hides that nothing fits)
MAX_BLOCK_TOKENS = 1024
# hardware where cost_model "auto" uses the H100 fit (carried by datasheet ratios off the H100): where it was checked
FIT_CARRIES_TO = ("h100-sxm", "h200")


@dataclass
class ClusterConfig:
    model: str = "qwen3-8b"
    hardware: str = "h100"
    tp: int = 1                            # tensor-parallel degree of each replica (GPUs per replica)
    replicas: int = 1
    router: str = "round_robin"            # round_robin | least_outstanding | least_kv
    draft: str | None = None               # draft model (default: the catalog's eagle3-<model> head)
    cost_model: str = "auto"               # auto (H100 fit on H100/H200, else roofline) | fitted | roofline | .json
    step_overhead_ms: float | None = None  # per-iteration CPU overhead; None = the cost model's own
    overhead_per_token_ms: float = 0.0     # extra time per token through the target (verify trees + prefill)
    overhead_per_draft_row_ms: float = 0.0  # extra time per drafted row (all depths)
    overhead_per_request_ms: float = 0.0   # extra time per request decoded in the step (sampling, emit, stream)
    max_running: int = 256                 # running requests per replica (decoding or prefilling)
    max_batched_tokens: int = 8192         # tokens per iteration per replica (verify trees + prefill chunks)
    max_prefill_tokens: int | None = None  # prefill tokens per iteration (SGLang's chunked_prefill_size); None = no
                                           # cap of its own: what max_batched_tokens leaves after the verify trees
    prefill_forward: str = "mixed"         # mixed: prefill chunks and verify trees in one forward (vLLM);
                                           # separate: the chunks in a forward of their own, same iteration
    block_tokens: int = 16                 # KV-cache block size
    gpu_memory_utilization: float = 0.9    # share of GPU memory for weights + KV cache
    kv_blocks: int | None = None           # override the KV capacity per replica (blocks); None = from memory
    prefix_cache: bool = True              # radix prefix cache per replica (SGLang's default); acts only on
                                           # traces with Mooncake hash_ids or prompt text


@dataclass
class SimConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    policy: dict = field(default_factory=lambda: {"policy": "echo"})  # {"policy": name, ...settings}
    acceptance: str = "qwen3-8b"           # acceptance-model preset name or path
    core: str = "auto"                     # auto | exact (the core on every live batch) | table (see speculation)
    seed: int = 0
    slo_ttft_ms: float = 2000.0            # a request counts toward goodput if it meets both SLOs
    slo_tpot_ms: float = 100.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        c = self.cluster
        for name in ("tp", "replicas", "max_running", "max_batched_tokens", "block_tokens"):
            if int(getattr(c, name)) < 1:
                raise SimError(f"{name} must be >= 1, got {getattr(c, name)}", field=name)
        if int(c.block_tokens) > MAX_BLOCK_TOKENS:
            raise SimError(f"block_tokens (--block-tokens) must be at most {MAX_BLOCK_TOKENS} (engines page the KV "
                           f"cache in blocks of 1 to a few hundred tokens), got {c.block_tokens}", field="block_tokens")
        if c.max_prefill_tokens is not None and int(c.max_prefill_tokens) < 1:
            raise SimError(f"max_prefill_tokens must be >= 1, got {c.max_prefill_tokens}", field="max_prefill_tokens")
        for name in ("step_overhead_ms", "overhead_per_token_ms", "overhead_per_draft_row_ms",
                     "overhead_per_request_ms"):
            v = getattr(c, name)
            if v is not None and not v >= 0:
                raise SimError(f"{name} must be >= 0, got {v}", field=name)
        if c.prefill_forward not in PREFILL_FORWARDS:
            raise SimError(f"unknown prefill_forward {c.prefill_forward!r}; known: {', '.join(PREFILL_FORWARDS)}",
                            field="prefill_forward")
        if c.router not in ROUTERS:
            raise SimError(f"unknown router {c.router!r}; known: {', '.join(ROUTERS)}", field="router")
        if self.core not in CORE_MODES:
            raise SimError(f"unknown core mode {self.core!r}; known: {', '.join(CORE_MODES)}", field="core")
        if not 0 <= int(self.seed) < 2**63:
            raise SimError(f"seed must be an integer >= 0, got {self.seed}", field="seed")
        if not 0.0 < c.gpu_memory_utilization <= 1.0:
            raise SimError(f"gpu_memory_utilization must be in (0, 1], got {c.gpu_memory_utilization}")


def default_draft(model_name: str) -> str | None:
    """The catalog's EAGLE-3 head for a target model, if there is one."""
    from cost_models.specs import _catalog, _norm

    name = f"eagle3-{_norm(model_name)}"
    return name if name in _catalog("models") else None


def build_cost_model(c: ClusterConfig):
    """The step-time model of one replica: the fitted H100 model on H100 and, carried by the datasheet ratios, on
    H200 (checked there: within a factor 1.17 of a measured forward where the GPU is busy, where the datasheet
    roofline is 2x fast; docs/COST_MODELS.md); the datasheet roofline elsewhere."""
    from cost_models.fitted import FittedCostModel
    from cost_models.roofline import RooflineCostModel
    from cost_models.specs import load_hardware, load_model

    model = load_model(c.model)
    hw = load_hardware(c.hardware)
    draft = c.draft or default_draft(model.name)
    kind = c.cost_model
    if kind == "auto":
        kind = "fitted" if hw.name in FIT_CARRIES_TO else "roofline"
    if kind == "roofline":
        cost = RooflineCostModel(model, hw, tp=c.tp, draft=draft)
    elif kind == "fitted":
        cost = FittedCostModel(model, hw, tp=c.tp, draft=draft, step_overhead_ms=c.step_overhead_ms)
    elif kind.endswith(".json"):
        cost = FittedCostModel(model, hw, tp=c.tp, draft=draft, params=kind, step_overhead_ms=c.step_overhead_ms)
    else:
        raise SimError(f"unknown cost model {kind!r} (auto, fitted, roofline, or a fitted .json)", field="cost_model")
    if c.step_overhead_ms is not None and kind == "roofline":
        cost.params.step_overhead_ms = float(c.step_overhead_ms)
    return cost


def kv_bytes_per_token(model) -> int:
    """K and V of every layer for one token (the whole replica; TP splits them, the total is the same)."""
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * model.dtype_bytes


def weight_bytes(model) -> int:
    return (model.weight_params() + model.hidden_size * model.vocab_size) * model.dtype_bytes  # + embedding


def kv_capacity_blocks(c: ClusterConfig, cost) -> int:
    """KV blocks per replica: GPU memory (x utilization, x TP) minus target and draft weights."""
    if c.kv_blocks is not None:
        if c.kv_blocks < 1:
            raise SimError(f"kv_blocks must be >= 1, got {c.kv_blocks}", field="kv_blocks")
        return int(c.kv_blocks)
    gb = 1e9
    budget = cost.hardware.memory_gb * gb * c.gpu_memory_utilization * c.tp
    weights = weight_bytes(cost.model) + (weight_bytes(cost.draft) if cost.draft is not None else 0)
    per_block = kv_bytes_per_token(cost.model) + (kv_bytes_per_token(cost.draft) if cost.draft is not None else 0)
    per_block *= c.block_tokens
    blocks = math.floor((budget - weights) / per_block)
    if blocks < 1:
        raise SimError(f"{cost.model.name} does not fit on {c.tp} x {cost.hardware.name}: weights need "
                        f"{weights / gb:.1f} GB of the {budget / gb:.1f} GB usable "
                        f"({c.gpu_memory_utilization:.0%} of {cost.hardware.memory_gb:g} GB x {c.tp}); "
                        "raise --tp or use a larger GPU")
    return blocks


def read_settings_file(path: str | Path, what: str = "settings file") -> dict:
    """A YAML or JSON mapping of settings (a run's --config, a sweep file), with one-line errors naming the file
    and, for a syntax error, the line. An empty file is an empty mapping."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SimError(f"cannot read the {what}: {exc.strerror or exc}", path=str(p)) from None
    except UnicodeDecodeError:
        raise SimError(f"the {what} is not UTF-8 text", path=str(p)) from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SimError(f"not valid JSON ({exc.msg})", path=str(p), line=exc.lineno) from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise SimError(f"not valid YAML ({getattr(exc, 'problem', None) or exc})", path=str(p),
                           line=mark.line + 1 if mark is not None else None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SimError(f"the {what} must be a mapping of settings", path=str(p))
    return data
