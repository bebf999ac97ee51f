"""The training step as one compiled graph (``TrainConfig(compile=...)``); see docs/compile.md."""

from .policy import saving_per_step, should_compile
from .stacked import StackedStep, init_stacked_state, stacked_train_step
from .step import CHUNK, CompiledStep, StepNumbers, train_step, train_steps
from .updates import CompileUnsupported, Hyper, apply_update, hyper_of, optimizer_state, stacked_hyper

__all__ = ["CHUNK", "CompiledStep", "CompileUnsupported", "Hyper", "StackedStep", "StepNumbers", "apply_update", "hyper_of",
           "init_stacked_state", "optimizer_state", "saving_per_step", "should_compile", "stacked_hyper",
           "stacked_train_step", "train_step", "train_steps"]
