"""The terminal table of one run, or of several policies side by side with ratios to the first."""

from __future__ import annotations

# (label, getter, format); ratios are printed for every row whose format is numeric
_ROWS = [
    ("requests", lambda s: s["requests"], "{:,.0f}"),
    ("makespan (s)", lambda s: s["makespan_s"], "{:,.1f}"),
    ("throughput (tok/s)", lambda s: s["throughput_tok_s"], "{:,.1f}"),
    ("goodput (tok/s)", lambda s: s["goodput_tok_s"], "{:,.1f}"),
    ("SLO attainment", lambda s: 100 * s["slo_attainment"], "{:.1f}%"),
    ("MAT (tokens/step)", lambda s: s["mat"], "{:.2f}"),
    ("verification waste", lambda s: 100 * s["verification_waste"], "{:.1f}%"),
    ("mean batch", lambda s: s["mean_batch"], "{:.1f}"),
    ("preemptions", lambda s: s["preemptions"], "{:,.0f}"),
    ("step time (ms)", lambda s: s["step_ms_mean"], "{:.2f}"),
    ("  draft / verify", lambda s: (100 * s["step_split"]["draft"],
                                    100 * (s["step_split"]["verify"] + s["step_split"]["lm_head"])),
     "{:.0f}% / {:.0f}%"),
]
for _name in ("ttft", "tpot", "e2e"):
    for _stat in ("mean", "p50", "p90", "p99"):
        _ROWS.append((f"{_name.upper()} {_stat} (ms)", lambda s, n=_name, q=_stat: s[f"{n}_ms"][q], "{:,.1f}"))


def _cell(fmt: str, value) -> str:
    return fmt.format(*value) if isinstance(value, tuple) else fmt.format(value)


def format_table(summaries: dict[str, dict], title: str = "") -> str:
    """One column per run (name -> summary); with several, a ratio column per run against the first."""
    names = list(summaries)
    base = summaries[names[0]]
    header = ["metric", *names] + [f"{n}/{names[0]}" for n in names[1:]]
    rows = []
    for label, get, fmt in _ROWS:
        values = [get(summaries[n]) for n in names]
        row = [label] + [_cell(fmt, v) for v in values]
        for v in values[1:]:
            b = get(base)
            if isinstance(v, tuple) or not b:
                row.append("")
            else:
                row.append(f"{v / b:.2f}x")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in  # noqa: E731
                               enumerate(zip(r, widths, strict=True)))
    out = [title] if title else []
    out += [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_speed(summary: dict) -> str:
    sim = summary.get("sim", {})
    return (f"simulated {sim.get('simulated_s', 0):,.1f} s in {sim.get('wall_s', 0):,.2f} s wall "
            f"({sim.get('speedup', 0):,.0f}x real time, {sim.get('events_per_s', 0):,.0f} events/s, "
            f"{sim.get('requests_per_s', 0):,.0f} requests/s; core: {summary['speculation']['core']})")
