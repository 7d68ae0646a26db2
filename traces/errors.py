"""The trace layer's error: a malformed trace or workload setting, naming file, line and field."""

from __future__ import annotations

from echosim.spec.errors import InputError


class TraceError(InputError):
    """A trace file, trace format or workload generator setting at fault."""
