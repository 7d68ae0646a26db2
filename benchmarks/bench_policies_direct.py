"""The engine called directly (no HTTP): policies side by side on the same prompts, batch by batch, interleaved
(the order alternates), greedy. Each policy gets the settings `echosim serve` would give it from the draft
directory (policy-<name>.json), unless --configs says otherwise. Prints tokens/s, the ratio to the first policy,
MAT, verified tokens per step, and whether the outputs equal the first policy's.

    python benchmarks/bench_policies_direct.py --set spec_bench --prompts 128 --batch 64 [--gen-len 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import held_out_prompts  # noqa: E402
from benchmarks.bench_serve import spec_bench_prompts  # noqa: E402
from echo_exec.engine import Engine, SamplingParams  # noqa: E402
from echo_exec.replay import SPEC_BENCH_PROMPTS  # noqa: E402
from echo_exec.tokenizer import ByteTokenizer  # noqa: E402
from echo_exec.train_tiny import MODELS_DIR  # noqa: E402
from echosim.commands.serve import policy_settings  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=MODELS_DIR / "tiny-target")
    ap.add_argument("--draft", type=Path, default=MODELS_DIR / "tiny-draft")
    ap.add_argument("--policies", default="ar,eagle3,echo")
    ap.add_argument("--configs", type=json.loads, default={}, help='{"name": {settings}} to override')
    ap.add_argument("--set", choices=["spec_bench", "stdlib"], default="spec_bench")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.set == "spec_bench":
        tok = ByteTokenizer()
        prompts = [tok.encode(p["text"]) for p in spec_bench_prompts(SPEC_BENCH_PROMPTS, args.prompts, 1024, args.seed)]
    else:
        prompts = held_out_prompts(args.prompts, 192, args.gen_len, args.seed)
    engines = {}
    for name in args.policies.split(","):
        _, cfg, _ = policy_settings(None, name, str(args.draft))
        cfg = args.configs.get(name, cfg)
        engines[name] = Engine(args.target, None if name == "ar" else args.draft, policy=name, policy_config=cfg,
                               max_running=max(args.batch, 1))
    params = SamplingParams(max_new_tokens=args.gen_len)
    for e in engines.values():
        e.generate(prompts[:1], SamplingParams(max_new_tokens=8))
    names = list(engines)
    wall = {n: 0.0 for n in names}
    tokens = {n: 0 for n in names}
    outs: dict = {n: [] for n in names}
    for r, i in enumerate(range(0, len(prompts), args.batch)):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            o = engines[n].generate(prompts[i:i + args.batch], params)
            wall[n] += time.perf_counter() - t0
            tokens[n] += sum(len(x.output_ids) for x in o)
            outs[n] += [x.output_ids for x in o]
    base = tokens[names[0]] / wall[names[0]]
    for n in names:
        st = engines[n].stats()
        tps = tokens[n] / wall[n]
        print(f"{n}: {tps:.1f} tok/s ({tps / base:.3f}x {names[0]}), MAT {st['avg_accept_length']:.2f}, "
              f"verified tokens/step {st['verify_tokens'] / max(st['decode_steps'], 1):.1f}, "
              f"outputs equal {names[0]}'s: {outs[n] == outs[names[0]]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
