"""A sweep's grid: policies (and their settings) x load x models x hardware x TP x replicas x traces x seeds.

A sweep is read from a YAML or JSON file, from flags, or both (flags replace the file's values):

    policies: [ar, eagle3, 'echo{"budget":{"kind":"goodput","tokens":31}}',
               {policy: eagle3, grid: {steps: [3, 5], num_draft_tokens: [6, 16]}}]
    concurrency: [1, 4, 16, 64]      # closed loop; or rates: [...] (req/s, open loop), or loads: [...] with traces
    models: [qwen3-8b]
    hardware: [h100]
    tp: [1]
    replicas: [1]
    traces: [azure_conv_2023_5min]   # with rates/concurrency the traces give lengths; alone they are replayed
    seeds: [0]
    requests: 128
    cluster: {max_running: 256}      # any other ClusterConfig field, the same in every cell
    slo_ttft_ms: 2000
    slo_tpot_ms: 100

Every cell resolves to the simulator's own SimConfig and WorkloadSpec (what `echosim run` builds from its flags);
its key is a hash of that resolved config, so a rerun finds the cells it has already run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from echosim.sim.config import ClusterConfig, SimConfig, read_settings_file
from echosim.sim.errors import SimError
from echosim.sim.policy_spec import parse_policy, policy_label, settings_label
from echosim.sim.workload import WorkloadSpec

# bump when a change to the simulator or the row layout makes stored cells stale
CELL_VERSION = 1
LOAD_KINDS = ("rate", "concurrency", "load")   # open-loop req/s, closed-loop concurrency, trace rate multiplier


class CapacitySpec(BaseModel):
    """Capacity search: the highest rate (or the fewest replicas for a rate) whose SLO attainment >= target."""

    model_config = ConfigDict(extra="forbid")
    search: str = "rate"             # rate | replicas
    target: float = 0.99             # share of requests meeting both SLOs (0.99: P99 TTFT and TPOT within them)
    rate_min: float = 0.25           # req/s, the bracket's low end (must pass)
    rate_max: float = 256.0          # req/s, where the upward doubling stops
    tol: float = 0.05                # stop when the bracket's high end / low end - 1 <= tol
    replicas_max: int = 64
    duration_s: float = 60.0         # each probe sends at least rate x duration_s requests, so that a queue that
                                     # grows at that rate shows (a fixed count would be one burst at high rates)

    @field_validator("search")
    @classmethod
    def _search(cls, v: str) -> str:
        if v not in ("rate", "replicas"):
            raise ValueError("must be 'rate' or 'replicas'")
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v

    @field_validator("tol", "rate_min", "rate_max", "duration_s")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be > 0")
        return v


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policies: list[str | dict] = ["ar", "eagle3", "echo"]
    rates: list[float] | None = None
    concurrency: list[int] | None = None
    loads: list[float] | None = None
    models: list[str] = ["qwen3-8b"]
    hardware: list[str] = ["h100"]
    tp: list[int] = [1]
    replicas: list[int] = [1]
    traces: list[str | None] = [None]
    seeds: list[int] = [0]
    requests: int | None = None      # default: requests_per_slot x concurrency (closed), 200 (rates), the trace
    requests_per_slot: int = 4       # closed loop without `requests`: this many requests per concurrency slot
    input_len: int = 100
    output_len: int = 500
    cv: float = 1.0
    cluster: dict = {}
    acceptance: str | None = None    # default: the model's preset
    core: str = "auto"
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 100.0
    capacity: CapacitySpec | None = None

    @field_validator("rates", "loads")
    @classmethod
    def _pos_float(cls, v):
        if v is not None and (not v or any(not x > 0 for x in v)):
            raise ValueError("must be a non-empty list of numbers > 0")
        return v

    @field_validator("requests", "requests_per_slot")
    @classmethod
    def _count(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("concurrency", "tp", "replicas")
    @classmethod
    def _pos_int(cls, v):
        if v is not None and (not v or any(x < 1 for x in v)):
            raise ValueError("must be a non-empty list of integers >= 1")
        return v

    @field_validator("policies", "models", "hardware", "traces", "seeds")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("must not be empty")
        return v


@dataclass
class Cell:
    """One point of the grid: the labels a table row shows, and the resolved simulator inputs."""

    labels: dict
    sim: SimConfig
    workload: WorkloadSpec
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = cell_key(self.sim, self.workload)

    def to_json(self) -> dict:
        return {"key": self.key, "labels": self.labels, "sim": self.sim.to_json(), "workload": self.workload.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> Cell:
        s = dict(d["sim"])
        sim = SimConfig(cluster=ClusterConfig(**s.pop("cluster")), **s)
        return cls(dict(d["labels"]), sim, WorkloadSpec(**d["workload"]))

    def with_load(self, kind: str, value: float) -> Cell:
        """The same cell at another load (capacity search probes)."""
        labels = {**self.labels, "load_kind": kind, "load": value}
        return Cell(labels, self.sim, _set_load(self.workload, kind, value))

    def with_requests(self, n: int) -> Cell:
        return Cell(dict(self.labels), self.sim, dataclasses.replace(self.workload, requests=int(n)))

    def with_replicas(self, n: int) -> Cell:
        sim = dataclasses.replace(self.sim, cluster=dataclasses.replace(self.sim.cluster, replicas=int(n)))
        return Cell({**self.labels, "replicas": int(n), "gpus": int(n) * int(self.labels["tp"])}, sim, self.workload)


def cell_key(sim: SimConfig, workload: WorkloadSpec) -> str:
    blob = json.dumps({"v": CELL_VERSION, "sim": sim.to_json(), "workload": workload.to_json()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_spec_file(path: str | Path) -> dict:
    """A sweep file's mapping (YAML or JSON), with a one-line error naming the file and line."""
    return read_settings_file(path, "sweep file")


def parse_spec(data: dict, path: str | None = None) -> SweepSpec:
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise SimError(f"{err['msg']}", path=path, field=loc) from None
    given = [k for k in ("rates", "concurrency", "loads") if getattr(spec, k) is not None]
    if len(given) > 1:
        raise SimError(f"give one load axis (rates, concurrency or loads), not {' and '.join(given)}", path=path,
                       field=given[1])
    if spec.loads is not None and spec.traces == [None]:
        raise SimError("loads multiply a trace's arrival rate: give traces too", path=path, field="loads")
    if not given and spec.traces == [None]:
        raise SimError("give a load axis: rates (req/s), concurrency, or traces (replayed, with optional loads)",
                       path=path, field="rates")
    bad = set(spec.cluster) - {f.name for f in dataclasses.fields(ClusterConfig)}
    bad |= set(spec.cluster) & {"model", "hardware", "tp", "replicas"}
    if bad:
        raise SimError(f"unknown or grid-level cluster setting {sorted(bad)[0]!r} (model, hardware, tp and replicas "
                       "are grid axes)", path=path, field=f"cluster.{sorted(bad)[0]}")
    return spec


def _set_nested(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    d = cfg
    for k in parents:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise SimError(f"policy setting {dotted!r}: {k!r} is not an object", field="policies")
    d[last] = value


def expand_policies(items: list, path: str | None = None) -> list[tuple[str, dict]]:
    """(label, policy config) for every policy item: strings as `echosim run --compare-policies` reads them;
    mappings {policy: NAME, ...settings, grid: {KEY: [values]}} expand over their grid (dotted keys reach into
    nested settings, e.g. budget.tokens)."""
    out: list[tuple[str, dict]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            cfg = parse_policy(item)
            out.append((policy_label(cfg, item), cfg))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("policy"), str):
            raise SimError("a policy is a name, NAME{JSON} or a mapping with 'policy'", path=path,
                           field=f"policies.{i}")
        base = {k: v for k, v in item.items() if k != "grid"}
        grid = item.get("grid") or {}
        if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
            raise SimError("a policy's grid maps setting names to non-empty lists", path=path,
                           field=f"policies.{i}.grid")
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            cfg = json.loads(json.dumps(base))
            for k, v in zip(keys, values, strict=True):
                _set_nested(cfg, k, v)
            out.append((settings_label(cfg), cfg))
    seen: dict[str, int] = {}
    labelled = []
    for label, cfg in out:
        n = seen.get(label, 0)
        seen[label] = n + 1
        labelled.append((label if n == 0 else f"{label}_{n}", cfg))
    return labelled


def _set_load(w: WorkloadSpec, kind: str, value: float) -> WorkloadSpec:
    if kind == "rate":
        return dataclasses.replace(w, kind="poisson" if w.cv == 1.0 else "gamma", rate_rps=float(value))
    if kind == "concurrency":
        return dataclasses.replace(w, kind="closed", concurrency=int(value))
    return dataclasses.replace(w, kind="trace", time_scale=1.0 / float(value))


def load_axis(spec: SweepSpec) -> tuple[str, list[float]]:
    if spec.rates is not None:
        return "rate", list(spec.rates)
    if spec.concurrency is not None:
        return "concurrency", list(spec.concurrency)
    return "load", list(spec.loads or [1.0])


def _workload(spec: SweepSpec, trace: str | None, kind: str, value: float) -> WorkloadSpec:
    requests = spec.requests
    if requests is None and kind == "concurrency":
        requests = spec.requests_per_slot * int(value)
    elif requests is None and kind == "rate":
        requests = 200
    base = WorkloadSpec(kind="trace", trace=trace, requests=requests, prompt_tokens=spec.input_len,
                        output_tokens=spec.output_len, cv=spec.cv)
    return _set_load(base, kind, value)


def expand(spec: SweepSpec, path: str | None = None, with_load: bool = True) -> list[Cell]:
    """Every cell of the grid, in a fixed order (policies vary fastest, then load, then the rest). Without the
    load axis (capacity search), one cell per configuration at the axis's first value."""
    policies = expand_policies(spec.policies, path)
    kind, loads = load_axis(spec)
    if not with_load:
        loads = loads[:1]
    cells = []
    for seed, trace, model, hw, tp, replicas, load in itertools.product(
            spec.seeds, spec.traces, spec.models, spec.hardware, spec.tp, spec.replicas, loads):
        cluster = ClusterConfig(model=model, hardware=hw, tp=tp, replicas=replicas, **spec.cluster)
        workload = _workload(spec, trace, kind, load)
        for label, cfg in policies:
            sim = SimConfig(cluster=cluster, policy=cfg, acceptance=spec.acceptance or model, core=spec.core,
                            seed=seed, slo_ttft_ms=spec.slo_ttft_ms, slo_tpot_ms=spec.slo_tpot_ms)
            labels = {"policy": label, "policy_name": cfg["policy"],
                      "policy_config": json.dumps(cfg, sort_keys=True), "load_kind": kind, "load": load,
                      "model": model, "hardware": hw, "tp": tp, "replicas": replicas, "gpus": tp * replicas,
                      "trace": trace or "", "seed": seed}
            cells.append(Cell(labels, sim, workload))
    return cells
