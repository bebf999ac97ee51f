"""The training step as one compiled graph (``TrainConfig(compile=...)``); see docs/compile.md."""

from .policy import saving_per_step, should_compile
from .stacked import StackedStep, stacked_train_step
from .step import CHUNK, CompiledStep, StepNumbers, train_step, train_steps
from .updates import CompileUnsupported, optimizer_as_chain

__all__ = ["CHUNK", "CompileUnsupported", "CompiledStep", "StackedStep", "StepNumbers", "optimizer_as_chain",
           "saving_per_step", "should_compile", "stacked_train_step", "train_step", "train_steps"]
