"""Numbers behind docs/COST_MODELS.md: fit quality per profile, transfer, known shapes, evaluation speed.

    python benchmarks/bench_cost_models.py            # everything (about a minute on 2 cores)
    python benchmarks/bench_cost_models.py --only speed

Reads the real H100 profiles from ../shared/data/profiles (relative to the project root).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cost_models.fitted import FittedCostModel, ape_stats, fit_params, heldout_stats, predict_obs
from cost_models.interface import StepBatch
from cost_models.profiles import read_profile
from cost_models.roofline import RooflineCostModel, RooflineParams

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "profiles" / "h100"
LAYER_FILES = [
    "vidur/Llama-2-7b-hf_mlp.csv",
    "vidur/CodeLlama-34b-Instruct-hf_mlp.csv",
    "llmservingsim_v0/Llama-3.1-8B_tp1_layers.csv",
    "llmservingsim_v0/Llama-3.1-70B_tp4_layers.csv",
    "llmservingsim_v0/Mixtral-8x7B_tp1_layers.csv",
    "llmservingsim_v0/Llama-3.1-70B_tp4_attention.csv",
]


def fit_quality() -> None:
    base = RooflineParams.from_hardware("h100-sxm")
    print("## Fit quality: fit on every other token count, test on the others (per-layer time, APE %)")
    print("| profile | points (train/test) | train median | test median | test P90 | test max |")
    print("|---|---|---|---|---|---|")
    for rel in LAYER_FILES:
        t = read_profile(DATA / rel)
        h = heldout_stats(t, base)
        tr, te = h["train"], h["test"]
        print(f"| {rel} | {tr['n']}/{te['n']} | {tr['median_ape_pct']} | {te['median_ape_pct']} | "
              f"{te['p90_ape_pct']} | {te['max_ape_pct']} |")


def transfer() -> None:
    base = RooflineParams.from_hardware("h100-sxm")
    src = read_profile(DATA / "vidur/Llama-2-7b-hf_mlp.csv")
    dst = read_profile(DATA / "vidur/CodeLlama-34b-Instruct-hf_mlp.csv")
    prm = fit_params(src, base).params
    print("\n## Transfer: fit on Llama-2-7B (all TP), predict CodeLlama-34B per-layer time (APE %)")
    print("| TP | points | median | P90 | max |")
    print("|---|---|---|---|---|")
    for tp in (1, 2, 4, 8):
        sub = dst.subset(dst.obs_tp == tp)
        s = ape_stats(predict_obs(sub, prm), sub.obs_measured_ms)
        print(f"| {tp} | {s['n']} | {s['median_ape_pct']} | {s['p90_ape_pct']} | {s['max_ape_pct']} |")


def shapes() -> None:
    base = RooflineParams.from_hardware("h100-sxm")
    t = read_profile(DATA / "vidur/Llama-2-7b-hf_mlp.csv")
    prm = fit_params(t, base).params
    sub = t.subset(t.obs_tp == 1)
    pred = predict_obs(sub, prm)
    print("\n## Shape: Llama-2-7B TP1 per-layer linear + element-wise time (Vidur, H100), ms")
    print("| tokens | measured | fitted | measured / measured at 1 token |")
    print("|---|---|---|---|")
    m1 = sub.obs_measured_ms[sub.obs_tokens == 1][0]
    for n in (1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        i = np.flatnonzero(sub.obs_tokens == n)
        if len(i):
            i = i[0]
            print(f"| {n} | {sub.obs_measured_ms[i]:.4f} | {pred[i]:.4f} | {sub.obs_measured_ms[i] / m1:.2f} |")

    print("\n## LLaMA-3.3-70B, TP 8, H100 (fitted h100.json), context 1024 tokens per sequence")
    print("| batch | AR step ms | verify batch x 8 ms | ratio | roofline AR ms | roofline verify ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    fm = FittedCostModel("llama-3.3-70b", tp=8)
    rm = RooflineCostModel("llama-3.3-70b", "h100-sxm", tp=8)
    ctx = 1024.0
    for b in (1, 8, 16, 32, 64, 96, 128, 192, 256):
        ar, v = fm.ar_step_ms(b, ctx), fm.verify_ms(8.0 * b, b * ctx, b)
        rar, rv = rm.ar_step_ms(b, ctx), rm.verify_ms(8.0 * b, b * ctx, b)
        print(f"| {b} | {ar:.2f} | {v:.2f} | {v / ar:.2f} | {rar:.2f} | {rv:.2f} | {rv / rar:.2f} |")
    for name, m in (("fitted", fm), ("roofline", rm)):
        bs = np.arange(1, 513, dtype=np.float64)
        ratio = m.verify_ms(8.0 * bs, bs * ctx, bs) / m.ar_step_ms(bs, ctx)
        cross = bs[np.argmax(ratio >= 2.0)] if (ratio >= 2.0).any() else None
        print(f"{name}: smallest batch where verifying batch x 8 tokens >= 2 AR steps: {cross}; "
              f"verify / AR at batch 128: {ratio[127]:.2f}")


def speed() -> None:
    m = FittedCostModel("qwen3-8b", draft="eagle3-qwen3-8b")
    rng = np.random.default_rng(0)
    n = 10_000
    b = rng.integers(1, 257, n)
    batch = StepBatch.uniform(b, rng.integers(1, 65, n), rng.integers(128, 8192, n),
                              draft_rows_per_seq=np.full(6, 4.0))
    m.step_time(batch)
    t0 = time.perf_counter()
    for _ in range(5):
        m.step_time(batch)
    vec = (time.perf_counter() - t0) / 5 * 1e3
    one = StepBatch.from_requests([8] * 32, [1024] * 32, draft_rows=[32, 128, 128, 128, 128, 128])
    t0 = time.perf_counter()
    for _ in range(2000):
        m.step_time(one)
    single = (time.perf_counter() - t0) / 2000 * 1e6
    t0 = time.perf_counter()
    for _ in range(2000):
        m.verify_ms(256.0, 32 * 1024.0, 32)
    ver = (time.perf_counter() - t0) / 2000 * 1e6
    print("\n## Evaluation speed (qwen3-8b + EAGLE-3 head, 6 draft depths)")
    print(f"10,000 configurations in one step_time call: {vec:.1f} ms")
    print(f"one iteration (step_time on a from_requests batch): {single:.1f} us")
    print(f"verify_ms on floats: {ver:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["fit", "transfer", "shapes", "speed"])
    args = ap.parse_args()
    if not DATA.is_dir() and args.only != "speed":
        raise SystemExit(f"profiles not found at {DATA}")
    for name, fn in (("fit", fit_quality), ("transfer", transfer), ("shapes", shapes), ("speed", speed)):
        if args.only in (None, name):
            fn()


if __name__ == "__main__":
    main()
