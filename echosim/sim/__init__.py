"""The discrete-event simulator and its models (acceptance model: echosim.sim.acceptance)."""
