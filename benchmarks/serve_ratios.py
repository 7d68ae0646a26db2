"""Per-cell ratios of a `bench_serve.py` run, from its printed turn lines (so a run stopped early still counts):
echo / ar, echo / eagle3 and echo / max(ar, eagle3), in wall time and in the engine threads' CPU time.

A cell (prompt set, concurrency) pools its turns: every policy generates the same tokens in a turn (the same
requests, greedy, lossless) and every turn of a cell the same, so a policy's pooled rate is the harmonic mean of
its turn rates. Also per cell: the turns' load averages, and in how many turns echo >= 0.97 x max(ar, eagle3).

    python benchmarks/bench_serve.py ... | tee run.log
    python benchmarks/serve_ratios.py run.log
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

TURN = re.compile(r"^rep (\d+) (\S+) C=(\d+) \(load ([\d.]+)\): (.*)$")
POLICY = re.compile(r"(\S+) ([\d.]+) tok/s, ([\d.]+) tok/cpu-s")
BAR = 0.97  # echo >= max(ar, eagle3) - 3%


def parse(text: str) -> dict:
    cells: dict = {}
    for line in text.splitlines():
        m = TURN.match(line.strip())
        if not m:
            continue
        rep, name, c, load, rest = m.groups()
        rates = {p: (float(w), float(cpu)) for p, w, cpu in POLICY.findall(rest)}
        cells.setdefault((name, int(c)), []).append(dict(rep=int(rep), load=float(load), rates=rates))
    return cells


def hmean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(len(x) / np.sum(1.0 / x))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", type=Path)
    args = ap.parse_args()
    cells = parse(args.log.read_text())
    print("| set | C | turns | load | echo/ar wall | echo/eagle3 wall | echo/max wall | turns >= 0.97, wall | "
          "echo/ar CPU | echo/eagle3 CPU | echo/max CPU | turns >= 0.97, CPU |")
    print("|---" * 12 + "|")
    for (name, c), turns in sorted(cells.items()):
        loads = [t["load"] for t in turns]
        row = [name, str(c), str(len(turns)), f"{min(loads):.1f}-{max(loads):.1f}"]
        for k in (0, 1):  # wall, CPU
            pooled = {p: hmean([t["rates"][p][k] for t in turns]) for p in ("ar", "eagle3", "echo")}
            best = max(pooled["ar"], pooled["eagle3"])
            per_turn = [t["rates"]["echo"][k] / max(t["rates"]["ar"][k], t["rates"]["eagle3"][k]) for t in turns]
            held = sum(r >= BAR for r in per_turn)
            row += [f"{pooled['echo'] / pooled['ar']:.3f}", f"{pooled['echo'] / pooled['eagle3']:.3f}",
                    f"**{pooled['echo'] / best:.3f}**",
                    f"{held}/{len(turns)} ({min(per_turn):.2f}-{max(per_turn):.2f})"]
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
