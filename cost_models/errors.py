"""The cost-model layer's error: a bad profile, fit file, catalog entry or model/hardware name."""

from __future__ import annotations

from echosim.spec.errors import InputError


class CostModelError(InputError):
    """A profile, fitted-model file, catalog entry or cost-model setting at fault."""
