"""The target's packed forward on a ragged batch of trees (ECHO's: 1 to 24 tokens a request), one padded
attention call against the grouped calls (`echo_exec.model.ragged_groups`), interleaved, same inputs; a uniform
batch of the same total tokens beside them. Median ms of --repeats calls each.

    python benchmarks/bench_ragged_attention.py [--batches 8,16,32,48] [--context 300] [--repeats 15]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from echo_exec.loader import load_model  # noqa: E402
from echo_exec.model import KVCache, make_attn_meta  # noqa: E402
from echo_exec.train_tiny import MODELS_DIR  # noqa: E402


def tree_sizes(B: int, rng: np.random.Generator) -> list[int]:
    """Tree sizes as an adaptive budget leaves them: most requests a few tokens, a few near the 24-token cap."""
    return np.minimum(1 + rng.geometric(0.3, B), 24).tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODELS_DIR / "tiny-target")
    ap.add_argument("--batches", default="8,16,32,48")
    ap.add_argument("--context", type=int, default=300, help="cached tokens per request")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = load_model(args.model)
    rng = np.random.default_rng(args.seed)
    print("| batch | tokens | longest tree | groups | padded ms | grouped ms | grouped / padded | uniform ms |")
    print("|---|---|---|---|---|---|---|---|")
    for B in (int(b) for b in args.batches.split(",")):
        sizes = tree_sizes(B, rng)
        T = sum(sizes)
        uniform = [T // B + (1 if i < T % B else 0) for i in range(B)]
        metas, inputs = {}, {}
        for name, sz in (("ragged", sizes), ("uniform", uniform)):
            ctx, new, pos, at = [], [], [], 0
            for n in sz:
                ctx.append(np.arange(at, at + args.context))
                new.append(np.arange(at + args.context, at + args.context + n))
                pos.append(args.context + np.arange(n))
                at += args.context + n
            metas[name] = make_attn_meta(ctx, new, None)
            inputs[name] = (torch.randint(0, 256, (sum(sz),)), torch.as_tensor(np.concatenate(pos)), at)
        metas["padded"] = dataclasses.replace(metas["ragged"], groups=None)
        inputs["padded"] = inputs["ragged"]
        cache = KVCache(m.cfg, inputs["ragged"][2] // 16 + 2 + inputs["uniform"][2] // 16, 16)
        times: dict[str, list[float]] = {k: [] for k in ("padded", "ragged", "uniform")}
        with torch.no_grad():
            for r in range(args.repeats + 1):
                for k in (("padded", "ragged", "uniform") if r % 2 else ("uniform", "ragged", "padded")):
                    tok, p, _ = inputs[k]
                    t0 = time.perf_counter()
                    m.forward_packed(tok, p, metas[k], cache)
                    if r:   # the first round warms up
                        times[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: float(np.median(v)) for k, v in times.items()}
        print(f"| {B} | {T} | {max(sizes)} | {len(metas['ragged'].groups or ())} | {med['padded']:.1f} | "
              f"{med['ragged']:.1f} | {med['ragged'] / med['padded']:.2f} | {med['uniform']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
