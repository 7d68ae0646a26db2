"""The scheduler core every backend runs: draft forest, drafting loop, policies, calibration, Flatten & Pack,
verification. NumPy only: it imports no simulator, engine, cost model or trace code."""
