"""Real execution's error: a bad model directory, engine setting, request or replay input."""

from __future__ import annotations

from echosim.spec.errors import InputError


class ExecError(InputError):
    """A model directory, engine/server setting or replay input at fault."""
