"""Wall-time speed of the echo engine on this machine: plain decoding (ar) against eagle3 and echo, side by side.

Prompts are held-out Python standard library code (echo_exec/train_tiny.split_files), --prompt-len bytes at a seeded
offset; decoding is greedy, --gen-len tokens (EOS may end a request earlier; every policy emits the same tokens, which
the script checks). All engines are loaded first and the policies run interleaved, prompt by prompt (batch 1) and
batch by batch (the sweep), so a noisy shared machine slows them alike; report ratios.

1. Batch 1: each prompt alone through each engine: tokens/s, ms per emitted token, MAT, speedup over ar.
2. Sweep: for each batch size B, B prompts submitted at once (max_running >= B): total tokens/s.

    python benchmarks/bench_engine.py [--prompts 12] [--batch-sizes 1,2,4,8,16,32] [--threads 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from echo_exec.engine import Engine, SamplingParams
from echo_exec.tokenizer import BOS_ID
from echo_exec.train_tiny import MODELS_DIR, split_files
from echosim.spec.calibrate import calibrate
from echosim.spec.policies import make_policy
from echosim.spec.records import read_records

EAGLE3 = dict(steps=4, topk=4, num_draft_tokens=16)
# ECHO's candidate tree shapes. On separate calibration prompts: an eagle3 run's per-node records calibrate each
# candidate's gates (echosim.spec.calibrate), the fastest candidate at batch 1 is kept, and its budget is
# goodput-optimal under the step time measured on this machine (the target's forward + the step's fixed cost).
ECHO_CANDIDATES = [
    dict(steps=4, topk=4, num_draft_tokens=16, remaining_num_draft_tokens=6),
    dict(steps=5, topk=2, num_draft_tokens=10, remaining_num_draft_tokens=4),
    dict(steps=3, topk=3, num_draft_tokens=8, remaining_num_draft_tokens=4),
    dict(steps=6, topk=1, num_draft_tokens=7, remaining_num_draft_tokens=3),
]


def held_out_prompts(n: int, prompt_len: int, gen_len: int, seed: int) -> list[list[int]]:
    _, held = split_files()
    rng = np.random.default_rng(seed)
    files = [f for f in held if f.stat().st_size > prompt_len + gen_len + 64]
    out = []
    for f in [files[i] for i in rng.permutation(len(files))[:n]]:
        data = np.frombuffer(f.read_bytes(), dtype=np.uint8).astype(np.int64)
        start = int(rng.integers(0, len(data) - prompt_len - gen_len))
        p = data[start:start + prompt_len].tolist()
        out.append([BOS_ID] + p if start == 0 else p)
    return out


def run(engine: Engine, prompts: list[list[int]], gen_len: int) -> tuple[float, list[list[int]], dict]:
    before = engine.stats()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=gen_len))
    wall = time.perf_counter() - t0
    after = engine.stats()
    delta = {k: after[k] - before[k] for k in ("generated_tokens", "request_verifies", "decode_steps",
                                               "verified_accepted", "verify_tokens", "draft_ms", "target_ms")}
    return wall, [o.output_ids for o in outs], delta


def tune(args, engines: dict, forward_ms, blocks: int):
    """Calibration prompts (another seed): the step's fixed cost and ECHO's gates from an eagle3 run's records,
    then ECHO's tree shape (fastest candidate at batch 1 unless --echo-config). Binds the step-time model to every
    engine's policy and returns it with what was chosen."""
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / "records.jsonl"
        cal_engine = Engine(args.target, args.draft, policy="eagle3", policy_config=EAGLE3, device=args.device,
                            max_running=1, num_kv_blocks=blocks, records_path=records)
        cal_prompts = held_out_prompts(max(args.calibration_prompts, 2), args.prompt_len, args.gen_len, args.seed + 1)
        run(cal_engine, cal_prompts[:1], 8)  # warm-up
        _, _, st = run(cal_engine, cal_prompts, args.gen_len)
        cal_engine.close()
        per_step = (st["draft_ms"] + st["target_ms"]) / st["decode_steps"]
        fixed_ms = max(per_step - float(forward_ms(np.array([st["verify_tokens"] / st["decode_steps"]]), 1)[0]), 0.0)

        def step_time(tokens, batch_size, fwd=forward_ms, fixed=fixed_ms):
            return fixed + fwd(tokens, batch_size)

        step_time.table = forward_ms.table  # type: ignore[attr-defined]
        step_time.fixed_ms = round(fixed_ms, 3)  # type: ignore[attr-defined]
        for eng in engines.values():
            eng.policy.bind(step_time)
        mat = (st["verified_accepted"] + st["request_verifies"]) / st["request_verifies"]
        info = dict(fixed_ms=round(fixed_ms, 3), eagle3_calibration_mat=round(mat, 3))
        if "echo" not in engines or args.echo_config is not None or not args.calibration_prompts:
            return step_time, info
        rec = read_records(records)
        one_ms = float(step_time(np.array([1]), 1)[0])
        token_cost = float(forward_ms(np.array([16]), 1)[0] - forward_ms(np.array([1]), 1)[0]) / 15 / one_ms
        tried = []
        for shape in ECHO_CANDIDATES:
            base = make_policy("echo", dict(shape, budget={"kind": "goodput", "tokens": shape["num_draft_tokens"] - 1}))
            cal = calibrate(rec, base=base.config, token_cost=token_cost)
            cfg = dict(shape, gates=cal.config.gates, budget=base.config.budget.to_json())
            eng = Engine(args.target, args.draft, policy="echo", policy_config=cfg, device=args.device,
                         max_running=1, num_kv_blocks=blocks)
            eng.policy.bind(step_time)
            run(eng, cal_prompts[:1], 8)
            wall, _, d = run(eng, cal_prompts[:4], args.gen_len)
            tried.append(dict(config=cfg, tokens_per_s=round(d["generated_tokens"] / wall, 2)))
        best = max(tried, key=lambda t: t["tokens_per_s"])
        echo = engines["echo"]
        echo.policy.config = make_policy("echo", best["config"]).config
        echo.policy.check()
        info.update(token_cost=round(token_cost, 4), echo_candidates=tried, echo_config=best["config"])
        return step_time, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=MODELS_DIR / "tiny-target")
    ap.add_argument("--draft", type=Path, default=MODELS_DIR / "tiny-draft")
    ap.add_argument("--prompts", type=int, default=12, help="prompts of the batch-1 comparison")
    ap.add_argument("--prompt-len", type=int, default=192)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    ap.add_argument("--policies", default="ar,eagle3,echo")
    ap.add_argument("--echo-config", type=json.loads, default=None, help="JSON settings for echo")
    ap.add_argument("--calibration-prompts", type=int, default=8,
                    help="prompts (another seed) of the eagle3 run whose records calibrate echo's gates; 0 = off")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    policies = args.policies.split(",")
    configs = {"ar": None, "eagle3": EAGLE3, "echo": args.echo_config or ECHO_CANDIDATES[0]}
    max_b = max(sizes)
    context = args.prompt_len + args.gen_len // 2
    # room for max_b requests, and for the step-time measurement's one request (context + up to 512 tokens)
    blocks = max(max_b * -(-(args.prompt_len + args.gen_len + 80) // 16), -(-(context + 512) // 16) + 1)
    engines = {}
    for name in policies:
        engines[name] = Engine(args.target, None if name == "ar" else args.draft, policy=name,
                               policy_config=configs.get(name), device=args.device, max_running=max_b,
                               num_kv_blocks=blocks, max_prefill_tokens=1024, seed=args.seed)
    step_model = engines["ar"].measure_step_time(context=context, repeats=8) if "ar" in engines else None
    prompts = held_out_prompts(max(args.prompts, max_b), args.prompt_len, args.gen_len, args.seed)
    for eng in engines.values():  # warm-up
        run(eng, prompts[:1], 8)
    calibration = None
    if step_model is not None and any(n != "ar" for n in policies):
        step_model, calibration = tune(args, engines, step_model, blocks)

    print(f"target {args.target}  draft {args.draft}  device {args.device}  threads {args.threads}  "
          f"{platform.processor() or platform.machine()}")
    if step_model is not None:
        print(f"target forward ms by tokens (1 request, {context} cached):", step_model.table,
              "+ fixed ms per step:", getattr(step_model, "fixed_ms", None))
    if calibration is not None and "echo_candidates" in calibration:
        for t in calibration["echo_candidates"]:
            print(f"echo candidate on calibration prompts: {t['tokens_per_s']} tokens/s  {json.dumps(t['config'])}")
    if "echo" in engines:
        print("echo config:", json.dumps(engines["echo"].policy.describe()))
    # 1. batch 1, interleaved prompt by prompt
    one = {n: dict(wall=0.0, tokens=0, verifies=0, accepted=0) for n in policies}
    outputs = {n: [] for n in policies}
    for i, p in enumerate(prompts[:args.prompts]):
        order = policies if i % 2 == 0 else policies[::-1]
        for name in order:
            wall, out, d = run(engines[name], [p], args.gen_len)
            r = one[name]
            r["wall"] += wall
            r["tokens"] += d["generated_tokens"]
            r["verifies"] += d["request_verifies"]
            r["accepted"] += d["verified_accepted"]
            outputs[name].append(out[0])
    same = all(outputs[n] == outputs[policies[0]] for n in policies)
    print(f"\nbatch 1: {args.prompts} prompts x {args.gen_len} tokens, greedy; identical outputs: {same}")
    print("| policy | tokens/s | ms/token | MAT | speedup vs ar |")
    print("|---|---|---|---|---|")
    base = one["ar"]["tokens"] / one["ar"]["wall"] if "ar" in one else None
    results = {"batch1": {}, "sweep": {}, "identical_outputs": same, "threads": args.threads,
               "step_model_ms": getattr(step_model, "table", None),
               "tuning": calibration,
               "echo_config": engines["echo"].policy.describe() if "echo" in engines else None}
    for name in policies:
        r = one[name]
        tps = r["tokens"] / r["wall"]
        mat = (r["accepted"] + r["verifies"]) / r["verifies"]
        speed = tps / base if base else float("nan")
        results["batch1"][name] = dict(tokens_per_s=tps, mat=mat, speedup=speed, tokens=r["tokens"])
        print(f"| {name} | {tps:.1f} | {1e3 / tps:.2f} | {mat:.2f} | {speed:.2f}x |")

    # 2. sweep over batch sizes, interleaved batch by batch
    sweep = {n: {} for n in policies}
    for b in sizes:
        batch = prompts[:b]
        outs = {}
        for name in (policies if b % 2 else policies[::-1]):
            wall, outs[name], d = run(engines[name], batch, args.gen_len)
            sweep[name][b] = dict(tokens_per_s=d["generated_tokens"] / wall,
                                  mat=(d["verified_accepted"] + d["request_verifies"]) / d["request_verifies"],
                                  verify_tokens_per_step=d["verify_tokens"] / d["decode_steps"])
        same_b = all(outs[n] == outs[policies[0]] for n in policies)
        results["identical_outputs"] &= same_b
    print(f"\nsweep: B prompts at once, {args.gen_len} tokens each; tokens/s (MAT)")
    print("| batch | " + " | ".join(policies) + " | " + " | ".join(f"{n}/ar" for n in policies if n != "ar") + " |")
    print("|---" * (1 + len(policies) + len([n for n in policies if n != "ar"])) + "|")
    for b in sizes:
        cells = [f"{sweep[n][b]['tokens_per_s']:.1f} ({sweep[n][b]['mat']:.2f})" for n in policies]
        ratios = [f"{sweep[n][b]['tokens_per_s'] / sweep['ar'][b]['tokens_per_s']:.2f}x" for n in policies
                  if n != "ar" and "ar" in sweep]
        print(f"| {b} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    results["sweep"] = sweep
    print(f"\nall policies emitted identical tokens: {results['identical_outputs']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
