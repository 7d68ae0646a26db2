"""Every speculation policy, by CLI name, built from a dict (CLI flags or a JSON config file)."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from echosim.spec.budget import Budget, StepTimeFn
from echosim.spec.policies import dynamic, echo, static  # noqa: F401  (registers the policies)
from echosim.spec.policies.base import POLICIES, ConfigError, DraftPlan, Policy
from echosim.spec.policies.echo import EchoConfig

__all__ = ["POLICIES", "ConfigError", "DraftPlan", "EchoConfig", "Policy", "make_policy", "load_policy",
           "save_policy"]


def _coerce(name: str, hint: Any, value: Any) -> Any:
    if hint is Budget or (isinstance(hint, str) and hint == "Budget"):
        return value if isinstance(value, Budget) else Budget.from_json(value)
    if name == "gates":
        return [(int(d), float(t)) for d, t in value]
    if name == "check_depths":
        return tuple(int(d) for d in value)
    return value


def make_policy(name: str, config: dict | None = None, step_time: StepTimeFn | None = None) -> Policy:
    """Build a policy by CLI name; `config` overrides the defaults of its config dataclass. A setting
    `"adaptive": {...}` (or true) wraps the policy in the online-adaptive budget (echosim/spec/adaptive.py)."""
    config = dict(config or {})
    adaptive = config.pop("adaptive", None)
    if adaptive is not None and adaptive is not False:
        from echosim.spec.adaptive import Adaptive, AdaptiveConfig  # it builds on policies.base

        inner = make_policy(name, config, step_time)
        if adaptive is True:
            adaptive = {}
        if not isinstance(adaptive, dict):
            raise ConfigError(f"policy {name!r} setting 'adaptive': must be an object of settings or true")
        fields = {f.name for f in dataclasses.fields(AdaptiveConfig)}
        bad = sorted(set(adaptive) - fields)
        if bad:
            raise ConfigError(f"policy {name!r} setting 'adaptive' has no setting {bad[0]!r}; settings: "
                              f"{', '.join(sorted(fields))}")
        try:
            return Adaptive(inner, AdaptiveConfig(**adaptive), step_time)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"policy {name!r} setting 'adaptive': {exc}") from None
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    hints = typing.get_type_hints(cls.config_cls)
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    kwargs = {}
    for key, value in (config or {}).items():
        if key not in fields:
            raise ConfigError(f"policy {name!r} has no setting {key!r}; settings: {', '.join(sorted(fields))}")
        try:
            kwargs[key] = _coerce(key, hints.get(key), value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"policy {name!r} setting {key!r}: {exc}") from None
    try:
        cfg = cls.config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"policy {name!r}: {exc}") from None
    return cls(cfg, step_time)


def load_policy(path: str | Path, step_time: StepTimeFn | None = None) -> Policy:
    """A policy saved by save_policy / `echosim calibrate`: {"policy": name, ...settings}."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "policy" not in data:
        raise ConfigError(f"{path}: field 'policy': missing (a policy config is a JSON object with 'policy')")
    data = dict(data)
    name = data.pop("policy")
    data.pop("calibration", None)  # informative statistics written by calibrate
    return make_policy(name, data, step_time)


def save_policy(policy: Policy, path: str | Path, extra: dict | None = None) -> None:
    out = policy.describe()
    if extra:
        out.update(extra)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
