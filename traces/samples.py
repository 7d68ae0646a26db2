"""Traces shipped inside the package, loadable by name: `sample_path("azure_conv_2023_5min")`.

Small samples are native JSONL; the Azure conversation hour is the public CSV as published, gzip-compressed."""

from __future__ import annotations

from pathlib import Path

from traces.errors import TraceError

HERE = Path(__file__).resolve().parent
_SUFFIXES = (".jsonl", ".jsonl.gz", ".csv.gz")


def _name(path: Path) -> str:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return path.name.removesuffix(suffix)
    return path.name


def list_samples() -> list[str]:
    return sorted(_name(p) for suffix in _SUFFIXES for p in HERE.glob(f"*{suffix}"))


def _find(name: str) -> Path | None:
    for candidate in [name] + [name + s for s in _SUFFIXES]:
        if (HERE / candidate).is_file() and any(candidate.endswith(s) for s in _SUFFIXES):
            return HERE / candidate
    return None


def sample_path(name: str) -> Path:
    """Path of a shipped sample, by name with or without its suffix (see traces/README.md)."""
    path = _find(name)
    if path is None:
        raise TraceError(f"no shipped trace sample '{name}'; available: {', '.join(list_samples())}")
    return path


def resolve_trace(spec: str | Path) -> Path:
    """A trace argument as given on the command line: an existing file, or the name of a shipped sample
    (also as "traces/<name>[.jsonl]", so the README's commands work from any directory)."""
    path = Path(spec)
    if path.is_file():
        return path
    found = _find(path.name)
    if found is not None:
        return found
    raise TraceError("no such trace file (and no shipped sample of that name; samples: "
                    f"{', '.join(list_samples())})", path=str(spec))
