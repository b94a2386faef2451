"""Errors that end a training run with a message for the user (the entry point prints them and exits with 1).

Each names what failed, where (the path, the collective, the rank, the step) and what to do about it. They are
not requeue signals: a run that fails with one of them needs a person, so the SLURM scripts do not requeue it.
"""

from __future__ import annotations

__all__ = ["CheckpointWriteError", "CollectiveTimeoutError", "TrainingError"]

# Exit code of the entry point for a TrainingError (a real failure; 75 asks for a requeue, 2 is a bad config).
TRAINING_ERROR_EXIT_CODE = 1


class TrainingError(RuntimeError):
    """A failure of the run that the user must act on; the message says what happened and the fix."""


class CheckpointWriteError(TrainingError):
    """Writing a checkpoint failed on at least one rank (disk full, read-only, quota). The previous complete
    checkpoint and the ``latest`` pointer are untouched."""


class CollectiveTimeoutError(TrainingError):
    """A collective did not complete within ``dist.timeout_minutes``: a rank is stuck, dead or unreachable."""
