"""Step-time cost models: one interface (StepCostModel), a roofline from datasheet specs, the same shape fitted to
kernel profiles, the catalog of hardware and models, profile readers and the profiler. See docs/COST_MODELS.md."""

from cost_models.fitted import FittedCostModel
from cost_models.interface import StepBatch, StepCostModel, StepTime
from cost_models.roofline import RooflineCostModel, RooflineParams
from cost_models.specs import HardwareSpec, ModelSpec, known_hardware, known_models, load_hardware, load_model

__all__ = [
    "FittedCostModel", "HardwareSpec", "ModelSpec", "RooflineCostModel", "RooflineParams", "StepBatch",
    "StepCostModel", "StepTime", "known_hardware", "known_models", "load_hardware", "load_model",
]
