"""The CLI's name for a user-input error. Every package raises its own subclass of InputError (traces.errors,
cost_models.errors, echosim.spec.errors, echosim.sim.errors, echo_exec.errors, echosim.validate); the CLI catches
the base and prints one line, never a stack trace."""

from __future__ import annotations

from echosim.spec.errors import InputError

UserError = InputError

__all__ = ["InputError", "UserError"]
