"""What-if: several policies against load on one cluster. Throughput, goodput, latency percentiles and MAT per
policy, where a static tree falls below plain decoding, verification waste, cost per million tokens, and the
best policy per load. Every number comes from echosim.sweep.run_sweep (what `echosim sweep` runs)."""

from __future__ import annotations

import json

import altair as alt
import pandas as pd
import streamlit as st

from dashboards.common import cache_dir, inspect_trace, save_upload, show_error, sweep_table
from echosim.spec.errors import InputError

POLICY_NAMES = ["ar", "eagle3", "eagle2", "echo", "echo_dense", "echo_fixed", "ddd", "opt_tree", "tetris",
                "smartspec"]
DEFAULT_POLICIES = ["ar", "eagle3", "echo"]
MODELS = ["qwen3-8b", "llama-3.1-8b", "qwen3-32b", "llama-3.3-70b", "qwen3-235b-a22b", "vicuna-13b"]
HARDWARE = ["h100", "h200", "a100-80gb"]
SAMPLES = ["azure_conv_2023_5min", "synthetic_bursty_4rps"]
# the default view: the paper's closed loop, short requests so that it renders in about a second
DEFAULT_LOADS = {"closed": "1,8,32,64", "rate": "1,4,16", "trace": "0.5,1,2,4"}


def _numbers(text: str, kind=float) -> list:
    try:
        values = [kind(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"expected comma-separated numbers, got {text!r}", field="loads") from None
    if not values or any(v <= 0 for v in values):
        raise InputError(f"loads must be positive numbers, got {text!r}", field="loads")
    return values


def policy_knobs(name: str) -> dict:
    """Settings of one policy that differ from its defaults (the widgets show the defaults)."""
    cfg: dict = {}
    if name == "ar":
        return cfg
    with st.sidebar.expander(f"{name} settings"):
        if name in ("eagle3", "echo", "echo_dense", "echo_fixed", "tetris", "ddd"):
            d = {"steps": 8 if name == "ddd" else 5, "topk": 8}
            c1, c2 = st.columns(2)
            steps = c1.number_input("steps", 1, 16, d["steps"], key=f"{name}.steps")
            topk = c2.number_input("topk", 1, 16, d["topk"], key=f"{name}.topk")
            if steps != d["steps"]:
                cfg["steps"] = int(steps)
            if topk != d["topk"]:
                cfg["topk"] = int(topk)
        if name in ("eagle3", "echo", "echo_dense", "echo_fixed", "ddd"):
            default = 64 if name == "ddd" else 32
            n = st.number_input("num_draft_tokens (root included)", 2, 256, default, key=f"{name}.ndt")
            if n != default:
                cfg["num_draft_tokens"] = int(n)
        if name.startswith("echo"):
            rem = st.number_input("remaining_num_draft_tokens (truncated)", 1, 256, 20, key=f"{name}.rem")
            if rem != 20:
                cfg["remaining_num_draft_tokens"] = int(rem)
            gates = st.text_input("gates: [[depth, threshold], ...]", "[[3, 0.3]]", key=f"{name}.gates")
            try:
                g = json.loads(gates)
            except json.JSONDecodeError as exc:
                raise InputError(f"{name} gates: not valid JSON ({exc.msg})", field="gates") from None
            if g != [[3, 0.3]]:
                cfg["gates"] = g
        if name.startswith("echo") or name == "tetris":
            kinds = ["per_request", "fixed", "goodput"]
            c1, c2 = st.columns(2)
            kind = c1.selectbox("budget kind", kinds, key=f"{name}.bkind")
            tokens = c2.number_input("budget tokens", 1, 4096, 8 if name == "tetris" else 31, key=f"{name}.btok")
            if kind != "per_request" or tokens != (8 if name == "tetris" else 31):
                cfg["budget"] = {"kind": kind, "tokens": int(tokens)}
        if name == "ddd":
            theta = st.number_input("theta (log prob)", -20.0, 0.0, -2.0, 0.5, key="ddd.theta")
            if theta != -2.0:
                cfg["theta"] = float(theta)
        if name == "eagle2":
            total = st.number_input("total_tokens", 1, 256, 59, key="eagle2.total")
            if total != 59:
                cfg["total_tokens"] = int(total)
        if name == "opt_tree":
            nodes = st.number_input("num_nodes", 1, 256, 48, key="opt_tree.nodes")
            if nodes != 48:
                cfg["num_nodes"] = int(nodes)
    return cfg


def sidebar() -> tuple[dict, float]:
    """The sweep the widgets describe (the same mapping a sweep file holds) and the GPU-hour price."""
    sb = st.sidebar
    sb.header("Workload")
    mode = sb.radio("arrivals", ["closed loop (batch size)", "open loop (req/s)", "trace replay"], key="mode")
    spec: dict = {}
    if mode.startswith("trace"):
        source = sb.radio("trace", ["shipped sample", "upload"], horizontal=True, key="trace_source")
        if source == "upload":
            up = sb.file_uploader("trace file (native JSONL, Azure, Mooncake, BurstGPT, Vidur)", key="upload")
            if up is None:
                st.info("Upload a trace, or pick a shipped sample.")
                st.stop()
            path = save_upload(up.name, up.getvalue())
        else:
            from traces import sample_path

            path = sample_path(sb.selectbox("sample", SAMPLES, key="sample"))
        try:
            info = inspect_trace(str(path))   # raises the reader's one-line error on a malformed file
        except InputError as exc:
            if source != "upload":
                raise
            # name the file as the user knows it, not by its place in the cache
            raise InputError(str(exc).replace(str(path), up.name, 1)) from None
        sb.caption(f"{info['format']} trace: {info['requests']:,} requests over {info['duration_s']:.0f} s "
                   f"({info['rate_rps']:.2f} req/s)")
        spec["traces"] = [str(path)]
        spec["loads"] = _numbers(sb.text_input("load multipliers (x the trace's rate)", DEFAULT_LOADS["trace"],
                                               key="loads_trace"))
        n = sb.number_input("first N requests (0 = all)", 0, 1_000_000, 200, key="trace_requests")
        if n:
            spec["requests"] = int(n)
    else:
        closed = mode.startswith("closed")
        label = "concurrencies (= decode batch sizes)" if closed else "request rates (req/s)"
        loads = sb.text_input(label, DEFAULT_LOADS["closed" if closed else "rate"], key=f"loads_{closed}")
        spec["concurrency" if closed else "rates"] = _numbers(loads, int if closed else float)
        c1, c2 = sb.columns(2)
        spec["input_len"] = int(c1.number_input("input tokens", 1, 32768, 100, key="input_len"))
        spec["output_len"] = int(c2.number_input("output tokens", 2, 32768, 128, key="output_len"))
        if closed:
            spec["requests_per_slot"] = int(sb.number_input("requests per slot (requests = this x concurrency)",
                                                            1, 64, 2, key="per_slot"))
        else:
            spec["requests"] = int(sb.number_input("requests per load", 1, 100_000, 200, key="rate_requests"))
    sb.header("Cluster")
    spec["models"] = [sb.selectbox("model", MODELS, key="model")]
    spec["hardware"] = [sb.selectbox("GPU", HARDWARE, key="hardware")]
    c1, c2 = sb.columns(2)
    spec["tp"] = [int(c1.selectbox("TP", [1, 2, 4, 8], key="tp"))]
    spec["replicas"] = [int(c2.number_input("replicas", 1, 64, 1, key="replicas"))]
    sb.header("Policies")
    names = sb.multiselect("policies", POLICY_NAMES, DEFAULT_POLICIES, key="policies")
    extra = sb.text_input("more (as --compare-policies: NAME{JSON},...)", "", key="extra_policies")
    policies: list = []
    for name in names:
        knobs = policy_knobs(name)
        policies.append({"policy": name, **knobs} if knobs else name)
    if extra.strip():
        from echosim.sim.policy_spec import split_items

        policies += split_items(extra)
    if not policies:
        st.info("Pick at least one policy.")
        st.stop()
    spec["policies"] = policies
    sb.header("SLOs and cost")
    c1, c2 = sb.columns(2)
    spec["slo_ttft_ms"] = float(c1.number_input("TTFT SLO (ms)", 1.0, 1e6, 2000.0, key="slo_ttft"))
    spec["slo_tpot_ms"] = float(c2.number_input("TPOT SLO (ms)", 0.1, 1e5, 100.0, key="slo_tpot"))
    price = float(sb.number_input("GPU-hour price (USD)", 0.0, 1000.0, 2.5, 0.1, key="price"))
    spec["seeds"] = [int(sb.number_input("seed", 0, 2**31 - 1, 0, key="seed"))]
    return spec, price


def line_chart(df: pd.DataFrame, y: str, title: str, cross: pd.DataFrame | None = None, log_x: bool = False):
    x = alt.X("load:Q", title=df["load_kind"].iloc[0], scale=alt.Scale(type="log", base=2) if log_x else
              alt.Undefined)
    base = alt.Chart(df).mark_line(point=True).encode(x=x, y=alt.Y(f"{y}:Q", title=title),
                                                      color=alt.Color("policy:N", sort=None),
                                                      tooltip=["policy", "load", y])
    layers = [base]
    if cross is not None and len(cross.dropna(subset=["crossover_load"])):
        rules = alt.Chart(cross.dropna(subset=["crossover_load"])).mark_rule(strokeDash=[4, 3]).encode(
            x="crossover_load:Q", color=alt.Color("policy:N", sort=None), tooltip=["policy", "crossover_load"])
        layers.append(rules)
    return alt.layer(*layers).properties(title=title, height=260)


def results(table: pd.DataFrame, price: float) -> None:
    from echosim.sweep.advisor import advise
    from echosim.sweep.table import cost_per_million, crossovers

    df = table.groupby(["policy", "load", "load_kind"], sort=False).mean(numeric_only=True).reset_index()
    cross = crossovers(table)
    log_x = df["load_kind"].iloc[0] != "load" and df["load"].max() / df["load"].min() >= 8
    st.caption("policies: " + ", ".join(dict.fromkeys(table["policy"])) + f" | {len(table)} cells")
    behind = cross.dropna(subset=["crossover_load"])
    if len(behind):
        st.warning("Speculation stops paying (throughput below plain decoding, ar) at: " + "; ".join(
            f"**{r['policy']}** from {r['crossover_load']:.3g}" for r in behind.to_dict("records")))
    elif "ar" in set(table["policy"]) and len(cross):
        st.success("Every policy beats plain decoding at every load swept.")
    # the first tab is the default view; the others draw when opened
    tput, lat, acc, cost_tab, cells = st.tabs(["throughput & goodput", "latency", "MAT & waste", "cost",
                                               "all cells"])
    with tput:
        c1, c2 = st.columns(2)
        c1.altair_chart(line_chart(df, "throughput_tok_s", "throughput (tok/s)", cross, log_x), width="stretch")
        c2.altair_chart(line_chart(df, "goodput_tok_s", "goodput (tok/s, within SLOs)", cross, log_x),
                        width="stretch")
        st.subheader("Best policy per load (by goodput)")
        st.dataframe(advise(table)[["load", "best_policy", "goodput_tok_s", "runner_up", "gain_vs_runner_up",
                                    "gain_vs_ar", "best_config"]], hide_index=True)
    with lat:
        c1, c2 = st.columns(2)
        metric = c1.radio("latency", ["tpot_ms", "ttft_ms", "e2e_ms"], horizontal=True, key="lat_metric")
        q = c2.radio("percentile", ["p50", "p90", "p99", "mean"], horizontal=True, key="lat_q")
        st.altair_chart(line_chart(df, f"{metric}_{q}", f"{metric.split('_')[0].upper()} {q} (ms)", None, log_x),
                        width="stretch")
    with acc:
        c1, c2 = st.columns(2)
        c1.altair_chart(line_chart(df, "mat", "MAT (accepted tokens per step)", None, log_x), width="stretch")
        c2.altair_chart(line_chart(df, "verification_waste", "verification waste (rejected / verified)", None,
                                   log_x), width="stretch")
    with cost_tab:
        st.caption(f"USD per million output tokens at ${price:g} per GPU-hour, every GPU of the cluster billed")
        cost = cost_per_million(df, price).replace(float("inf"), None)
        c1, c2 = st.columns(2)
        c1.altair_chart(line_chart(cost, "usd_per_mtok", "USD / M tokens (all)", None, log_x), width="stretch")
        c2.altair_chart(line_chart(cost, "usd_per_mtok_good", "USD / M tokens (within SLOs)", None, log_x),
                        width="stretch")
    with cells:
        st.dataframe(table, hide_index=True)
        st.download_button("download CSV", table.to_csv(index=False), "whatif.csv", "text/csv")


def page() -> None:
    st.title("What-if: how much to speculate at this load")
    try:
        spec, price = sidebar()
        from echosim.sweep import parse_spec

        parse_spec(spec)  # bad settings: one line here, before anything runs
        table = sweep_table(spec, str(cache_dir()))
    except InputError as exc:
        show_error(exc)
        st.stop()
    results(table, price)


page()
