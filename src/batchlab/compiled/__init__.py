"""The training step as one compiled graph (``TrainConfig(compile=...)``); see docs/compile.md."""

from .step import CompiledStep, StepNumbers, train_step
from .updates import CompileUnsupported, Hyper, apply_update, hyper_of, optimizer_state

__all__ = ["CompiledStep", "CompileUnsupported", "Hyper", "StepNumbers", "apply_update", "hyper_of",
           "optimizer_state", "train_step"]
