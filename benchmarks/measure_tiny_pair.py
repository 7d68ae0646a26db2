"""How well the shipped tiny draft predicts the shipped tiny target, at batch 1 with greedy decoding.

For each held-out stdlib file (see echo_exec/train_tiny.split_files) a prompt of --prompt-len bytes is
taken at a seeded offset and the target decodes --gen-len bytes greedily (through the KV-cache path). Then:
- agreement (generated): fraction of generated positions where the draft's argmax, given the same prefix,
  equals the target's token; agreement (held-out text): the same against the target's argmax on the real file
  bytes (teacher forcing, no generation);
- MAT (mean accepted tokens per verify, the bonus token included) of greedy speculation that walks the
  target's greedy output: for each tree shape (topk, steps, num_draft_tokens), the draft builds an
  EAGLE-style tree at every step (expand the top-`topk` frontier nodes by path probability, `topk` children
  each, for `steps` levels, then keep the best num_draft_tokens - 1 nodes by path probability), the longest
  tree path matching the target's output is accepted, plus one bonus token. A chain of k is topk 1, steps k.

    python benchmarks/measure_tiny_pair.py [--target DIR] [--draft DIR] [--prompts 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from echo_exec.loader import load_model
from echo_exec.model import KVCache, Transformer, make_attn_meta
from echo_exec.tokenizer import BOS_ID, EOS_ID
from echo_exec.train_tiny import MODELS_DIR, split_files


def prefill(model: Transformer, cache: KVCache, seq: np.ndarray) -> torch.Tensor:
    """Logits [len(seq), V] of the whole sequence; its K/V lands in slots 0..len-1."""
    attn = make_attn_meta([np.zeros(0, np.int64)], [np.arange(len(seq))])
    with torch.no_grad():
        return model.forward_packed(torch.as_tensor(seq), torch.arange(len(seq)), attn, cache)


def greedy_generate(model: Transformer, prompt: np.ndarray, n: int) -> np.ndarray:
    cache = KVCache(model.cfg, num_blocks=(len(prompt) + n) // 16 + 2, block_size=16)
    tok = int(prefill(model, cache, prompt)[-1].argmax())
    out = [tok]
    p = len(prompt)
    while len(out) < n and tok != EOS_ID:
        attn = make_attn_meta([np.arange(p)], [np.array([p])])
        with torch.no_grad():
            logits = model.forward_packed(torch.tensor([tok]), torch.tensor([p]), attn, cache)
        tok = int(logits[0].argmax())
        out.append(tok)
        p += 1
    return np.array(out, dtype=np.int64)


def build_tree(draft: Transformer, cache: KVCache, p: int, root_logp: torch.Tensor, topk: int, steps: int,
               n_nodes: int, scratch: int) -> tuple[list[int], list[int]]:
    """EAGLE-style draft tree after prefix [0, p) (its K/V in draft slots 0..p-1). Returns (tokens, parents)
    of the kept nodes, parents indexing the same lists (-1 = child of the root), in topological order."""
    toks, parents, scores = [], [], []  # all candidate nodes
    lp, idx = root_logp.topk(topk)
    beam = []
    for s, t in zip(lp.tolist(), idx.tolist(), strict=True):
        toks.append(t), parents.append(-1), scores.append(s)
        beam.append(len(toks) - 1)
    depth_path = {i: [i] for i in beam}  # node -> path of node ids from depth 1
    for _ in range(steps - 1):
        # Each beam node is its own "request": context = prefix + its ancestors' scratch slots.
        ctx = [np.concatenate([np.arange(p), scratch + np.array(depth_path[i][:-1], dtype=np.int64)])
               for i in beam]
        new = [np.array([scratch + i]) for i in beam]
        attn = make_attn_meta(ctx, new)
        pos = torch.tensor([p + len(depth_path[i]) - 1 for i in beam])
        with torch.no_grad():
            logp = torch.log_softmax(draft.forward_packed(torch.tensor([toks[i] for i in beam]), pos, attn,
                                                          cache), -1)
        cand = (torch.tensor([scores[i] for i in beam])[:, None] + logp).topk(topk, dim=-1)
        flat_s, flat_i = cand.values.flatten(), cand.indices.flatten()
        rows = torch.arange(len(beam)).repeat_interleave(topk)
        first = len(toks)
        for s, t, r in zip(flat_s.tolist(), flat_i.tolist(), rows.tolist(), strict=True):
            toks.append(t), parents.append(beam[r]), scores.append(s)
            depth_path[len(toks) - 1] = depth_path[beam[r]] + [len(toks) - 1]
        order = flat_s.topk(topk).indices.tolist()
        beam = [first + j for j in order]
    keep = sorted(np.argsort(-np.array(scores), kind="stable")[:n_nodes - 1].tolist())
    remap = {old: new for new, old in enumerate(keep)}
    # A kept child always has its parent kept (a parent's path log-prob is >= its child's).
    return [toks[i] for i in keep], [remap.get(parents[i], -1) if parents[i] >= 0 else -1 for i in keep]


def accepted_length(tokens: list[int], parents: list[int], target_next: np.ndarray) -> int:
    """Longest tree path that matches the target's greedy continuation."""
    node, n = -1, 0
    while n < len(target_next):
        child = next((i for i, (t, par) in enumerate(zip(tokens, parents, strict=True))
                      if par == node and t == target_next[n]), None)
        if child is None:
            break
        node, n = child, n + 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=MODELS_DIR / "tiny-target")
    ap.add_argument("--draft", type=Path, default=MODELS_DIR / "tiny-draft")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=192)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target, draft = load_model(args.target), load_model(args.draft)
    _, held = split_files()
    rng = np.random.default_rng(args.seed)
    shapes = {"chain k=4": (1, 4, 5), "eagle topk4 steps4 N16": (4, 4, 16)}
    acc = {k: [] for k in shapes}
    agree_gen, agree_text = [], []
    t0 = time.time()
    files = [f for f in held if f.stat().st_size > args.prompt_len + args.gen_len + 64]
    for f in [files[i] for i in rng.permutation(len(files))[:args.prompts]]:
        data = np.frombuffer(f.read_bytes(), dtype=np.uint8).astype(np.int64)
        start = int(rng.integers(0, len(data) - args.prompt_len - args.gen_len))
        prompt = np.concatenate([[BOS_ID], data[start:start + args.prompt_len]]) if start == 0 \
            else data[start:start + args.prompt_len]
        # Teacher-forced agreement on the real file bytes.
        real = data[start:start + args.prompt_len + args.gen_len]
        with torch.no_grad():
            ta, da = target(torch.as_tensor(real)[None])[0].argmax(-1), draft(torch.as_tensor(real)[None])[0]
        agree_text.append((ta == da.argmax(-1))[args.prompt_len - 1:].float().mean().item())
        gen = greedy_generate(target, prompt, args.gen_len)
        seq = np.concatenate([prompt, gen])
        scratch = len(seq) + 16
        dcache = KVCache(draft.cfg, num_blocks=(scratch + 64) // 16 + 1, block_size=16)
        dlogp = torch.log_softmax(prefill(draft, dcache, seq), -1)
        P = len(prompt)
        agree_gen.append(float((dlogp[P - 1:len(seq) - 1].argmax(-1).numpy() == gen).mean()))
        for name, (topk, steps, n) in shapes.items():
            p = P
            while p < len(seq):
                toks, parents = build_tree(draft, dcache, p, dlogp[p - 1], topk, steps, n, scratch)
                a = accepted_length(toks, parents, seq[p:])
                acc[name].append(a + 1)
                p += a + 1
    print(f"target {args.target}  draft {args.draft}")
    print(f"{args.prompts} held-out prompts x {args.gen_len} greedy bytes (prompt {args.prompt_len} bytes), "
          f"{time.time() - t0:.0f} s")
    print(f"draft argmax == target token on the target's greedy output: {np.mean(agree_gen):.3f}")
    print(f"draft argmax == target argmax on held-out file text (teacher forcing): {np.mean(agree_text):.3f}")
    for name, a in acc.items():
        print(f"MAT {name}: {np.mean(a):.3f}  ({len(a)} verify steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
