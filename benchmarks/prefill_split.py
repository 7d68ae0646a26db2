"""Where an engine step with prefill chunks spends its time, per policy: the target's forward over the chunks, the
draft's pass over them, and the rest of the prefill (first-token sampling, bookkeeping).

New prompts arrive two at a time every few steps, so prefill chunks run between decode steps as in a replay. Run it
with the engine's host-memory tuning (echo_exec/host_memory.py, the default) and without, one after the other:

    python benchmarks/prefill_split.py
    ECHO_KEEP_FREED_MEMORY=0 python benchmarks/prefill_split.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_engine import held_out_prompts

from echo_exec.engine import Engine, SamplingParams
from echo_exec.train_tiny import MODELS_DIR

POLICIES = {
    "eagle3": {"steps": 5, "topk": 8, "num_draft_tokens": 32},
    "echo": {"steps": 5, "topk": 2, "num_draft_tokens": 10, "remaining_num_draft_tokens": 4, "gates": [[3, 0.0585]],
             "budget": {"kind": "goodput", "tokens": 9}},
    "ar": None,
}


class Timer:
    """Wraps a callable and adds its wall time (ms) to `total` while `on`."""

    def __init__(self, fn):
        self.fn, self.total, self.on = fn, 0.0, False

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        out = self.fn(*a, **k)
        if self.on:
            self.total += (time.perf_counter() - t0) * 1e3
        return out


def measure(name: str, config: dict | None, prompts: list[list[int]], every: int, max_prefill: int) -> dict:
    eng = Engine(MODELS_DIR / "tiny-target", None if name == "ar" else MODELS_DIR / "tiny-draft", policy=name,
                 policy_config=config, max_running=16, num_kv_blocks=2048, max_prefill_tokens=max_prefill,
                 log_iterations=True)
    eng.generate(prompts[:1], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    eng.iterations.clear()
    prefill = Timer(eng._prefill)
    target = Timer(eng.target.forward_packed)
    drafter = Timer(eng.drafter.prefill) if eng.drafter is not None else None
    eng._prefill, eng.target.forward_packed = prefill, target
    if drafter is not None:
        eng.drafter.prefill = drafter

    def step():  # time the target's forward and the draft's pass only inside _prefill
        prefill_fn = prefill.fn

        def inside():
            target.on = True
            if drafter is not None:
                drafter.on = True
            try:
                return prefill_fn()
            finally:
                target.on = False
                if drafter is not None:
                    drafter.on = False

        prefill.fn = inside
        try:
            eng.step()
        finally:
            prefill.fn = prefill_fn

    prefill.on = True
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    for i in range(0, len(prompts), 2):
        for p in prompts[i:i + 2]:
            eng.add_request(p, params)
        for _ in range(every):
            step()
    while eng.has_unfinished():
        step()
    steps = [it for it in eng.iterations if it.prefill_chunks]
    n = max(len(steps), 1)
    return dict(steps=len(steps), prefill_ms=prefill.total / n, target_ms=target.total / n,
                draft_ms=(drafter.total / n) if drafter else 0.0,
                chunk_tokens=float(np.mean([sum(c for c, _ in it.prefill_chunks) for it in steps])) if steps else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--every", type=int, default=6, help="steps between arrivals of two new prompts")
    ap.add_argument("--max-prefill-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prompts = held_out_prompts(args.prompts, 256, 64, args.seed)
    print("| policy | steps with prefill | prefill ms | target forward over the chunks ms | draft pass ms | "
          "chunk tokens |")
    print("|---|---|---|---|---|---|")
    for name, config in POLICIES.items():
        r = measure(name, config, prompts, args.every, args.max_prefill_tokens)
        print(f"| {name} | {r['steps']} | {r['prefill_ms']:.1f} | {r['target_ms']:.1f} | {r['draft_ms']:.1f} | "
              f"{r['chunk_tokens']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
