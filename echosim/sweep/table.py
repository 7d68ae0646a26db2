"""The sweep's tidy table: one row per cell, its labels then every metric of the run's summary, flattened
(ttft_ms_p99, step_split_draft, ...). Wall-clock figures stay out, so the same grid gives the same table on any
backend. Written as CSV and, where pyarrow is installed, parquet.

Also: where speculation stops paying (per policy, the lowest load at which its throughput falls below plain
decoding's, `ar`, in the same configuration)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

LABELS = ("key", "policy", "policy_name", "policy_config", "load_kind", "load", "model", "hardware", "tp",
          "replicas", "gpus", "trace", "seed")
# the columns that name a configuration apart from its policy and load
CONFIG_COLUMNS = ("load_kind", "model", "hardware", "tp", "replicas", "trace", "seed")


def summary_row(summary: dict) -> dict:
    """The run's metrics flattened to one level (nested dicts joined with '_'); no wall-clock values."""
    row: dict = {}
    for k, v in summary.items():
        if k in ("sim", "speculation", "routed"):
            continue
        if isinstance(v, dict):
            for sub, x in v.items():
                row[f"{k}_{sub}"] = x
        else:
            row[k] = v
    spec = summary.get("speculation", {})
    row["core"] = spec.get("core", "")
    return row


def to_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    first = [c for c in LABELS if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def write_table(df: pd.DataFrame, out: Path, stem: str = "sweep") -> dict[str, Path | str]:
    """<stem>.csv always; <stem>.parquet with pyarrow, else a note why not."""
    paths: dict[str, Path | str] = {"csv": out / f"{stem}.csv"}
    df.to_csv(paths["csv"], index=False)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        paths["parquet"] = "skipped: pyarrow is not installed (pip install 'echo-spec[parquet]')"
    else:
        paths["parquet"] = out / f"{stem}.parquet"
        df.to_parquet(paths["parquet"], index=False)
    return paths


def crossovers(df: pd.DataFrame, baseline: str = "ar", metric: str = "throughput_tok_s") -> pd.DataFrame:
    """Per configuration and policy: the load where the policy's `metric` falls below the baseline's, linearly
    interpolated between the swept loads (NaN where it never does, or no baseline was swept)."""
    cols = ["policy", *CONFIG_COLUMNS, "crossover_load", "last_load_ahead", "first_load_behind"]
    if df.empty or baseline not in set(df["policy"]):
        return pd.DataFrame(columns=cols)
    out = []
    for conf, g in df.groupby(list(CONFIG_COLUMNS), sort=False, dropna=False):
        base = g[g["policy"] == baseline].groupby("load")[metric].mean()
        for policy, gp in g[g["policy"] != baseline].groupby("policy", sort=False):
            mine = gp.groupby("load")[metric].mean()
            loads = sorted(set(mine.index) & set(base.index))
            ratio = np.array([mine[x] / base[x] if base[x] > 0 else np.nan for x in loads])
            cross, ahead, behind = np.nan, np.nan, np.nan
            for i, r in enumerate(ratio):
                if r < 1.0:
                    behind = loads[i]
                    if i == 0:
                        cross = loads[0]
                    else:
                        ahead = loads[i - 1]
                        r0 = ratio[i - 1]
                        cross = loads[i - 1] + (1.0 - r0) / (r - r0) * (loads[i] - loads[i - 1])
                    break
            out.append({"policy": policy, **dict(zip(CONFIG_COLUMNS, conf, strict=True)),
                        "crossover_load": cross, "last_load_ahead": ahead, "first_load_behind": behind})
    return pd.DataFrame(out, columns=cols)


def cost_per_million(df: pd.DataFrame, gpu_hour_usd: float) -> pd.DataFrame:
    """Serving cost in USD per million output tokens from a GPU-hour price: every GPU of the cell (tp x replicas)
    billed for the time it takes to emit a million tokens at the cell's throughput (and, counting only tokens
    of requests within the SLOs, at its goodput)."""
    out = df.copy()
    usd_per_s = gpu_hour_usd * out["gpus"] / 3600.0
    with np.errstate(divide="ignore"):
        out["usd_per_mtok"] = np.where(out["throughput_tok_s"] > 0, usd_per_s / out["throughput_tok_s"] * 1e6,
                                       np.inf)
        out["usd_per_mtok_good"] = np.where(out["goodput_tok_s"] > 0, usd_per_s / out["goodput_tok_s"] * 1e6,
                                            np.inf)
    return out
