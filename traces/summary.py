"""Summary statistics of a trace, as printed by `echosim trace inspect`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from traces.formats import FORMATS
from traces.request import TraceArrays


@dataclass
class LengthStats:
    mean: float
    p50: float
    p90: float
    p99: float
    max: int

    @staticmethod
    def of(x: np.ndarray) -> LengthStats:
        if len(x) == 0:
            return LengthStats(float("nan"), float("nan"), float("nan"), float("nan"), 0)
        p50, p90, p99 = np.percentile(x, [50, 90, 99])
        return LengthStats(float(x.mean()), float(p50), float(p90), float(p99), int(x.max()))


@dataclass
class TraceSummary:
    format: str
    requests: int
    duration_s: float          # last arrival - first arrival
    rate_rps: float            # (requests - 1) / duration: 1 / mean gap between arrivals
    prompt_tokens: LengthStats
    output_tokens: LengthStats
    bad_lines: int = 0
    failed_requests: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(trace: TraceArrays) -> TraceSummary:
    n = len(trace)
    duration = trace.duration_s
    rate = (n - 1) / duration if n > 1 and duration > 0 else float("nan")
    stats = trace.stats
    return TraceSummary(trace.format, n, duration, rate, LengthStats.of(trace.prompt_tokens),
                        LengthStats.of(trace.output_tokens), stats.bad_lines if stats else 0,
                        stats.failed_requests if stats else 0)


def format_summary(s: TraceSummary, path: str = "") -> str:
    fmt = FORMATS.get(s.format)
    lines = [
        f"trace      {path}",
        f"format     {s.format}" + (f" ({fmt.description})" if fmt else ""),
        f"requests   {s.requests:,}",
        f"duration   {s.duration_s:,.1f} s ({s.duration_s / 60:,.1f} min)",
        f"rate       {s.rate_rps:,.3f} req/s",
    ]
    if s.bad_lines:
        lines.append(f"bad lines  {s.bad_lines:,} skipped")
    if s.failed_requests:
        lines.append(f"failed     {s.failed_requests:,} logged failures dropped (0 output tokens)")
    lines.append("")
    lines.append(f"{'tokens':<8}{'mean':>10}{'P50':>9}{'P90':>9}{'P99':>9}{'max':>9}")
    for name, st in (("prompt", s.prompt_tokens), ("output", s.output_tokens)):
        lines.append(f"{name:<8}{st.mean:>10.1f}{st.p50:>9.0f}{st.p90:>9.0f}{st.p99:>9.0f}{st.max:>9d}")
    return "\n".join(lines)
