"""A profile of ours (echosim profile) against a fitted step-time model carried to the profile's hardware.

For every grid point: the measured forward, the model's prediction and their ratio, as tables over tokens per
sequence x KV length; then the error where the GPU is busy (the largest token counts) and the floor where it is not
(the small token counts, where an eager forward waits on Python's kernel launches).

    python benchmarks/profile_vs_fit.py --profile cost_models/profiles/h200_qwen3_8b_eager.csv --fit h100 \
        --hardware h200 [--busy-tokens 1024] [--floor-tokens 256]     # --fit roofline: the datasheet rates
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pandas as pd

from cost_models.fitted import load_fit, predict_obs
from cost_models.profiles import read_profile
from cost_models.roofline import RooflineParams


def table(d: pd.DataFrame, col: str, digits: int) -> str:
    p = d.pivot(index="tokens_per_seq", columns="kv_len", values=col)
    lines = ["| tokens \\ KV | " + " | ".join(str(c) for c in p.columns) + " |",
             "|---" * (len(p.columns) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(f"{v:.{digits}f}" for v in row) + " |" for t, row in zip(p.index, p.values,
                                                                                              strict=True)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True, help="our profile CSV")
    ap.add_argument("--fit", default="h100",
                    help="fitted parameters (shipped name or JSON path), or 'roofline': --hardware's datasheet rates")
    ap.add_argument("--hardware", default=None, help="carry the fit to this hardware (datasheet ratios)")
    ap.add_argument("--busy-tokens", type=int, default=1024, help="token counts >= this: GPU-bound points")
    ap.add_argument("--floor-tokens", type=int, default=256, help="token counts <= this: the launch floor")
    args = ap.parse_args(argv)

    t = read_profile(args.profile)
    if args.fit == "roofline":
        prm = RooflineParams.from_hardware(args.hardware or "h100-sxm")
    else:
        prm, _ = load_fit(args.fit)
    if args.hardware:
        prm = prm.scaled_to(args.hardware)
    # the profiled forward's own kernel counts (the fit's come from the operators it was fitted on)
    prm = replace(prm, gemm_kernels_per_layer=t.gemm_kernels_per_layer,
                  elem_kernels_per_layer=t.elem_kernels_per_layer)
    d = pd.read_csv(args.profile)
    d["model_ms"] = predict_obs(t, prm)
    d["ratio"] = d.time_ms / d.model_ms
    print(f"{args.profile}: {len(d)} points, {d.num_layers.iloc[0]} layers of {d.model.iloc[0]}, "
          f"{d.dtype.iloc[0]} on {d.device.iloc[0]}, timing {d.get('timing', pd.Series(['-'])).iloc[0]}; "
          f"model: {args.fit} on {prm.hardware}\n")
    print("measured ms\n" + table(d, "time_ms", 2) + "\n")
    print("model ms\n" + table(d, "model_ms", 2) + "\n")
    print("measured / model\n" + table(d, "ratio", 2) + "\n")
    busy = d.tokens_per_seq >= args.busy_tokens
    ape = (d.time_ms - d.model_ms).abs() / d.time_ms * 100
    print(f"tokens >= {args.busy_tokens} ({busy.sum()} points): measured / model median {d.ratio[busy].median():.3f} "
          f"(range {d.ratio[busy].min():.3f}..{d.ratio[busy].max():.3f}); APE median {ape[busy].median():.1f}%")
    small = d.tokens_per_seq <= args.floor_tokens
    per_layer = d.time_ms[small] / d.num_layers[small]
    print(f"tokens <= {args.floor_tokens} ({small.sum()} points): measured median {d.time_ms[small].median():.2f} ms "
          f"(P10 {np.percentile(d.time_ms[small], 10):.2f}, P90 {np.percentile(d.time_ms[small], 90):.2f}), "
          f"{per_layer.median():.3f} ms per layer; model median {d.model_ms[small].median():.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
