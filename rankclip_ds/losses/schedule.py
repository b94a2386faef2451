"""Rank-weight schedules w(t) for the ListMLE terms of the RankCLIP objective.

The loss is ``L = L_clip + w(t) * (lambda_cross * L_cross + lambda_in * L_in) / (32 N)``; these functions give ``w``.
"""

from __future__ import annotations

__all__ = ["epoch_rank_weight", "step_rank_weight"]


def epoch_rank_weight(epoch: int, epochs: int, w_max: float = 2.0) -> float:
    """The released code's epoch ramp ``w(e) = clip(3 (e - 1) / (E - 1), 0, w_max)``.

    ``epoch`` is 1-based (the first epoch is ``epoch=1`` and gets ``w = 0``), ``epochs`` is E.  With the default
    ``w_max = 2`` the ramp reaches its maximum at two thirds of training and is held there.

    The released code divides by ``E - 1`` and crashes for a single epoch.  Here ``E = 1`` is defined as the limit
    of a ramp that has no room to rise: the one and only epoch gets ``w_max`` (the held value), so a one-epoch run
    still trains the ranking terms.  An ``epoch`` past ``epochs`` keeps ``w_max``; ``epoch < 1`` gives 0.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}; pass the total number of training epochs")
    if w_max < 0:
        raise ValueError(f"w_max must be >= 0, got {w_max}")
    if epochs == 1:
        return float(w_max) if epoch >= 1 else 0.0
    w = 3.0 * (epoch - 1) / (epochs - 1)
    return float(min(max(w, 0.0), w_max))


def step_rank_weight(step: int, total_steps: int, w_max: float = 2.0, hold_from: float = 2.0 / 3.0) -> float:
    """Step-based ramp: ``w`` rises linearly from 0 at step 0 to ``w_max`` at ``hold_from * total_steps``, then holds.

    ``hold_from`` in ``(0, 1]`` is the fraction of training at which ``w_max`` is reached (2/3 mirrors the official
    epoch ramp); ``hold_from = 0`` means "``w_max`` from the start".  Steps past ``total_steps`` keep ``w_max``;
    negative steps give 0.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}; pass the number of optimizer steps")
    if not 0.0 <= hold_from <= 1.0:
        raise ValueError(f"hold_from must be in [0, 1], got {hold_from}; it is a fraction of total_steps")
    if w_max < 0:
        raise ValueError(f"w_max must be >= 0, got {w_max}")
    if step < 0:
        return 0.0
    ramp_end = hold_from * total_steps
    if ramp_end <= 0:
        return float(w_max)
    return float(w_max * min(step / ramp_end, 1.0))
