"""The simulator's error: an impossible cluster, workload or speculation setting."""

from __future__ import annotations

from echosim.spec.errors import InputError


class SimError(InputError):
    """A simulator configuration at fault (cluster, workload, acceptance model)."""
