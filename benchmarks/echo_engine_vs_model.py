"""ECHO in the engine and under a fitted acceptance model, on the same settings, step by step.

The engine runs ECHO (goodput budget, bound to one step-time function on both sides) on held-out stdlib prompts at
each batch size, writing per-node records; the scheduler core then runs the same policy under the acceptance
model (simulate_records), batch for batch. Both sides' records are summarized alike: MAT, verified tokens per
request-step, how often a step reaches depth 4 (ECHO's gate at depth 3 passed), and per depth the nodes verified
and their acceptance given an accepted parent. No queueing, no timing: only what ECHO picks and what is accepted.

    python benchmarks/echo_engine_vs_model.py ACCEPTANCE_JSON [--batch-sizes 1,4,16] [--prompts 32] [--seed 11]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_engine import held_out_prompts

from echo_exec.engine import Engine, SamplingParams
from echo_exec.train_tiny import MODELS_DIR
from echosim.sim.acceptance import AcceptanceModel
from echosim.sim.acceptance_fit import infer_parent_accepted, simulate_records
from echosim.spec.policies import make_policy
from echosim.spec.records import NodeRecords, read_records


def shipped_echo() -> dict:
    """The ECHO settings `echosim serve` runs with the shipped pair (the draft's policy-echo.json)."""
    from echosim.commands.serve import policy_settings

    return policy_settings(None, "echo", str(MODELS_DIR / "tiny-draft"))[1]


def step_ms(tokens, batch_size):
    """This CPU's rough shape (a fixed cost, per request, per verified token): the same on both sides."""
    return 6.0 + 1.2 * batch_size + 0.45 * np.asarray(tokens, float)


def summary(rec, gated: list | None = None) -> str:
    step, req, depth, acc = (np.asarray(a) for a in (rec.step, rec.request, rec.depth, rec.accepted))
    keys, inv = np.unique(req.astype(np.int64) * 1_000_000 + step, return_inverse=True)  # by request, then step
    n = inv.max() + 1
    deepest = np.zeros(n)
    np.maximum.at(deepest, inv, depth)
    live = infer_parent_accepted(rec)
    out = (f"MAT {1 + np.bincount(inv, acc.astype(float)).mean():.3f}, verified/request-step {len(depth) / n:.2f}, "
           f"reaches depth 4 {np.mean(deepest >= 4):.3f}")
    for d in (1, 3, 5):
        s = (depth == d) & live
        out += f" | d{d}: {np.sum(depth == d) / n:.2f} verified, accepted {acc[s].mean():.3f}"
    # how alike a request's consecutive steps are: lag-1 autocorrelation of the accepted drafts per step
    accepted = np.bincount(inv, acc.astype(float))
    same = keys[1:] // 1_000_000 == keys[:-1] // 1_000_000
    out += f" | step-to-step autocorrelation {np.corrcoef(accepted[:-1][same], accepted[1:][same])[0, 1]:.3f}"
    if gated:
        out += f" | gate failed in {np.concatenate(gated).mean():.3f} of request-steps"
    return out


def counting_gates(policy, gated: list):
    """The policy, its select() first noting which requests' gates failed in each step."""
    select = policy.select

    def counted(forest):
        gated.append(np.asarray(forest.gated if forest.gated is not None else forest.stop_depth < forest.max_depth))
        return select(forest)

    policy.select = counted
    return policy


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("acceptance")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=48)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--validate-prompts", action="store_true",
                   help="the prompts `echosim validate` calibrates on (16 of 256 bytes, 64 tokens each, its seed 0): "
                        "those its acceptance model was fitted on, so no difference of difficulty between the sides")
    p.add_argument("--config", default=None, help="echo settings (JSON; default: the shipped pair's policy-echo.json)")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = json.loads(a.config) if a.config else shipped_echo()
    model = AcceptanceModel.load(a.acceptance)
    if a.validate_prompts:
        from echosim.validate.crossval import calibration_prompts, prompt_files

        prompts, a.gen_len = calibration_prompts(prompt_files()[0], 16, 256, 1), 64
    else:
        prompts = held_out_prompts(a.prompts, 192, a.gen_len, a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="echo-vs-model-"))
    for b in (int(x) for x in a.batch_sizes.split(",")):
        path = tmp / f"records-b{b}.jsonl"
        gated_engine, gated_model = [], []
        engine_records = run_engine(counting_gates(make_policy("echo", cfg).bind(step_ms), gated_engine), prompts, b,
                                    a.gen_len, path)
        print(f"batch {b:2d} engine: {summary(engine_records, gated_engine)}", flush=True)
        model_records = run_model(
            model, lambda g=gated_model: counting_gates(make_policy("echo", cfg).bind(step_ms), g), b)
        print(f"batch {b:2d} model:  {summary(model_records, gated_model)}", flush=True)
    # the control: the static tree the acceptance model is fitted from, on these prompts (their own difficulty)
    tree = {"steps": 5, "topk": 2, "num_draft_tokens": 19}
    engine_records = run_engine(make_policy("eagle3", tree), prompts, 1, a.gen_len, tmp / "records-tree.jsonl")
    print(f"static tree {tree}, batch 1, engine: {summary(engine_records)}")
    print(f"static tree {tree}, batch 1, model:  {summary(run_model(model, lambda: make_policy('eagle3', tree), 1))}")
    return 0


def run_engine(policy, prompts, batch_size: int, gen_len: int, path: Path):
    eng = Engine(MODELS_DIR / "tiny-target", MODELS_DIR / "tiny-draft", policy=policy, max_running=batch_size,
                 records_path=path)
    for i in range(0, len(prompts), batch_size):
        eng.generate(prompts[i:i + batch_size], SamplingParams(max_new_tokens=gen_len, temperature=0.0,
                                                                ignore_eos=True))
    eng.close()
    eng.flush_records()
    return read_records(path)


def run_model(model, make, batch_size: int):
    parts = []
    for s in range(max(1, 64 // batch_size)):
        part = simulate_records(model, make(), ["default"], requests=batch_size, steps=40, seed=s)
        part.request[:] += s * batch_size
        parts.append(part)
    return NodeRecords.concat(parts)


if __name__ == "__main__":
    raise SystemExit(main())
