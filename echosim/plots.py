"""PNG plots beside a run folder's CSVs (matplotlib, drawn on Figure objects with the Agg canvas: no display,
no pyplot state, safe in worker processes and in the dashboard's threads).

- plot_run(folder): a simulator or replay run folder (requests.csv, iterations.csv if any) ->
  throughput_latency.png (output tokens/s and TTFT/TPOT over time), batch_mat.png (decode batch size and MAT over
  time), latency_cdf.png (TTFT, TPOT, E2E);
- plot_sweep(table, folder): per configuration, throughput / goodput / TPOT / MAT against load per policy, with the
  load where each policy's throughput falls below plain decoding's marked;
- plot_capacity(table, folder): capacity per policy;
- plot_validate(folder): an `echosim validate` folder -> validation.png (measured against simulated per metric)
  and validation_cdf.png (their latency CDFs), plus each side's own run plots.

Every function returns the paths it wrote; the figure functions (run_figures, sweep_figure, ...) return Figures for
the dashboard. This module reads files and tables only: it imports nothing of the simulator or the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E"))
DPI = 110


def _figure(w: float = 10.0, h: float = 4.0, rows: int = 1, cols: int = 2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _bins(t0: float, t1: float, n: int = 60) -> np.ndarray:
    span = max(t1 - t0, 1e-6)
    return np.linspace(t0, t0 + span, n + 1)


def _read(path: Path, columns: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    df = pd.read_csv(path, usecols=lambda c: c in columns)
    return df


# --- one run -------------------------------------------------------------------------------------------------


def run_figures(folder: str | Path, title: str = "") -> dict:
    """name -> Figure for a run folder (names: throughput_latency, batch_mat, latency_cdf)."""
    folder = Path(folder)
    req = _read(folder / "requests.csv", ["arrival_s", "first_token_s", "finish_s", "output_tokens", "ttft_ms",
                                          "tpot_ms", "e2e_ms", "steps", "accepted"])
    its = _read(folder / "iterations.csv", ["end_s", "batch", "accepted"])
    figs: dict = {}
    if req is None or req.empty:
        return figs
    req = req[req["finish_s"].notna() & (req["finish_s"] >= 0)] if "finish_s" in req else req
    title = title or folder.name

    t0 = float(req["arrival_s"].min())
    t1 = float(req["finish_s"].max())
    edges = _bins(t0, t1)
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]

    fig, ax = _figure(11, 4)
    if its is not None and not its.empty:  # tokens emitted per decode iteration: (accepted drafts + 1) per request
        tokens = its["batch"].to_numpy() + its["accepted"].to_numpy()
        tput, _ = np.histogram(its["end_s"], bins=edges, weights=tokens)
        ax[0, 0].set_ylabel("decode tokens/s")
    else:  # replay folders: a request's tokens counted when it finishes
        tput, _ = np.histogram(req["finish_s"], bins=edges, weights=req["output_tokens"])
        ax[0, 0].set_ylabel("output tokens/s (by finish)")
    ax[0, 0].plot(centres - t0, tput / width, color="tab:blue")
    ax[0, 0].set_xlabel("time (s)")
    ax[0, 0].set_title("throughput over time")
    done = req.sort_values("finish_s")
    ax2 = ax[0, 1]
    shown = [(c, n) for c, n in LATENCIES[:2] if c in done and done[c].notna().any()] or \
        [(c, n) for c, n in LATENCIES[2:] if c in done and done[c].notna().any()]  # unstreamed replays: E2E
    for col, name in shown:
        k = max(1, len(done) // 50)
        ax2.plot(done["finish_s"] - t0, done[col].rolling(k, min_periods=1).median(), label=f"{name} (ms)")
    if shown:
        ax2.set_yscale("log")
        ax2.legend(loc="best", fontsize=8)
    ax2.set_xlabel("finish time (s)")
    ax2.set_title("latency over time (rolling median)")
    fig.suptitle(title)
    figs["throughput_latency"] = fig

    if its is not None and not its.empty:
        dec = its[its["batch"] > 0]
        fig, ax = _figure(11, 4)
        n, _ = np.histogram(dec["end_s"], bins=edges)
        b, _ = np.histogram(dec["end_s"], bins=edges, weights=dec["batch"])
        a, _ = np.histogram(dec["end_s"], bins=edges, weights=dec["accepted"])
        with np.errstate(invalid="ignore", divide="ignore"):
            ax[0, 0].plot(centres - t0, np.where(n > 0, b / n, np.nan), color="tab:green")
            ax[0, 1].plot(centres - t0, np.where(b > 0, (a + b) / b, np.nan), color="tab:purple")
        ax[0, 0].set_title("decode batch size over time")
        ax[0, 0].set_ylabel("requests per decode iteration")
        ax[0, 1].set_title("MAT over time")
        ax[0, 1].set_ylabel("accepted tokens per request-step (incl. bonus)")
        for x in ax[0]:
            x.set_xlabel("time (s)")
        fig.suptitle(title)
        figs["batch_mat"] = fig

    elif "steps" in req.columns:  # a replay: requests in flight (the server's batch, bounded above) and MAT
        fig, ax = _figure(11, 4)
        starts, ends = np.sort(req["arrival_s"].to_numpy()), np.sort(req["finish_s"].to_numpy())
        inflight = np.searchsorted(starts, centres, side="right") - np.searchsorted(ends, centres, side="right")
        ax[0, 0].plot(centres - t0, inflight, color="tab:green")
        ax[0, 0].set_title("requests in flight over time")
        ax[0, 0].set_ylabel("requests (sent, not finished)")
        dec = req[req["steps"].fillna(0) > 0]
        st, _ = np.histogram(dec["finish_s"], bins=edges, weights=dec["steps"])
        ac, _ = np.histogram(dec["finish_s"], bins=edges, weights=dec["accepted"])
        with np.errstate(invalid="ignore", divide="ignore"):
            ax[0, 1].plot(centres - t0, np.where(st > 0, (ac + st) / st, np.nan), "o-", ms=2, color="tab:purple")
        ax[0, 1].set_title("MAT over time (by finish)")
        ax[0, 1].set_ylabel("accepted tokens per verify step (incl. bonus)")
        for x in ax[0]:
            x.set_xlabel("time (s)")
        fig.suptitle(title)
        figs["batch_mat"] = fig

    fig, ax = _figure(13, 3.8, 1, 3)
    for i, (col, name) in enumerate(LATENCIES):
        x = np.sort(req[col].dropna().to_numpy()) if col in req else np.zeros(0)
        if len(x):
            ax[0, i].plot(x, np.arange(1, len(x) + 1) / len(x))
            for q in (50, 90, 99):
                ax[0, i].axvline(np.percentile(x, q), ls=":", lw=0.8, color="grey")
        ax[0, i].set_xlabel(f"{name} (ms)")
        ax[0, i].set_ylabel("share of requests")
        ax[0, i].set_title(f"{name} CDF (P50 / P90 / P99 dotted)")
    fig.suptitle(title)
    figs["latency_cdf"] = fig
    return figs


def plot_run(folder: str | Path, title: str = "") -> list[Path]:
    folder = Path(folder)
    return [_save(fig, folder / f"{name}.png") for name, fig in run_figures(folder, title).items()]


# --- sweeps --------------------------------------------------------------------------------------------------

SWEEP_PANELS = (("throughput_tok_s", "throughput (tok/s)"), ("goodput_tok_s", "goodput (tok/s)"),
                ("tpot_ms_p50", "TPOT P50 (ms)"), ("mat", "MAT (tokens/step)"))
LOAD_NAMES = {"rate": "request rate (req/s)", "concurrency": "concurrency (= batch size)",
              "load": "load (x the trace's rate)"}


def sweep_figure(df: pd.DataFrame, crossover: pd.DataFrame | None = None, title: str = "",
                 panels=SWEEP_PANELS):
    """One configuration's sweep: each panel a metric against load, a line per policy (mean over seeds); a
    dashed vertical line where a policy's throughput falls below plain decoding's."""
    fig, axes = _figure(11, 7.5 if len(panels) > 2 else 4, (len(panels) + 1) // 2, 2)
    kind = str(df["load_kind"].iloc[0]) if "load_kind" in df and len(df) else "load"
    colors: dict = {}
    for i, (col, name) in enumerate(panels):
        ax = axes[i // 2, i % 2]
        for policy, g in df.groupby("policy", sort=False):
            m = g.groupby("load")[col].mean().sort_index()
            (line,) = ax.plot(m.index, m.to_numpy(), marker="o", ms=3, label=policy, color=colors.get(policy))
            colors[policy] = line.get_color()
        ax.set_xlabel(LOAD_NAMES.get(kind, kind))
        ax.set_title(name)
        if kind in ("rate", "concurrency") and df["load"].max() / max(df["load"].min(), 1e-9) >= 8:
            ax.set_xscale("log", base=2)
    if crossover is not None:
        for r in crossover.dropna(subset=["crossover_load"]).to_dict("records"):
            for ax in axes.flat[: len(panels)]:
                ax.axvline(r["crossover_load"], ls="--", lw=1, color=colors.get(r["policy"], "grey"))
    axes[0, 0].legend(fontsize=8, loc="best")
    note = ""
    if crossover is not None and len(crossover):
        parts = [f"{r['policy']} at {r['crossover_load']:.3g}" for r in crossover.to_dict("records")
                 if r["crossover_load"] == r["crossover_load"]]
        note = ("speculation stops paying (throughput < ar): " + ", ".join(parts)) if parts else \
            "speculation pays at every swept load"
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    return fig


def _config_title(conf: dict) -> str:
    trace = f", trace {conf['trace']}" if conf.get("trace") else ""
    return (f"{conf['model']} on {conf['replicas']} x TP{conf['tp']} x {conf['hardware']}{trace}, "
            f"seed {conf['seed']}")


def plot_sweep(df: pd.DataFrame, out: str | Path, crossover: pd.DataFrame | None = None,
               group_by: tuple[str, ...] = ("load_kind", "model", "hardware", "tp", "replicas", "trace", "seed")
               ) -> list[Path]:
    """A figure per configuration (the `group_by` columns): sweep.png for one, sweep_<i>.png for several."""
    out = Path(out)
    groups = list(df.groupby(list(group_by), sort=False, dropna=False))
    paths = []
    for i, (conf, g) in enumerate(groups):
        c = dict(zip(group_by, conf, strict=True))
        cross = None
        if crossover is not None and len(crossover):
            sel = np.ones(len(crossover), bool)
            for k, v in c.items():
                sel &= (crossover[k].astype(str) == str(v)).to_numpy()
            cross = crossover[sel]
        name = "sweep.png" if len(groups) == 1 else f"sweep_{i}.png"
        paths.append(_save(sweep_figure(g, cross, _config_title(c)), out / name))
    return paths


def capacity_figure(df: pd.DataFrame):
    fig, axes = _figure(8, 4, 1, 1)
    ax = axes[0, 0]
    labels = [f"{r['policy']}\n{r['model']} TP{r['tp']} {r['hardware']}" if df["model"].nunique() > 1 else
              str(r["policy"]) for r in df.to_dict("records")]
    values = df["capacity"].astype(float).fillna(0.0).to_numpy()
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    search = str(df["search"].iloc[0]) if len(df) else "rate"
    ax.set_ylabel("highest passing rate (req/s)" if search == "rate" else "fewest replicas")
    target = float(df["target"].iloc[0]) if len(df) else 0.0
    ax.set_title(f"capacity: SLO attainment >= {target:g}" + (f", tolerance {df['tol'].iloc[0]:g}"
                                                             if search == "rate" else ""))
    return fig


def plot_capacity(df: pd.DataFrame, out: str | Path) -> list[Path]:
    return [_save(capacity_figure(df), Path(out) / "capacity.png")]


# --- validation ----------------------------------------------------------------------------------------------


def validate_figure(rows: list[dict], title: str = ""):
    """Measured (engine) against simulated per metric: grouped bars normalised to the measured value, with the
    signed error written above each pair."""
    rows = [r for r in rows if r.get("engine") is not None and r.get("sim") is not None]
    fig, axes = _figure(12, 4.2, 1, 1)
    ax = axes[0, 0]
    x = np.arange(len(rows))
    ref = np.array([r["engine"] if r["engine"] else 1.0 for r in rows], dtype=float)
    ax.bar(x - 0.2, np.array([r["engine"] for r in rows], float) / ref, 0.4, label="measured", color="tab:grey")
    ax.bar(x + 0.2, np.array([r["sim"] for r in rows], float) / ref, 0.4, label="simulated", color="tab:blue")
    for i, r in enumerate(rows):
        if r.get("signed_pct") is not None:
            ax.text(i, max(1.0, r["sim"] / ref[i]) + 0.03, f"{r['signed_pct']:+.1f}%", ha="center", fontsize=7)
    ax.set_xticks(x, [r["metric"].replace("_ms", "") for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("value / measured")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.legend(fontsize=8)
    ax.set_title(title or "measured against simulated (signed error above each pair)")
    return fig


def validate_cdf_figure(folder: str | Path):
    folder = Path(folder)
    fig, ax = _figure(13, 3.8, 1, 3)
    # the measured side: engine/ (validate) or replay/ (validate --replay of a bench_serving file)
    measured = "engine" if (folder / "engine" / "requests.csv").is_file() else "replay"
    for side, name, style in ((measured, "measured", "-"), ("sim", "simulated", "--")):
        req = _read(folder / side / "requests.csv", [c for c, _ in LATENCIES])
        if req is None:
            continue
        for i, (col, lat) in enumerate(LATENCIES):
            v = np.sort(req[col].dropna().to_numpy())
            if len(v):
                ax[0, i].plot(v, np.arange(1, len(v) + 1) / len(v), style, label=name)
            ax[0, i].set_xlabel(f"{lat} (ms)")
            ax[0, i].set_title(f"{lat} CDF")
    ax[0, 0].legend(fontsize=8)
    ax[0, 0].set_ylabel("share of requests")
    return fig


def plot_validate(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    result = json.loads((folder / "validation.json").read_text())
    paths = [_save(validate_figure(result["metrics"], f"{folder.name}: measured against simulated"),
                   folder / "validation.png"),
             _save(validate_cdf_figure(folder), folder / "validation_cdf.png")]
    for side in ("engine", "replay", "sim"):
        if (folder / side / "requests.csv").is_file():
            paths += plot_run(folder / side, f"{folder.name} / {side}")
    return paths


# --- one step ------------------------------------------------------------------------------------------------


def step_figure(view):
    """One step's super-tree (echosim.sim.step_view.StepView): verified nodes per request and depth, the depth
    the target accepted, and each request's verified drafts split into depth and width."""
    order = np.argsort(view.difficulty, kind="stable")
    sel = view.selected[order]
    B, D = sel.shape
    fig, axes = _figure(12, max(3.0, min(9.0, 1.2 + 0.12 * B)), 1, 2)
    ax = axes[0, 0]
    im = ax.imshow(sel, aspect="auto", cmap="Blues", interpolation="nearest", vmin=0,
                   extent=(0.5, D + 0.5, B - 0.5, -0.5))
    from matplotlib.ticker import MaxNLocator

    acc = view.accepted[order]
    hit = acc > 0
    ax.scatter(acc[hit], np.arange(B)[hit], s=14, color="tab:orange", zorder=3,
               label="deepest accepted draft (none: bonus token only)")
    ax.set_xlim(0.5, D + 0.5)
    ax.set_xlabel("draft depth")
    ax.set_ylabel("request (easiest first)")
    ax.set_xticks(range(1, D + 1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("verified nodes per request and depth")
    ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(im, ax=ax, label="nodes verified")
    ax = axes[0, 1]
    depth, width = view.depth_tokens[order], view.width_tokens[order]
    y = np.arange(B)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.barh(y, depth, color="tab:blue", label="depth (one per level)")
    ax.barh(y, width, left=depth, color="tab:cyan", label="width (siblings)")
    ax.invert_yaxis()
    ax.set_xlabel("verified drafts")
    ax.set_title("budget per request: depth vs width")
    ax.legend(loc="lower right", fontsize=8)
    s = view.summary()
    fig.suptitle(f"{view.policy.get('policy', '')}, batch {B}: {s['verified_tokens']} tokens verified "
                 f"({s['depth_tokens']} depth, {s['width_tokens']} width, {B} roots), {s['accepted_drafts']} "
                 f"drafts accepted, MAT {s['mat']:.2f}", fontsize=10)
    return fig
