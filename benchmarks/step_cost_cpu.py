"""What one decode step costs the engine in CPU time (this thread's: a loaded machine inflates it far less than
wall time), at one batch size, on the same requests: a plain step, a tree step verifying K depth-1 drafts per
request (K = 1, 2, 4: what the adaptive budget chooses between), one draft depth, and the bare causal target
forward of 1 and 2 tokens per request that the start-up profile (the budget's cost prior) times. Medians of
interleaved repeats.

    python benchmarks/step_cost_cpu.py --batch 32 [--repeats 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import held_out_prompts  # noqa: E402
from echo_exec.engine import Engine, SamplingParams  # noqa: E402
from echo_exec.train_tiny import MODELS_DIR  # noqa: E402
from echosim.spec.drafting import draft  # noqa: E402
from echosim.spec.pack import pack  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    B = args.batch
    eng = Engine(MODELS_DIR / "tiny-target", MODELS_DIR / "tiny-draft", policy="eagle3",
                 policy_config={"steps": 1, "topk": 4, "num_draft_tokens": 5}, max_running=B)
    for p in held_out_prompts(B, 192, 64, args.seed):
        eng.add_request(p, SamplingParams(max_new_tokens=64))
    while not (len(eng.running) == B and all(r.output for r in eng.running)):
        eng.step()
    eng.step()  # every request decoding, draft and target caches in step
    ready = list(eng.running)
    rows = np.array([r.row for r in ready])
    kv = np.array([r.kv_len for r in ready], np.int64)
    roots = np.array([r.tokens[-1] for r in ready], np.int64)
    temps = np.zeros(B)
    eng.blocks.grow(rows, kv + 40)

    def forest():
        eng.drafter.begin_step(rows, kv, [r.tokens for r in ready])
        eng.drafter.kv_len[rows] = kv  # only the root is new to the draft cache, as in a steady state
        return draft(eng.drafter, eng.policy, roots, kv)

    res: dict = {}
    with torch.inference_mode():
        f = forest()
        S = f.num_slots
        for _ in range(args.repeats):
            for name in ("plain step", "tree step, 1 draft/request", "tree step, 2 drafts/request",
                         "tree step, 4 drafts/request", "one draft depth", "causal forward, 1 token/request",
                         "causal forward, 2 tokens/request"):
                c0 = time.thread_time()
                if name == "plain step":
                    eng._plain_step(ready, rows, kv, roots, temps)
                elif name.startswith("tree"):
                    K = int(name.split(", ")[1][0])
                    sel = (np.arange(B)[:, None] * S + np.arange(K)[None, :]).ravel()
                    eng._tree_step(ready, rows, kv, pack(f, sel), temps)
                elif name == "one draft depth":
                    forest()
                else:
                    eng._time_verify_ms(rows, int(kv.min()) - 4, int(name.split(", ")[1][0]), 0)
                res.setdefault(name, []).append((time.thread_time() - c0) * 1e3)
    print(f"batch {B}, contexts {int(kv.min())}-{int(kv.max())} tokens, CPU ms (median of {args.repeats}):")
    for k, v in res.items():
        print(f"  {k}: {np.median(v):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
