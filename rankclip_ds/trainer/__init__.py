"""The DeepSpeed trainer (only the entry point imports it; the library never does)."""

from .signals import REQUEUE_EXIT_CODE
from .trainer import NonFiniteLossError, Trainer

__all__ = ["REQUEUE_EXIT_CODE", "NonFiniteLossError", "Trainer"]
