"""The acceptance model fitted to real records: the shipped tiny pair in the engine, then the simulator's model.

1. The engine runs eagle3 (steps 4, topk 4, N 16) on --fit-prompts held-out stdlib prompts and writes its per-node
   records (the schema `echosim fit-acceptance` reads).
2. The acceptance model is fitted to them by maximum likelihood (echosim.sim.acceptance_fit.fit_records).
3. On other prompts, the engine's MAT under several tree shapes is set against the fitted model's prediction for
   the same shapes (measure_mat): the fitted tree shape in sample, the others out of sample.

    python benchmarks/acceptance_from_engine.py [--fit-prompts 32] [--test-prompts 16] [--gen-len 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_engine import held_out_prompts

from echo_exec.engine import Engine, SamplingParams
from echo_exec.train_tiny import MODELS_DIR
from echosim.sim.acceptance import measure_mat
from echosim.sim.acceptance_fit import fit_records
from echosim.spec.policies import make_policy
from echosim.spec.records import read_records

FIT_SHAPE = dict(steps=4, topk=4, num_draft_tokens=16)
SHAPES = [FIT_SHAPE, dict(steps=4, topk=1, num_draft_tokens=5), dict(steps=6, topk=4, num_draft_tokens=24),
          dict(steps=3, topk=8, num_draft_tokens=32)]


def engine_mat(prompts, shape: dict, gen_len: int, records: Path | None = None) -> float:
    eng = Engine(MODELS_DIR / "tiny-target", MODELS_DIR / "tiny-draft", policy="eagle3", policy_config=shape,
                 max_running=8, records_path=records)
    eng.generate(prompts, SamplingParams(max_new_tokens=gen_len))
    eng.flush_records()
    return float(eng.stats()["avg_accept_length"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit-prompts", type=int, default=32)
    ap.add_argument("--test-prompts", type=int, default=16)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    prompts = held_out_prompts(args.fit_prompts + args.test_prompts, 192, args.gen_len, args.seed)
    fit_p, test_p = prompts[:args.fit_prompts], prompts[args.fit_prompts:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.jsonl"
        fit_mat = engine_mat(fit_p, FIT_SHAPE, args.gen_len, path)
        records = read_records(path)
    fit = fit_records(records)
    r = fit.report
    print(f"fit: {len(records)} records from {args.fit_prompts} prompts (engine MAT {fit_mat:.3f}); converged "
          f"{r['converged']}, pseudo-R2 {r['pseudo_r2']}, AUROC {r['auroc']}")
    print("| depth | nodes with an accepted parent | accepted | predicted |")
    print("|---|---|---|---|")
    for row in r["by_depth"]:
        print(f"| {row['depth']} | {row['nodes']} | {row['observed']:.3f} | {row['predicted']:.3f} |")
    print(f"\nMAT on {args.test_prompts} other prompts, {args.gen_len} tokens each, batch up to 8:")
    print("| eagle3 (steps, topk, N) | engine | fitted model | error |")
    print("|---|---|---|---|")
    for shape in SHAPES:
        real = engine_mat(test_p, shape, args.gen_len)
        sim = measure_mat(fit.model, make_policy("eagle3", shape), "default", requests=1024, steps=16)["mat"]
        tag = " (fitted shape)" if shape == FIT_SHAPE else ""
        print(f"| ({shape['steps']}, {shape['topk']}, {shape['num_draft_tokens']}){tag} | {real:.3f} | {sim:.3f} | "
              f"{sim / real - 1:+.1%} |")


if __name__ == "__main__":
    main()
