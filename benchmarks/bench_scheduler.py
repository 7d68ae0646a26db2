"""Scheduler-core cost per step: gate + select + pack, for every policy, at batch 1, 16, 64, 256.

Setting of issue 2: topk 8, depth 8 (up to 8 + 7*64 = 456 candidates per request), K_max = 4 x batch.
Drafts come from a seeded random drafter (its own time is excluded: in a real system it is the draft model's).
Pack runs with check=False, as the simulator runs it on a policy's own selection (validation is for other input).
Also times a plain per-request Python-loop version of echo (select + pack) in the same run, for the speedup.

    python benchmarks/bench_scheduler.py [--repeats 30] [--batches 1,16,64,256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from echosim.spec.drafters import RandomDrafter
from echosim.spec.drafting import draft
from echosim.spec.pack import pack
from echosim.spec.policies import make_policy


def configs(B: int) -> dict[str, dict]:
    K = 4 * B
    gates = [[3, 0.1], [6, 0.02]]
    echo = dict(steps=8, topk=8, num_draft_tokens=33, remaining_num_draft_tokens=9, gates=gates,
                budget={"kind": "fixed", "tokens": K})
    return {
        "ar": {},
        "eagle3": dict(steps=8, topk=8, num_draft_tokens=5),
        "eagle2": dict(total_tokens=4, depth=8, top_k=8),
        "ddd": dict(steps=8, topk=8, num_draft_tokens=5, theta=-2.0, check_depths=(2, 4, 6)),
        "opt_tree": dict(num_nodes=4, topk=8, max_depth=8, delta=0.01),
        "tetris": dict(steps=8, topk=8, budget={"kind": "fixed", "tokens": K}),
        "smartspec": dict(max_k=8),
        "echo": echo,
        "echo_dense": echo,
        "echo_fixed": echo,
    }


class TimedPolicy:
    """Wraps a policy's gate so the drafting loop's gate calls are timed."""

    def __init__(self, policy):
        self.policy, self.gate_s = policy, 0.0

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def gate(self, *args):
        t = time.perf_counter()
        out = self.policy.gate(*args)
        self.gate_s += time.perf_counter() - t
        return out


def echo_select_loop(forest, policy) -> list[int]:
    """ECHO's selection with plain Python per request: same floor / Priority 1 / Priority 2 rules."""
    c = policy.config
    B, S = forest.token.shape
    K = c.budget.upper_bound(B)
    chosen: list[int] = []
    per_req = []
    for i in range(B):
        nodes = sorted((s for s in range(S) if forest.valid[i, s]), key=lambda s: -forest.score[i, s])
        truncated = 0 < forest.stop_depth[i] < forest.max_depth
        cap = (c.remaining_num_draft_tokens if truncated else c.num_draft_tokens) - 1
        per_req.append((truncated, nodes[:cap]))
    for i, (_, nodes) in enumerate(per_req):
        chosen += [i * S + s for s in nodes[: c.floor_tokens]]
    for tier in (False, True):
        pool = [(-forest.score[i, s], i * S + s) for i, (tr, nodes) in enumerate(per_req) if tr == tier
                for s in nodes[c.floor_tokens:]]
        pool.sort()
        room = K - len(chosen)
        chosen += [flat for _, flat in pool[: max(room, 0)]]
    return sorted(chosen)


def pack_loop(forest, selection) -> dict:
    """Flatten & Pack with plain Python per request and per node."""
    B, S = forest.token.shape
    out = {"tokens": [], "positions": [], "next_token": [], "next_sibling": [], "mask": []}
    by_req: list[list[int]] = [[] for _ in range(B)]
    for flat in selection:
        by_req[flat // S].append(flat % S)
    for i in range(B):
        slots = by_req[i]
        local = {s: j + 1 for j, s in enumerate(slots)}
        n = len(slots) + 1
        parent = [-1] + [local.get(int(forest.parent[i, s]), 0) for s in slots]
        out["tokens"] += [int(forest.root_token[i])] + [int(forest.token[i, s]) for s in slots]
        out["positions"] += [int(forest.kv_len[i])] + [int(forest.kv_len[i] + forest.slot_depth[s]) for s in slots]
        nt, ns = [-1] * n, [-1] * n
        last_child = {}
        for j in range(1, n):
            p = parent[j]
            if nt[p] == -1:
                nt[p] = j
            else:
                ns[last_child[p]] = j
            last_child[p] = j
        out["next_token"] += nt
        out["next_sibling"] += ns
        for j in range(n):
            row = [False] * n
            k = j
            while k >= 0:
                row[k] = True
                k = parent[k]
            out["mask"] += row
    return out


def median_us(samples: list[float]) -> float:
    return float(np.median(samples) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batches", default="1,16,64,256")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{'batch':>5} {'policy':>10} {'cands/req':>9} {'verified':>8} {'gate us':>8} {'select us':>9} "
          f"{'pack us':>8} {'total us':>8} {'x eagle3':>8}")
    for B in batches:
        # Round robin over the policies, one step each per repeat: this machine's speed drifts over seconds,
        # and interleaving lets every policy see the same drift, so the ratios hold even when the totals move.
        timings: dict[str, list[tuple[float, float, float]]] = {name: [] for name in configs(B)}
        last = {}
        for r in range(args.repeats):
            for name, cfg in configs(B).items():
                policy = TimedPolicy(make_policy(name, cfg))
                forest = draft(RandomDrafter(vocab_size=32000, concentration=0.3, seed=r), policy,
                               np.zeros(B, np.int64), np.full(B, 512))
                t0 = time.perf_counter()
                sel = policy.select(forest)
                t1 = time.perf_counter()
                batch = pack(forest, sel, check=False)
                t2 = time.perf_counter()
                timings[name].append((policy.gate_s, t1 - t0, t2 - t1))
                last[name] = (forest, batch)
        rows = {}
        for name, samples in timings.items():
            gate_s, select_s, pack_s = np.array(samples).T
            total = gate_s + select_s + pack_s
            forest, batch = last[name]
            rows[name] = (forest.num_valid().mean() if B else 0, batch.num_tokens - B, median_us(gate_s),
                          median_us(select_s), median_us(pack_s), median_us(total))
        for name, (cands, verified, g, s, p, tot) in rows.items():
            print(f"{B:5d} {name:>10} {cands:9.0f} {verified:8d} {g:8.0f} {s:9.0f} {p:8.0f} {tot:8.0f} "
                  f"{tot / rows['eagle3'][5]:8.2f}")
        # Python-loop version of echo (select + pack), same forests, same run.
        policy = make_policy("echo", configs(B)["echo"])
        loop_s, vec_s = [], []
        for r in range(max(3, args.repeats // 5)):
            forest = draft(RandomDrafter(vocab_size=32000, concentration=0.3, seed=r), policy,
                           np.zeros(B, np.int64), np.full(B, 512))
            t0 = time.perf_counter()
            sel = policy.select(forest)
            pack(forest, sel, check=False)
            t1 = time.perf_counter()
            loop_sel = echo_select_loop(forest, policy)
            pack_loop(forest, loop_sel)
            t2 = time.perf_counter()
            assert len(loop_sel) == len(sel)
            vec_s.append(t1 - t0)
            loop_s.append(t2 - t1)
        print(f"{B:5d} echo select+pack: vectorized {median_us(vec_s):.0f} us, Python loop {median_us(loop_s):.0f} us,"
              f" speedup {np.median(loop_s) / np.median(vec_s):.1f}x")


if __name__ == "__main__":
    main()
