"""Synthetic workloads: arrival processes, request lengths, time scaling, and the paper's closed-loop setting.

Everything is deterministic given `seed` (NumPy's PCG64 via default_rng)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from traces.errors import TraceError
from traces.request import TraceArrays

# --- arrivals -------------------------------------------------------------------------------------


def poisson_arrivals(n: int, rate_rps: float, *, seed: int = 0) -> np.ndarray:
    """Arrival times (s) of a Poisson process: exponential gaps of mean 1/rate; the first is one gap in."""
    return gamma_arrivals(n, rate_rps, cv=1.0, seed=seed)


def gamma_arrivals(n: int, rate_rps: float, *, cv: float, seed: int = 0) -> np.ndarray:
    """Arrival times (s) with gamma-distributed gaps: mean 1/rate, coefficient of variation `cv`.
    cv = 1 is Poisson; cv > 1 is bursty (clusters of close arrivals, then long pauses); cv < 1 is regular."""
    _positive(rate_rps, "rate_rps")
    _positive(cv, "cv")
    rng = np.random.default_rng(seed)
    if cv == 1.0:
        gaps = rng.exponential(1.0 / rate_rps, size=n)
    else:
        shape = 1.0 / cv**2                       # gamma: CV = 1/sqrt(shape), mean = shape * scale
        gaps = rng.gamma(shape, 1.0 / (rate_rps * shape), size=n)
    return np.cumsum(gaps)


# --- lengths --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution. kind: "fixed" (mean), "uniform" (low..high inclusive) or "lognormal"
    (mean and cv, clipped to low..high)."""

    kind: str
    mean: float = 0.0
    cv: float = 1.0
    low: int = 1
    high: int = 1_000_000

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "fixed":
            _positive(self.mean, "mean")
            return np.full(n, int(round(self.mean)), dtype=np.int64)
        if self.kind == "uniform":
            if not 1 <= self.low <= self.high:
                raise TraceError(f"uniform lengths need 1 <= low <= high, got {self.low}..{self.high}")
            return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)
        if self.kind == "lognormal":
            _positive(self.mean, "mean")
            _positive(self.cv, "cv")
            sigma2 = np.log1p(self.cv**2)             # lognormal with the given mean and CV
            x = rng.lognormal(np.log(self.mean) - sigma2 / 2, np.sqrt(sigma2), size=n)
            return np.clip(np.rint(x), max(self.low, 1), self.high).astype(np.int64)
        raise TraceError(f"unknown length distribution '{self.kind}' (fixed, uniform, lognormal)",
                        field="kind")


Lengths = int | LengthDist


def _as_dist(x: Lengths) -> LengthDist:
    return x if isinstance(x, LengthDist) else LengthDist("fixed", mean=x)


def lengths_from_trace(trace: TraceArrays, n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, output) pairs drawn with replacement from a trace, keeping each pair together."""
    if len(trace) == 0:
        raise TraceError("cannot sample lengths from an empty trace")
    idx = np.random.default_rng(seed).integers(0, len(trace), size=n)
    return trace.prompt_tokens[idx], trace.output_tokens[idx]


# --- whole workloads ------------------------------------------------------------------------------


def synthetic_trace(n: int, *, rate_rps: float, cv: float = 1.0, prompt_tokens: Lengths = 100,
                    output_tokens: Lengths = 500, lengths_from: TraceArrays | None = None,
                    dataset: str | None = None, seed: int = 0) -> TraceArrays:
    """n requests arriving at `rate_rps` (Poisson when cv = 1, gamma otherwise). Lengths are fixed ints,
    `LengthDist`s, or pairs resampled from `lengths_from` (which then overrides prompt/output_tokens)."""
    if n < 0:
        raise TraceError(f"n must be >= 0, got {n}", field="n")
    arrival = gamma_arrivals(n, rate_rps, cv=cv, seed=seed)
    rng = np.random.default_rng([seed, 1])       # an independent stream for lengths
    if lengths_from is not None:
        prompt, output = lengths_from_trace(lengths_from, n, seed=int(rng.integers(2**31)))
    else:
        prompt, output = _as_dist(prompt_tokens).sample(n, rng), _as_dist(output_tokens).sample(n, rng)
    trace = TraceArrays(arrival, prompt, output, format="synthetic")
    if dataset is not None:
        trace.dataset = [dataset] * n
    return trace


def scale_time(trace: TraceArrays, time_scale: float) -> TraceArrays:
    """Arrival times multiplied by `time_scale`: 0.5 replays the trace at twice its rate, 2 at half."""
    _positive(time_scale, "time_scale")
    return trace.with_arrivals(trace.arrival_s * time_scale)


def scale_rate(trace: TraceArrays, rate_factor: float) -> TraceArrays:
    """The trace replayed `rate_factor` times faster (2 = twice its request rate)."""
    _positive(rate_factor, "rate_factor")
    return scale_time(trace, 1.0 / rate_factor)


def at_rate(trace: TraceArrays, rate_rps: float) -> TraceArrays:
    """The trace rescaled in time so that its mean rate ((n-1) / duration) is `rate_rps`."""
    _positive(rate_rps, "rate_rps")
    if len(trace) < 2 or trace.duration_s <= 0:
        raise TraceError("a trace needs two distinct arrival times to be rescaled to a rate")
    return scale_time(trace, (len(trace) - 1) / trace.duration_s / rate_rps)


@dataclass
class ClosedLoop:
    """A closed-loop workload: `concurrency` requests in flight at all times. Request i+C is issued when one
    of the running requests finishes, so arrival_s is 0 everywhere: the simulator feeds the loop."""

    concurrency: int
    requests: TraceArrays


def closed_loop(n: int, concurrency: int, *, prompt_tokens: Lengths = 100, output_tokens: Lengths = 500,
                lengths_from: TraceArrays | None = None, seed: int = 0) -> ClosedLoop:
    if concurrency < 1:
        raise TraceError(f"concurrency must be >= 1, got {concurrency}", field="concurrency")
    if n < concurrency:
        raise TraceError(f"a closed loop at concurrency {concurrency} needs at least {concurrency} requests, "
                        f"got {n}", field="n")
    trace = synthetic_trace(n, rate_rps=1.0, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                            lengths_from=lengths_from, seed=seed)
    trace.arrival_s = np.zeros(n)
    trace.format = "closed_loop"
    return ClosedLoop(concurrency, trace)


def paper_closed_loop(concurrency: int, n: int) -> ClosedLoop:
    """The paper's "batch size" experiments: concurrency C, every request input 100 / output 500 tokens."""
    return closed_loop(n, concurrency, prompt_tokens=100, output_tokens=500)


def _positive(x: float, name: str) -> None:
    if not (np.isfinite(x) and x > 0):
        raise TraceError(f"{name} must be a positive number, got {x}", field=name)
