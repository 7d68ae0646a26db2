"""Write the two small Mooncake-format traces the prefix-cache tests and docs use (our own, synthetic; not
Mooncake's published traces): tests/fixtures/prefix/{conversation,templates}_mooncake.jsonl.

    python benchmarks/make_prefix_samples.py

- conversation: multi-turn sessions behind one shared system prompt; turn k's prompt is turn k-1's prompt, its
  answer and a new message, so its hash ids extend the previous turn's;
- templates: requests built on a few long shared templates (few-shot prompts, tool descriptions) plus a unique
  tail.
Hash ids name 512-token blocks, chained by construction (a block's id is unique to its whole prefix), as in
Mooncake's traces.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "prefix"
BLOCK = 512


class Ids:
    def __init__(self):
        self.next = 0

    def new(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def conversation(seed: int = 0, sessions: int = 60) -> list[dict]:
    rng = np.random.default_rng(seed)
    ids = Ids()
    system = ids.new(2)  # a 1024-token system prompt every session shares
    rows = []
    t = 0.0
    for _ in range(sessions):
        t += rng.exponential(2.0)
        prompt_ids, prompt_len = list(system), 2 * BLOCK
        now = t
        for _turn in range(int(rng.integers(1, 6))):
            msg = int(rng.integers(40, 600))
            prompt_len += msg
            blocks = -(-prompt_len // BLOCK)
            prompt_ids = prompt_ids + ids.new(blocks - len(prompt_ids))
            out = int(rng.integers(50, 400))
            rows.append({"timestamp": int(now * 1000), "input_length": prompt_len, "output_length": out,
                         "hash_ids": list(prompt_ids)})
            # the next turn's prompt carries this answer: its last (partial) block changes, so a new id
            prompt_len += out
            full = prompt_len // BLOCK
            prompt_ids = prompt_ids[:min(full, len(prompt_ids) - 1)]
            now += float(rng.uniform(10.0, 40.0))
    return sorted(rows, key=lambda r: r["timestamp"])


def templates(seed: int = 1, requests: int = 300, n_templates: int = 8) -> list[dict]:
    rng = np.random.default_rng(seed)
    ids = Ids()
    tmpl = [ids.new(int(rng.integers(2, 9))) for _ in range(n_templates)]
    popularity = rng.dirichlet(np.ones(n_templates) * 0.7)
    rows = []
    t = 0.0
    for _ in range(requests):
        t += rng.exponential(0.25)
        k = int(rng.choice(n_templates, p=popularity))
        tail = int(rng.integers(30, 1500))
        length = len(tmpl[k]) * BLOCK + tail
        blocks = -(-length // BLOCK)
        hid = tmpl[k] + ids.new(blocks - len(tmpl[k]))
        rows.append({"timestamp": int(t * 1000), "input_length": length,
                     "output_length": int(rng.integers(20, 300)), "hash_ids": hid})
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("conversation", conversation()), ("templates", templates())):
        path = OUT / f"{name}_mooncake.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {path} ({len(rows)} requests)")


if __name__ == "__main__":
    main()
