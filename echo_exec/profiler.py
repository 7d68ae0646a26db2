"""Time the real forward of a model shape (random weights) over a grid of batch sizes, verify tokens per sequence
and KV lengths, as rows of our profile CSV (cost_models.profiles.PROFILE_COLUMNS, written by
cost_models.profiles.write_profile), which `echosim fit` reads. Timing a forward is execution, so it lives here;
the profile format and the fit are cost models.

The timing harness (`time_forward`) takes any zero-argument callable: warm-up calls, then repeated timed calls,
with CUDA events on a GPU and perf_counter on the CPU. `profile_model` builds echo_exec's Transformer for the
shape and times `forward_packed` over a paged KV cache: each sequence verifies a chain of `t` new tokens (causal
mask among them) after `kv` cached tokens, every row through the LM head, as one packed batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cost_models.specs import ModelSpec
from echo_exec.errors import ExecError
from echo_exec.host_memory import keep_freed_memory
from echo_exec.model import KVCache, ModelConfig, Transformer, make_attn_meta

CPU_GRID = dict(batch_sizes=(1, 2, 4, 8), tokens_per_seq=(1, 2, 4, 8, 16, 32), kv_lens=(0, 128, 512))
GPU_GRID = dict(batch_sizes=(1, 4, 16, 64), tokens_per_seq=(1, 2, 4, 8, 16, 32),
                kv_lens=(0, 1024, 4096, 8192))


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    samples_ms: tuple = ()

    @classmethod
    def of(cls, samples_ms) -> Timing:
        a = np.asarray(samples_ms, dtype=np.float64)
        return cls(float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90)), len(a),
                   tuple(a.tolist()))


def time_forward(fn, *, warmup: int = 2, repeats: int = 5, device: str = "cpu",
                 cuda_graph: bool = False) -> Timing:
    """Warm up, then time `repeats` calls of fn() (CUDA events on a GPU: the GPU's time from the first kernel's
    start to the last one's end, so launch gaps count). With cuda_graph, fn is captured once into a CUDA graph and
    its replays are timed: the kernels back to back, as a serving engine's graph-captured step runs them, without
    Python's per-kernel launch cost (which made a 1-token forward of 8 Qwen3-8B layers on the H200 take 6 ms
    eager against the 1 ms its weight reads need)."""
    import torch

    cuda = device.startswith("cuda")
    if cuda and cuda_graph:
        side = torch.cuda.Stream()  # capture wants the warm-up (allocator, cuBLAS handles) off the default stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(times)  # the graph and its private memory pool go with this frame, before the next capture


def timing_method(device: str, cuda_graph: bool) -> str:
    """The profile CSV's `timing` value: how time_ms was measured."""
    if not device.startswith("cuda"):
        return "wall"
    return "cuda_graph" if cuda_graph else "cuda_events"


def build_model(spec: ModelSpec, device: str, dtype: str, num_layers: int | None = None, seed: int = 0):
    """echo_exec's Transformer of this shape with random weights (MoE is not built by echo_exec)."""
    import torch


    if spec.is_moe:
        raise ExecError(f"{spec.name} is a mixture of experts; the profiler builds dense Llama/Qwen models only")
    cfg = ModelConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                      n_layers=num_layers or spec.num_layers, n_heads=spec.num_heads, n_kv_heads=spec.num_kv_heads,
                      intermediate_size=spec.intermediate_size, head_dim=spec.head_dim,
                      max_position_embeddings=1 << 20)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg)
    model = model.to(dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():  # random matrices of a sane scale (timing only); norm weights stay 1
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02)
    return model, cfg


def profile_model(spec: ModelSpec, *, device: str = "cpu", dtype: str = "float32", batch_sizes=(1,),
                  tokens_per_seq=(1,), kv_lens=(0,), warmup: int = 2, repeats: int = 5, rounds: int = 1,
                  num_layers: int | None = None, block_size: int = 16, cuda_graph: bool = False,
                  progress=None) -> list[dict]:
    """One row per (batch, tokens per sequence, KV length): the median time of one packed forward. With
    rounds > 1 the whole grid is timed `rounds` times over (repeats calls per point each time) and each point
    keeps the median of all its calls: a slow spell of a shared machine then hits every point a little instead of
    a few points a lot. cuda_graph: time CUDA-graph replays of each point (see time_forward)."""
    import torch


    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExecError("--device cuda: no CUDA device is available here")

    keep_freed_memory()  # the host allocator as the engine runs it, so profile and engine agree
    if rounds < 1 or repeats < 1:
        raise ExecError("rounds and repeats must be >= 1")
    model, cfg = build_model(spec, device, dtype, num_layers)
    max_slots = max(batch_sizes) * (max(kv_lens) + max(tokens_per_seq))
    cache = KVCache(cfg, num_blocks=-(-max_slots // block_size), block_size=block_size,
                    dtype=getattr(torch, dtype), device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    points = []
    for b in batch_sizes:
        for t in tokens_per_seq:
            for kv in kv_lens:
                per = kv + t
                ctx = [np.arange(i * per, i * per + kv) for i in range(b)]
                new = [np.arange(i * per + kv, (i + 1) * per) for i in range(b)]
                meta = make_attn_meta(ctx, new, None, device=device)
                tokens = torch.randint(0, spec.vocab_size, (b * t,), generator=gen).to(device)
                positions = torch.tensor(np.concatenate([np.arange(kv, kv + t)] * b), device=device)

                def fwd(tokens=tokens, positions=positions, meta=meta):
                    with torch.inference_mode():
                        model.forward_packed(tokens, positions, meta, cache)

                points.append(((b, t, kv), fwd, []))
    if device.startswith("cuda"):  # one pass over the grid first: cuBLAS picks and caches its kernels per shape
        for _, fwd, _ in points:
            fwd()
    rows = []
    timing = timing_method(device, cuda_graph)
    for r in range(rounds):
        for (b, t, kv), fwd, samples in points:
            samples.extend(time_forward(fwd, warmup=warmup if r == 0 else 1, repeats=repeats,
                                        device=device, cuda_graph=cuda_graph).samples_ms)
            if r < rounds - 1:
                continue
            tm = Timing.of(samples)
            rows.append(dict(model=spec.name, device=device, dtype=dtype, batch_size=b, tokens_per_seq=t,
                             kv_len=kv, num_tokens=b * t, time_ms=round(tm.median_ms, 6),
                             time_ms_p10=round(tm.p10_ms, 6), time_ms_p90=round(tm.p90_ms, 6),
                             repeats=tm.repeats, hidden_size=cfg.hidden_size, num_layers=cfg.n_layers,
                             num_heads=cfg.n_heads, num_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                             intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, timing=timing))
            if progress:
                progress(rows[-1])
    return rows
