"""Policy advisor: per configuration and load level, the best policy and settings among those swept, by goodput
(output tokens/s of the requests that met both SLOs), with the runner-up and plain decoding for scale.

For a closed-loop sweep the load is the concurrency, which is the decode batch size: the table reads as a
batch-size -> policy-config schedule a serving engineer can apply (the paper's per-batch-size SGLang settings
play the same part)."""

from __future__ import annotations

import json

import pandas as pd

from echosim.sweep.table import CONFIG_COLUMNS

ADVICE_COLUMNS = [*CONFIG_COLUMNS, "load", "best_policy", "best_config", "goodput_tok_s", "throughput_tok_s",
                  "slo_attainment", "mat", "runner_up", "runner_up_goodput_tok_s", "gain_vs_runner_up",
                  "ar_goodput_tok_s", "gain_vs_ar"]


def advise(df: pd.DataFrame, metric: str = "goodput_tok_s") -> pd.DataFrame:
    """One row per configuration and load: the policy with the highest mean `metric` over seeds (ties: the
    policy listed first in the sweep)."""
    if df.empty:
        return pd.DataFrame(columns=ADVICE_COLUMNS)
    conf_cols = [c for c in CONFIG_COLUMNS if c != "seed"]
    order = {p: i for i, p in enumerate(dict.fromkeys(df["policy"]))}
    keys = [*conf_cols, "load"]
    # one pass: mean over seeds per (configuration, load, policy); then the best per (configuration, load)
    per = df.groupby([*keys, "policy"], sort=False, dropna=False)[
        [metric, "throughput_tok_s", "slo_attainment", "mat"]].mean().reset_index()
    configs = df.groupby([*keys, "policy"], sort=False, dropna=False)["policy_config"].first().reset_index()
    per["policy_config"] = configs["policy_config"].to_numpy()
    per["order"] = per["policy"].map(order)
    per = per.sort_values([metric, "order"], ascending=[False, True], kind="stable")
    out = []
    for conf, g in per.groupby(keys, sort=False, dropna=False):
        best = g.iloc[0]
        second = g.iloc[1] if len(g) > 1 else None
        ar = g[g["policy"] == "ar"]
        ar_good = float(ar[metric].iloc[0]) if len(ar) else float("nan")
        row = dict(zip(keys, conf, strict=True))
        row.update({"seed": "mean", "best_policy": best["policy"], "best_config": best["policy_config"],
                    "goodput_tok_s": float(best[metric]), "throughput_tok_s": float(best["throughput_tok_s"]),
                    "slo_attainment": float(best["slo_attainment"]), "mat": float(best["mat"]),
                    "runner_up": second["policy"] if second is not None else "",
                    "runner_up_goodput_tok_s": float(second[metric]) if second is not None else float("nan"),
                    "gain_vs_runner_up": _ratio(best[metric], second[metric] if second is not None else None),
                    "ar_goodput_tok_s": ar_good, "gain_vs_ar": _ratio(best[metric], ar_good)})
        out.append(row)
    # in the order the sweep lists its configurations and loads
    first = {k: i for i, k in enumerate(dict.fromkeys(map(tuple, df[keys].astype(str).to_numpy())))}
    out.sort(key=lambda r: first[tuple(str(r[k]) for k in keys)])
    return pd.DataFrame(out, columns=ADVICE_COLUMNS)


def _ratio(a, b) -> float:
    if b is None or not b == b or b <= 0:
        return float("nan")
    return round(float(a) / float(b), 4)


def schedule(advice: pd.DataFrame) -> list[dict]:
    """The advice as a list of {configuration, load, policy config} entries (what advice.json holds)."""
    out = []
    for r in advice.to_dict("records"):
        out.append({**{k: r[k] for k in CONFIG_COLUMNS if k != "seed"}, "load": r["load"],
                    "policy": json.loads(r["best_config"]), "label": r["best_policy"],
                    "goodput_tok_s": r["goodput_tok_s"], "gain_vs_ar": None if r["gain_vs_ar"] != r["gain_vs_ar"]
                    else r["gain_vs_ar"]})
    return out
