"""What the training step needs besides forward, loss, backward and step (those read top to bottom in
``Trainer.train_step``): copying a batch to the device, the non-finite-loss policy, and the RNG replay of gradient
caching."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import TrainingError

__all__ = ["COMPONENTS", "NonFiniteGuard", "NonFiniteLossError", "dropout_rng_state", "replay_dropout_rng", "to_device"]

log = logging.getLogger("rankclip_ds.train")

COMPONENTS = ("loss", "clip", "cross", "inmodal")
"""The loss's outputs that the step reports (global values)."""


class NonFiniteLossError(TrainingError):
    """Too many consecutive non-finite losses: the run stops instead of training on garbage."""


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images, input_ids, attention_mask)`` of ``batch`` on ``device``, images in the training dtype.

    Non-blocking: from pinned host memory (``data.pin_memory``) the copies run on the stream without stalling the
    host, and kernels queued after them wait for them; from pageable memory they are plain synchronous copies, and
    on the CPU no-ops."""
    images, ids, mask = (batch[k].to(device, non_blocking=True) for k in ("image", "input_ids", "attention_mask"))
    if images.is_floating_point():
        images = images.to(dtype)
    return images, ids, mask


class NonFiniteGuard:
    """The policy for a non-finite loss, and its counts.

    The loss is a global value, so every rank takes the same branch. A non-finite micro-batch loss is replaced by a
    stand-in built from that forward's outputs, so DeepSpeed's backward hooks run for every parameter and every rank
    keeps the same reduction schedule; its gradient is NaN, which makes DeepSpeed's ZeRO optimizers (every stage,
    every precision) discard the whole optimizer step, as for an fp16 overflow (without ZeRO the stand-in's gradient
    is zero instead: the micro-batch contributes nothing). ``max_streak`` optimizer steps in a row with a
    non-finite loss stop the run. Reading whether the loss is finite is the step's one host read per loss call.
    """

    def __init__(self, optimizer, max_streak: int = 5) -> None:
        self.optimizer = optimizer
        self.can_discard = hasattr(optimizer, "overflow")
        self.max_streak = max_streak
        self.total = 0  # non-finite losses over the run (checkpointed)
        self.streak = 0  # optimizer steps in a row with one
        self.last_bad: list[str] = []
        self.in_this_step = False

    def finite(self, out: dict, *, step: int, where: str) -> bool:
        """Whether the loss ``out["loss"]`` is finite; if not, warn, count, and mark this step for discarding."""
        if torch.isfinite(out["loss"]).item():
            return True
        self.total += 1
        self.in_this_step = True
        self.last_bad = [k for k in COMPONENTS[1:] if k in out and not torch.isfinite(out[k]).item()]
        log.warning(
            "step %d (%s): non-finite loss (components %s); %s (non-finite losses so far: %d)",
            step,
            where,
            self.last_bad or "unknown",
            "the optimizer step is discarded" if self.can_discard else "this micro-batch contributes no gradient",
            self.total,
        )
        return False

    def stand_in(self, outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The loss back-propagated instead of a non-finite one: built from the forward's ``outputs`` (every
        parameter gets a gradient), NaN under ZeRO (the step is discarded), zero otherwise."""
        return sum(o.float().sum() for o in outputs) * (float("nan") if self.can_discard else 0.0)

    @contextmanager
    def stepping(self, last: bool) -> Iterator[None]:
        """Around ``engine.step()``: ZeRO stages 1-2 check the gradient for inf/NaN only in fp16 (or with bf16's
        ``check_grad_overflow``), so the check is switched on for the step that must be discarded (stage 3 always
        checks the gradient norm)."""
        opt = self.optimizer
        if not (last and self.in_this_step and self.can_discard and hasattr(opt, "check_grad_overflow")):
            yield
            return
        previous = opt.check_grad_overflow
        opt.check_grad_overflow = True
        try:
            yield
        finally:
            opt.check_grad_overflow = previous

    def end_step(self, step: int) -> None:
        """Count the optimizer steps in a row that had a non-finite loss (a step is discarded whole, so one bad
        micro-batch per step is as bad as all of them); ``max_streak`` of them raise :class:`NonFiniteLossError`."""
        hit, self.in_this_step = self.in_this_step, False
        self.streak = self.streak + 1 if hit else 0
        if self.streak >= self.max_streak:
            raise NonFiniteLossError(
                f"{self.streak} optimizer steps in a row had a non-finite loss, up to step {step} "
                f"(components {self.last_bad}); lower optim.lr, use bf16 instead of fp16, or check the data"
            )


def dropout_rng_state(device: torch.device) -> tuple:
    """The generators a micro-batch's dropout draws from, so that gradient caching's replay draws the same masks: the
    CPU generator, and the generator of this rank's GPU only (the other GPUs belong to other ranks). The whole
    training state's generators are :mod:`rankclip_ds.trainer.rng`'s (checkpoints)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def replay_dropout_rng(state: tuple, device: torch.device) -> None:
    """Set the generators back to what :func:`dropout_rng_state` returned."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
