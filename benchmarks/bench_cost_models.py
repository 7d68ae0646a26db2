"""Numbers behind docs/COST_MODELS.md: fit quality per profile, held-out attention, transfer, known shapes, physical
bounds, evaluation speed.

    python benchmarks/bench_cost_models.py            # everything (a few minutes on 2 cores)
    python benchmarks/bench_cost_models.py --only heldout

Reads the public profiles shipped (gzip) in cost_models/profiles/ (sources: cost_models/profiles/NOTICE.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cost_models.fitted import (
    FittedCostModel,
    ape_stats,
    attention_rows,
    fit_params,
    heldout_stats,
    load_fit,
    predict_obs,
)
from cost_models.interface import StepBatch
from cost_models.profiles import read_profile
from cost_models.roofline import RooflineCostModel, RooflineParams

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "cost_models" / "profiles" / "h100"
RTX = ROOT / "cost_models" / "profiles" / "rtx-pro-6000" / "llmservingsim"
LAYER_FILES = [
    "vidur/Llama-2-7b-hf_mlp.csv.gz",
    "vidur/CodeLlama-34b-Instruct-hf_mlp.csv.gz",
    "llmservingsim_v0/Llama-3.1-8B_tp1_layers.csv.gz",
    "llmservingsim_v0/Llama-3.1-70B_tp4_layers.csv.gz",
    "llmservingsim_v0/Llama-3.1-70B_tp4_attention.csv.gz",
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
    src = read_profile(DATA / "vidur/Llama-2-7b-hf_mlp.csv.gz")
    dst = read_profile(DATA / "vidur/CodeLlama-34b-Instruct-hf_mlp.csv.gz")
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
    t = read_profile(DATA / "vidur/Llama-2-7b-hf_mlp.csv.gz")
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


def heldout() -> None:
    """Attention on data the fit did not see: larger calls than fitted (H100), other models and TP degrees (the
    H100 Llama-3.1-8B TP1 layer profile's attention op; RTX PRO 6000 decode across models and TP), and the MLP of
    another model."""
    base = RooflineParams.from_hardware("h100-sxm")
    print("\n## Held-out attention (APE %)")
    print("| fitted on | scored on | points | median | P90 |")
    print("|---|---|---|---|---|")
    t = read_profile(DATA / "llmservingsim_v0/Llama-3.1-70B_tp4_attention.csv.gz")
    for lim in (4096, 16384):
        prm = fit_params(t.subset(t.kv_tokens <= lim), base).params
        te = t.subset(t.kv_tokens > lim)
        s = ape_stats(predict_obs(te, prm), te.obs_measured_ms)
        print(f"| H100 Llama-3.1-70B TP4, calls <= {lim} keys | the same file, calls > {lim} keys (to 65,536) | "
              f"{s['n']} | {s['median_ape_pct']} | {s['p90_ape_pct']} |")
    prm = fit_params(t.subset(t.seqs <= 32), base).params
    te = t.subset(t.seqs > 32)
    s = ape_stats(predict_obs(te, prm), te.obs_measured_ms)
    print(f"| H100 Llama-3.1-70B TP4, batches <= 32 | the same file, batches 33-256 | {s['n']} | "
          f"{s['median_ape_pct']} | {s['p90_ape_pct']} |")
    # the attention op of the LLMServingSim v0 layer profiles: torch's scaled_dot_product_attention (fp16, one
    # prompt of 1-2048 tokens at KV 0), scored with the default (serving-kernel) fit and with the shipped fit of
    # the OTHER model's layer profile (same kernel, other model, TP degree and query/KV heads)
    layers = {n: attention_rows(read_profile(DATA / f"llmservingsim_v0/{n}_layers.csv.gz"))
              for n in ("Llama-3.1-8B_tp1", "Llama-3.1-70B_tp4")}
    for fit, label, target in (("h100", "default h100.json", "Llama-3.1-8B_tp1"),
                               ("h100", "default h100.json", "Llama-3.1-70B_tp4"),
                               ("h100_llmservingsim_llama_3_1_70b_tp4", "H100 Llama-3.1-70B TP4 layer profile",
                                "Llama-3.1-8B_tp1"),
                               ("h100_llmservingsim_llama_3_1_8b_tp1", "H100 Llama-3.1-8B TP1 layer profile",
                                "Llama-3.1-70B_tp4")):
        prm, _ = load_fit(fit)
        tab = layers[target]
        pred, meas, tok = predict_obs(tab, prm), tab.obs_measured_ms, tab.tokens
        s = ape_stats(pred, meas)
        print(f"| {label} | H100 {target} attention op (torch SDPA, KV 0, 1-2048 tokens) | {s['n']} | "
              f"{s['median_ape_pct']} | {s['p90_ape_pct']} |")
        bands = []
        for lo, hi in ((1, 64), (64, 256), (256, 512), (512, 1024), (1024, 1536), (1536, 2049)):
            m = (tok >= lo) & (tok < hi)
            bands.append(f"{lo}-{hi - 1}: predicted / measured {np.median(pred[m] / meas[m]):.2f}")
        print("  (by prompt tokens: " + "; ".join(bands) + ")")
    rtx = RooflineParams.from_hardware("rtx-pro-6000")
    names = ["Llama-3.1-8B_tp1", "Llama-3.1-8B_tp2", "Qwen3-32B_tp1", "Qwen3-32B_tp2"]
    dec = {}
    for n in names:
        tab = read_profile(RTX / f"{n}_attention.csv.gz")
        dec[n] = tab.subset(tab.obs_tokens == tab.seqs)
    for src in names:
        prm = fit_params(dec[src], rtx).params
        for n in names:
            if n != src:
                s = ape_stats(predict_obs(dec[n], prm), dec[n].obs_measured_ms)
                print(f"| RTX PRO 6000 {src} decode | {n} decode | {s['n']} | {s['median_ape_pct']} | "
                      f"{s['p90_ape_pct']} |")
    print("\n## Held-out MLP: fit on Llama-2-7B (Vidur, all TP), score CodeLlama-34B (all TP), APE %")
    prm = fit_params(read_profile(DATA / "vidur/Llama-2-7b-hf_mlp.csv.gz"), base).params
    dst = read_profile(DATA / "vidur/CodeLlama-34b-Instruct-hf_mlp.csv.gz")
    s = ape_stats(predict_obs(dst, prm), dst.obs_measured_ms)
    print(f"CodeLlama-34B per-layer linear + element-wise time: {s['n']} points, median {s['median_ape_pct']}, "
          f"P90 {s['p90_ape_pct']}")


def bounds() -> None:
    """Whole-model steps against the datasheet roofline: fitted / roofline over models x batch x context x tree."""
    print("\n## Fitted step / datasheet roofline (H100), 20,000 random configurations per model")
    print("| model | TP | min | max | max outside coverage |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, tp in (("qwen3-8b", 1), ("qwen3-32b", 2), ("llama-3.1-8b", 1), ("llama-3.3-70b", 8),
                     ("qwen3-235b-a22b", 8), ("vicuna-13b", 1)):
        f, r = FittedCostModel(name, tp=tp), RooflineCostModel(name, "h100-sxm", tp=tp)
        n = 20_000
        b = rng.integers(1, 513, n).astype(float)
        ctx = np.exp(rng.uniform(np.log(16), np.log(131072), n))
        t = rng.integers(1, 65, n).astype(float)
        sb = StepBatch.uniform(b, t, ctx)
        ratio = f.step_time(sb).total_ms / r.step_time(sb).total_ms
        out = (b * (ctx + t) > f.params.attn_cover_keys) | (b > f.params.attn_cover_seqs)
        print(f"| {name} | {tp} | {ratio.min():.2f} | {ratio.max():.2f} | {ratio[out].max():.2f} |")
    print("\n## The issue's cases, Qwen3-8B TP1 decode (ms per step, fitted vs roofline)")
    f, r = FittedCostModel("qwen3-8b"), RooflineCostModel("qwen3-8b", "h100-sxm")
    for bsz, c in ((256, 1024), (25, 13000)):
        fit_ms, roof_ms = f.ar_step_ms(bsz, c), r.ar_step_ms(bsz, c)
        print(f"batch {bsz} x context {c}: fitted {fit_ms:.1f} ms, roofline {roof_ms:.1f} ms")


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
    ap.add_argument("--only", choices=["fit", "heldout", "transfer", "shapes", "bounds", "speed"])
    args = ap.parse_args()
    for name, fn in (("fit", fit_quality), ("heldout", heldout), ("transfer", transfer), ("shapes", shapes),
                     ("bounds", bounds), ("speed", speed)):
        if args.only in (None, name):
            fn()


if __name__ == "__main__":
    main()
