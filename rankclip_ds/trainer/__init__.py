"""The DeepSpeed trainer (only the entry point imports it; the library never does)."""

from .errors import CheckpointWriteError, CollectiveTimeoutError, TrainingError
from .signals import REQUEUE_EXIT_CODE
from .step import NonFiniteLossError
from .trainer import Trainer

__all__ = [
    "REQUEUE_EXIT_CODE",
    "CheckpointWriteError",
    "CollectiveTimeoutError",
    "NonFiniteLossError",
    "Trainer",
    "TrainingError",
]
