"""Validation's error: an impossible validate setting, or a calibration or replay that could not be compared."""

from __future__ import annotations

from echosim.spec.errors import InputError


class ValidationError(InputError):
    """A validate setting, calibration run or replay at fault."""
