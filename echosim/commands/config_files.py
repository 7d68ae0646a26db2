"""Settings files for the CLI's --config: a YAML or JSON mapping, read with one-line errors (file, line)."""

from __future__ import annotations

import json
from pathlib import Path

from echosim.errors import UserError


def load_settings(path: str | Path) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read the config: {exc.strerror or exc}", path=str(p)) from None
    except UnicodeDecodeError:
        raise UserError("the config is not UTF-8 text", path=str(p)) from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"not valid JSON ({exc.msg})", path=str(p), line=exc.lineno) from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise UserError(f"not valid YAML ({getattr(exc, 'problem', None) or exc})", path=str(p),
                            line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise UserError("the config must be a mapping of settings", path=str(p))
    return data
