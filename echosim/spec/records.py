"""Per-node draft/acceptance records: what the acceptance model and the calibration are fitted from.

One record per verified draft node: {"step", "request", "depth", "rank", "draft_prob", "path_prob", "accepted"}
plus optional "dataset" and "parent_accepted". `accepted` is true when the node lies on the step's accepted path;
`parent_accepted` when its parent does (the root always does): only such nodes say anything about whether the target
agrees with a draft (files without it still read; the acceptance fit then infers it). Both the engine and the
simulator write this schema (JSON lines).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echosim.spec.errors import SpecError
from echosim.spec.forest import DraftForest
from echosim.spec.pack import VerifyBatch
from echosim.spec.verify import VerifyResult

FIELDS = ("step", "request", "depth", "rank", "draft_prob", "path_prob", "accepted")


@dataclass
class NodeRecords:
    step: np.ndarray        # int64
    request: np.ndarray     # int64 (ids, not batch positions)
    depth: np.ndarray       # int32
    rank: np.ndarray        # int32
    draft_prob: np.ndarray  # float64
    path_prob: np.ndarray   # float64
    accepted: np.ndarray    # bool
    dataset: np.ndarray | None = None  # str
    parent_accepted: np.ndarray | None = None  # bool

    def __len__(self) -> int:
        return len(self.step)

    @classmethod
    def concat(cls, parts: list[NodeRecords]) -> NodeRecords:
        if not parts:
            return cls(*(np.zeros(0, t) for t in (np.int64, np.int64, np.int32, np.int32, float, float, bool)))
        out = {f: np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS}
        ds = [p.dataset if p.dataset is not None else np.full(len(p), "", object) for p in parts]
        pa = None
        if all(p.parent_accepted is not None for p in parts):
            pa = np.concatenate([p.parent_accepted for p in parts])
        return cls(**out, dataset=np.concatenate(ds), parent_accepted=pa)


def step_records(forest: DraftForest, batch: VerifyBatch, result: VerifyResult, step: int,
                 request_ids: np.ndarray, dataset: np.ndarray | None = None) -> NodeRecords:
    """Records of every verified draft node of one step."""
    T = batch.num_tokens
    nodes = np.nonzero(batch.node[:T] >= 0)[0]
    flat = batch.node[nodes]
    req = batch.request_of_token()[nodes]
    accepted = np.zeros(T, bool)
    accepted[result.accepted_nodes()] = True
    local_parent = batch.parent[nodes].astype(np.int64)
    parent_accepted = (local_parent == 0) | accepted[batch.qo_indptr[req] + local_parent]
    return NodeRecords(
        step=np.full(len(nodes), step, np.int64), request=np.asarray(request_ids, np.int64)[req],
        depth=batch.depth[nodes].astype(np.int32), rank=forest.flat_rank[flat].astype(np.int32),
        draft_prob=np.exp(forest.logp.ravel()[flat].astype(np.float64)),
        path_prob=np.exp(forest.score.ravel()[flat]), accepted=accepted[nodes],
        dataset=None if dataset is None else np.asarray(dataset, object)[req], parent_accepted=parent_accepted)


def write_records(path: str | Path, records: NodeRecords, append: bool = False) -> None:
    with open(path, "a" if append else "w") as fh:
        ds = records.dataset
        pa = records.parent_accepted
        for i in range(len(records)):
            row = {"step": int(records.step[i]), "request": int(records.request[i]), "depth": int(records.depth[i]),
                   "rank": int(records.rank[i]), "draft_prob": float(f"{records.draft_prob[i]:.7g}"),
                   "path_prob": float(f"{records.path_prob[i]:.7g}"), "accepted": bool(records.accepted[i])}
            if ds is not None and ds[i]:
                row["dataset"] = str(ds[i])
            if pa is not None:
                row["parent_accepted"] = bool(pa[i])
            fh.write(json.dumps(row) + "\n")


def read_records(path: str | Path) -> NodeRecords:
    """Read JSON-lines records; a malformed line is a SpecError naming the file, line and field."""
    cols: dict[str, list] = {f: [] for f in FIELDS}
    datasets: list[str] = []
    parent_accepted: list[bool] = []
    try:
        fh = open(path)
    except OSError as exc:
        raise SpecError(f"cannot read records: {exc.strerror}", path=str(path)) from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpecError(f"not valid JSON ({exc.msg})", path=str(path), line=lineno) from None
            if not isinstance(row, dict):
                raise SpecError("a record must be a JSON object", path=str(path), line=lineno)
            for f in FIELDS:
                if f not in row:
                    raise SpecError("missing", path=str(path), line=lineno, field=f)
                v = row[f]
                if f == "accepted":
                    if not isinstance(v, bool):
                        raise SpecError(f"must be true or false, not {v!r}", path=str(path), line=lineno, field=f)
                elif isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise SpecError(f"must be a number, not {v!r}", path=str(path), line=lineno, field=f)
                elif f in ("draft_prob", "path_prob") and not 0.0 <= v <= 1.0:
                    raise SpecError(f"must be a probability in [0, 1], not {v!r}", path=str(path), line=lineno,
                                    field=f)
                elif f == "depth" and v < 1:
                    raise SpecError(f"must be >= 1, not {v!r}", path=str(path), line=lineno, field=f)
                cols[f].append(v)
            datasets.append(str(row.get("dataset", "")))
            if "parent_accepted" in row:
                if not isinstance(row["parent_accepted"], bool):
                    raise SpecError(f"must be true or false, not {row['parent_accepted']!r}", path=str(path),
                                    line=lineno, field="parent_accepted")
                parent_accepted.append(row["parent_accepted"])
    if not cols["step"]:
        raise SpecError("no records in file", path=str(path))
    return NodeRecords(step=np.asarray(cols["step"], np.int64), request=np.asarray(cols["request"], np.int64),
                       depth=np.asarray(cols["depth"], np.int32), rank=np.asarray(cols["rank"], np.int32),
                       draft_prob=np.asarray(cols["draft_prob"], float),
                       path_prob=np.asarray(cols["path_prob"], float),
                       accepted=np.asarray(cols["accepted"], bool), dataset=np.asarray(datasets, object),
                       parent_accepted=np.asarray(parent_accepted, bool)
                       if len(parent_accepted) == len(datasets) else None)
