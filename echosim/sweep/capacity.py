"""Capacity search: the highest request rate whose SLO attainment meets a target, or the fewest replicas that
carry a given rate, by bracketing then bisection.

Attainment is the share of requests that meet both SLOs (TTFT <= slo_ttft_ms and TPOT <= slo_tpot_ms, as in the
summary's slo_attainment); a target of 0.99 means at least 99% of requests meet both, so P99 TTFT and P99 TPOT
are within their SLOs. Every probe reuses the configuration's seed: open-loop arrivals at rate r are the same
draws scaled by 1 / r (common random numbers), which keeps attainment close to monotone in the rate. A probe at
rate r sends max(requests, r x duration_s) requests: a fixed count would, at high rates, be one burst that a large
batch absorbs before any queue builds.

Rate: probe rate_min (it must pass, else the capacity is below it); double until a rate fails (or rate_max
passes); then bisect the bracket [passing, failing] until failing / passing - 1 <= tol. The capacity reported is
the highest rate that passed; the true threshold lies in [capacity, capacity x (1 + tol)).
Replicas: the same on integers, upward from 1: the fewest replicas that pass (exact, no tolerance)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class CapacityResult:
    search: str                      # rate | replicas
    status: str                      # ok | below_min (even the lowest probe fails) | above_max (the highest passes)
    capacity: float | None           # highest passing rate / fewest passing replicas (None if none passed)
    first_failing: float | None      # the bracket's other end (None if none failed)
    target: float
    tol: float
    probes: list[tuple[float, float]] = field(default_factory=list)   # (rate or replicas, attainment), in order

    def to_json(self) -> dict:
        return asdict(self)


def search_rate(attainment: Callable[[float], float], target: float, rate_min: float, rate_max: float,
                tol: float) -> CapacityResult:
    """The highest rate in [rate_min, rate_max] with attainment(rate) >= target, to a relative tolerance."""
    if not (0 < rate_min <= rate_max and tol > 0):
        raise ValueError("need 0 < rate_min <= rate_max and tol > 0")
    probes: list[tuple[float, float]] = []

    def ok(rate: float) -> bool:
        a = float(attainment(rate))
        probes.append((rate, a))
        return a >= target

    if not ok(rate_min):
        return CapacityResult("rate", "below_min", None, rate_min, target, tol, probes)
    lo, hi = rate_min, None
    while hi is None:
        nxt = min(lo * 2.0, rate_max)
        if nxt <= lo:
            return CapacityResult("rate", "above_max", lo, None, target, tol, probes)
        if ok(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi / lo - 1.0 > tol:
        mid = math.sqrt(lo * hi)  # geometric: the tolerance is relative
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return CapacityResult("rate", "ok", lo, hi, target, tol, probes)


def search_replicas(attainment: Callable[[int], float], target: float, replicas_max: int) -> CapacityResult:
    """The fewest replicas in [1, replicas_max] with attainment(n) >= target."""
    probes: list[tuple[float, float]] = []

    def ok(n: int) -> bool:
        a = float(attainment(n))
        probes.append((n, a))
        return a >= target

    if ok(1):
        return CapacityResult("replicas", "ok", 1, None, target, 0.0, probes)
    lo, hi = 1, None  # lo fails
    n = 1
    while hi is None:
        n = min(n * 2, replicas_max)
        if ok(n):
            hi = n
        elif n >= replicas_max:
            return CapacityResult("replicas", "above_max", None, replicas_max, target, 0.0, probes)
        else:
            lo = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return CapacityResult("replicas", "ok", hi, lo, target, 0.0, probes)


def search_cell(cell_json: dict, root: str, capacity: dict) -> dict:
    """One configuration's capacity search, each probe a sweep cell stored under `root` (so a rerun reuses
    them). A top-level function of plain data, for the pool and Ray."""
    from echosim.sweep.grid import Cell
    from echosim.sweep.store import run_cell

    cell = Cell.from_json(cell_json)
    base_requests = cell.workload.requests or 0

    def at_rate(c: Cell, rate: float) -> Cell:
        return c.with_requests(max(base_requests, math.ceil(rate * capacity["duration_s"])))

    if capacity["search"] == "rate":
        def attain(rate: float) -> float:
            return run_cell(at_rate(cell.with_load("rate", rate), rate).to_json(), root)["slo_attainment"]

        res = search_rate(attain, capacity["target"], capacity["rate_min"], capacity["rate_max"], capacity["tol"])
    else:
        rate = cell.workload.rate_rps if cell.workload.kind in ("poisson", "gamma") else 0.0

        def attain(n: int) -> float:
            return run_cell(at_rate(cell.with_replicas(n), rate).to_json(), root)["slo_attainment"]

        res = search_replicas(attain, capacity["target"], capacity["replicas_max"])
    labels = {k: v for k, v in cell.labels.items() if k not in ("load", "load_kind", "replicas", "gpus")
              or (capacity["search"] == "rate" and k in ("replicas", "gpus"))
              or (capacity["search"] == "replicas" and k in ("load", "load_kind"))}
    return {**labels, **{k: v for k, v in res.to_json().items() if k != "probes"},
            "probes": len(res.probes), "probe_points": ";".join(f"{x:g}:{a:.4f}" for x, a in res.probes)}
