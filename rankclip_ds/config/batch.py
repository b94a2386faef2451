"""Batch arithmetic: ``global = micro × grad_accum × data-parallel world``, derived once, asserted everywhere."""

from __future__ import annotations

from dataclasses import dataclass

from ..problems import ConfigError, fail
from .sections import OptimConfig

__all__ = ["BatchPlan", "resolve_batch"]


@dataclass(frozen=True)
class BatchPlan:
    """Resolved batch arithmetic: ``global = micro × accum × world``."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    global_batch_size: int

    @property
    def loss_list_length(self) -> int:
        """N, the length of each ranking list: the whole global batch with gradient caching, else micro × world."""
        return self.global_batch_size

    def describe(self, grad_cache: bool) -> str:
        n = self.global_batch_size if grad_cache else self.micro_batch_size * self.world_size
        return (
            f"global batch {self.global_batch_size} = micro {self.micro_batch_size} × accum {self.grad_accum_steps}"
            f" × world {self.world_size}; loss list length N = {n}"
            + (" (gradient caching: whole global batch)" if grad_cache else " (per micro-step: micro × world)")
        )


def resolve_batch(optim: OptimConfig, world_size: int) -> BatchPlan:
    """Derive the batch sizes for ``world_size`` data-parallel ranks, or fail naming both numbers."""
    if world_size < 1:
        raise ConfigError(f"world_size={world_size}: must be >= 1")
    accum = optim.grad_accum_steps
    micro, glob = optim.micro_batch_size, optim.global_batch_size
    if micro is None:
        assert glob is not None  # checked in OptimConfig
        if glob % (accum * world_size):
            fail(
                "optim.global_batch_size",
                glob,
                f"is not divisible by grad_accum_steps × world_size = {accum} × {world_size} = {accum * world_size}",
                f"use a global batch that is a multiple of {accum * world_size}, or change grad_accum_steps",
            )
        micro = glob // (accum * world_size)
    derived = micro * accum * world_size
    if glob is not None and glob != derived:
        fail(
            "optim.global_batch_size",
            glob,
            f"contradicts micro_batch_size × grad_accum_steps × world_size = {micro} × {accum} × {world_size} = "
            f"{derived}",
            "set optim.micro_batch_size=null to derive it from the global batch, or make the product match",
        )
    return BatchPlan(micro, accum, world_size, derived)
