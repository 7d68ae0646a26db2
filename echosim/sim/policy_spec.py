"""Policy specs as users write them: a name (`eagle3`), a policy .json file, or NAME{JSON settings}
(`echo{"budget":{"kind":"goodput","tokens":31}}`), plus KEY=VALUE overrides; and the short label a run shows.

`echosim run --compare-policies`, `echosim sweep` and the dashboard all read policies through these functions."""

from __future__ import annotations

import json
from pathlib import Path

from echosim.sim.errors import SimError


def split_items(text: str) -> list[str]:
    """Comma-separated items; commas inside {...} belong to the item (inline JSON settings)."""
    items, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur).strip())
    return [x for x in items if x]


def parse_policy(spec: str, sets: list[str] = ()) -> dict:
    """{"policy": name, ...settings} from a spec string and KEY=VALUE overrides (JSON values)."""
    path = Path(spec)
    if "{" in spec and spec.endswith("}") and not spec.startswith("{"):
        name, _, body = spec.partition("{")
        try:
            cfg = json.loads("{" + body)
        except json.JSONDecodeError as exc:
            raise SimError(f"policy {spec!r}: the settings are not valid JSON ({exc.msg})") from None
        if not isinstance(cfg, dict):
            raise SimError(f"policy {spec!r}: the settings must be a JSON object")
        cfg = {"policy": name.strip(), **cfg}
    elif "{" in spec and not spec.endswith(".json"):
        raise SimError(f"policy {spec!r}: the settings are not valid JSON (no closing '}}')")
    elif spec.endswith(".json"):
        try:
            cfg = json.loads(path.read_text())
        except OSError as exc:
            raise SimError(f"cannot read the policy: {exc.strerror}", path=spec) from None
        except json.JSONDecodeError as exc:
            raise SimError(f"not valid JSON ({exc.msg})", path=spec, line=exc.lineno) from None
        if not isinstance(cfg, dict) or "policy" not in cfg:
            raise SimError("a policy file is a JSON object with 'policy'", path=spec, field="policy")
    else:
        cfg = {"policy": spec}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SimError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            cfg[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            cfg[key.strip()] = value
    return cfg


def _flat(v) -> str:
    return "-".join(map(_flat, v.values())) if isinstance(v, dict) else str(v)


def settings_label(policy_cfg: dict) -> str:
    """name[values] for a config with settings (e.g. eagle3[3,3,6] or echo[goodput-31]), else the name."""
    rest = [_flat(v) for k, v in policy_cfg.items() if k != "policy"]
    return f"{policy_cfg['policy']}[{','.join(rest)}]" if rest else str(policy_cfg["policy"])


def policy_label(policy_cfg: dict, spec: str) -> str:
    """The label of a spec string: a file's stem, the bare name, or name[values] for inline settings."""
    if spec.endswith(".json"):
        return Path(spec).stem
    if "{" not in spec:
        return policy_cfg["policy"]
    return f"{policy_cfg['policy']}[{','.join(_flat(v) for k, v in policy_cfg.items() if k != 'policy')}]"
