"""The DeepSpeed trainer (only the entry point imports it; the library never does)."""

from .signals import REQUEUE_EXIT_CODE
from .step import NonFiniteLossError, StepRunner
from .trainer import Trainer

__all__ = ["REQUEUE_EXIT_CODE", "NonFiniteLossError", "StepRunner", "Trainer"]
