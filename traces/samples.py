"""Small traces shipped inside the package, loadable by name: `sample_path("azure_conv_2023_5min")`."""

from __future__ import annotations

from pathlib import Path

from traces.errors import TraceError

HERE = Path(__file__).resolve().parent


def list_samples() -> list[str]:
    return sorted(p.name.removesuffix(".jsonl") for p in HERE.glob("*.jsonl"))


def sample_path(name: str) -> Path:
    """Path of a shipped sample, by name with or without ".jsonl" (see traces/README.md)."""
    path = HERE / (name if name.endswith(".jsonl") else f"{name}.jsonl")
    if not path.is_file():
        raise TraceError(f"no shipped trace sample '{name}'; available: {', '.join(list_samples())}")
    return path


def resolve_trace(spec: str | Path) -> Path:
    """A trace argument as given on the command line: an existing file, or the name of a shipped sample
    (also as "traces/<name>[.jsonl]", so the README's commands work from any directory)."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name
    if (HERE / name).is_file() or (HERE / f"{name}.jsonl").is_file():
        return sample_path(name)
    raise TraceError("no such trace file (and no shipped sample of that name; samples: "
                    f"{', '.join(list_samples())})", path=str(spec))
