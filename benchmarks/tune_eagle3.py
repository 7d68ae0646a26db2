"""Tune the static EAGLE-3 tree for a model pair: the fastest of a few (steps, topk, num_draft_tokens) shapes at
batch 1 on calibration prompts, written as the draft directory's policy-eagle3.json (which `echosim serve --policy
eagle3` takes by default, as it takes policy-echo.json for echo).

Calibration prompts: held-out stdlib code (echo_exec/train_tiny.split_files, as benchmarks/bench_engine.py picks
it) with seed --seed (the benchmarks use seed 0; the default here is 1, other offsets in other files), never
Spec-Bench, HumanEval or GSM8K. Every candidate runs every prompt, interleaved prompt by prompt with a rotating
order, greedy; the candidate with the most output tokens per second wins.

    python benchmarks/tune_eagle3.py [--prompts 8] [--gen-len 64] [--threads 1] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import held_out_prompts  # noqa: E402
from echo_exec.engine import Engine, SamplingParams  # noqa: E402
from echo_exec.train_tiny import MODELS_DIR  # noqa: E402

CANDIDATES = [  # (steps, topk, num_draft_tokens): SGLang's knobs
    (5, 8, 32), (4, 4, 16), (5, 4, 24), (3, 4, 8), (5, 2, 10), (6, 2, 12), (4, 1, 5),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=MODELS_DIR / "tiny-target")
    ap.add_argument("--draft", type=Path, default=MODELS_DIR / "tiny-draft")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=192)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write DRAFT/policy-eagle3.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = held_out_prompts(args.prompts, args.prompt_len, args.gen_len, args.seed)
    engines = {c: Engine(args.target, args.draft, policy="eagle3",
                         policy_config=dict(steps=c[0], topk=c[1], num_draft_tokens=c[2]), max_running=1)
               for c in CANDIDATES}
    for e in engines.values():
        e.generate(prompts[:1], SamplingParams(max_new_tokens=8))
    wall = {c: 0.0 for c in CANDIDATES}
    tokens = {c: 0 for c in CANDIDATES}
    for i, p in enumerate(prompts):
        order = CANDIDATES[i % len(CANDIDATES):] + CANDIDATES[:i % len(CANDIDATES)]
        for c in order:
            t0 = time.perf_counter()
            out = engines[c].generate([p], SamplingParams(max_new_tokens=args.gen_len))
            wall[c] += time.perf_counter() - t0
            tokens[c] += len(out[0].output_ids)
    tps = {c: tokens[c] / wall[c] for c in CANDIDATES}
    best = max(CANDIDATES, key=lambda c: tps[c])
    for c in CANDIDATES:
        mat = engines[c].stats()["avg_accept_length"]
        print(f"steps {c[0]} topk {c[1]} num_draft_tokens {c[2]}: {tps[c]:.1f} tokens/s, MAT {mat:.2f}"
              + ("  <- fastest" if c == best else ""))
    if args.write:
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        cfg = {"policy": "eagle3", "steps": best[0], "topk": best[1], "num_draft_tokens": best[2],
               "calibration": f"benchmarks/tune_eagle3.py --prompts {args.prompts} --gen-len {args.gen_len} "
                              f"--threads {args.threads} --seed {args.seed} on {when}: the fastest of "
                              f"{len(CANDIDATES)} tree shapes at batch 1 on held-out stdlib prompts "
                              f"({tps[best]:.1f} tokens/s)"}
        path = args.draft / "policy-eagle3.json"
        path.write_text(json.dumps(cfg, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
