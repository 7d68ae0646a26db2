"""Validation: the same trace through a real backend and the simulator, and their errors (DESIGN.md "Validation").

It drives both worlds, so it sits above the simulator (echosim.sim) and real execution (echo_exec), which never
import each other: `crossval` runs the strict-replay protocol, `step_overheads` fits the engine's per-step costs
that the simulator's pricing then carries.
"""
