"""The engine at batch 1 with the shipped EAGLE-3 head (tiny-eagle3, reads the target's hidden states) against the
shipped standalone draft (tiny-draft) and plain decoding, side by side in one run.

Engines (all loaded first; run interleaved prompt by prompt, so a noisy shared machine slows them alike):
- ar: plain decoding;
- eagle3/draft and eagle3/head: the eagle3 policy, the same static tree (--eagle3, default steps 4, topk 4, N 16),
  drafted by tiny-draft or by the head;
- echo/head: the echo policy over the head (--echo, a static ECHO: 5 x 2 beam, N 10, gated requests 4, gate at
  depth 3, tau 0.3).
Prompts: held-out stdlib code (echo_exec/train_tiny.split_files), --prompt-len bytes from a third into each file;
greedy, --gen-len tokens; the script checks every engine emits ar's tokens. Reports tokens/s, MAT (tokens per
verify step) and the speedup over ar.

    python benchmarks/bench_eagle3_head.py [--prompts 12] [--prompt-len 192] [--gen-len 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from echo_exec.engine import Engine, SamplingParams
from echo_exec.train_tiny import MODELS_DIR, split_files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=192)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eagle3", type=json.loads, default=dict(steps=4, topk=4, num_draft_tokens=16))
    ap.add_argument("--echo", type=json.loads, default=dict(steps=5, topk=2, num_draft_tokens=10,
                                                            remaining_num_draft_tokens=4, gates=[[3, 0.3]]))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, held = split_files()
    files = [f for f in held if f.stat().st_size > 3 * args.prompt_len][:args.prompts]
    prompts = []
    for f in files:
        data = f.read_bytes()
        at = len(data) // 3
        prompts.append(list(data[at:at + args.prompt_len]))
    target, draft, head = MODELS_DIR / "tiny-target", MODELS_DIR / "tiny-draft", MODELS_DIR / "tiny-eagle3"
    engines = {
        "ar": lambda: Engine(target, None, policy="ar", max_running=1),
        "eagle3/draft": lambda: Engine(target, draft, policy="eagle3", policy_config=args.eagle3, max_running=1),
        "eagle3/head": lambda: Engine(target, head, policy="eagle3", policy_config=args.eagle3, max_running=1),
        "echo/head": lambda: Engine(target, head, policy="echo", policy_config=args.echo, max_running=1),
    }
    engines = {name: make() for name, make in engines.items()}
    params = SamplingParams(max_new_tokens=args.gen_len)
    secs = dict.fromkeys(engines, 0.0)
    toks = dict.fromkeys(engines, 0)
    outs: dict[str, list] = {name: [] for name in engines}
    for p in prompts:
        for name, eng in engines.items():
            t0 = time.perf_counter()
            out = eng.generate([p], params)[0].output_ids
            secs[name] += time.perf_counter() - t0
            toks[name] += len(out)
            outs[name].append(out)
    for name in engines:
        if outs[name] != outs["ar"]:
            raise SystemExit(f"{name} emitted other tokens than ar")
    print(f"{len(prompts)} prompts x {args.gen_len} tokens, batch 1, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}; every engine emitted ar's tokens")
    print("| engine | tokens/s | MAT | vs ar |")
    print("|---|---|---|---|")
    base = toks["ar"] / secs["ar"]
    for name, eng in engines.items():
        rate = toks[name] / secs[name]
        mat = eng.stats()["avg_accept_length"]
        print(f"| {name} | {rate:.1f} | {mat:.2f} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    np.seterr(all="raise")
    raise SystemExit(main())
