"""Batch arithmetic: ``global = micro × grad_accum × data-parallel world``, derived once, the one owner of it.

Everything that needs a batch number (the DeepSpeed JSON's batch fields, the loss's list length and local rows, the
data position of a resume, the pre-flight's checks, the dry run) reads it from :class:`BatchSizes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..problems import ConfigError, fail
from .sections import OptimConfig

__all__ = ["BatchSizes", "nodes_hint", "resolve_batch"]


@dataclass(frozen=True)
class BatchSizes:
    """Resolved batch arithmetic for one world size: ``global = micro × accum × world``."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    global_batch_size: int
    grad_cache: bool = False
    """Gradient caching: the loss sees all accumulated micro-batches of all ranks at once."""

    @property
    def samples_per_micro_step(self) -> int:
        """Samples of one micro-step over all ranks: micro × world (the unit the data position is counted in)."""
        return self.micro_batch_size * self.world_size

    def steps_per_epoch(self, batches_per_rank: int) -> int:
        """Optimizer steps in an epoch of ``batches_per_rank`` micro-batches per rank (the tail that cannot fill a
        step is skipped)."""
        return batches_per_rank // self.grad_accum_steps

    @property
    def loss_local_rows(self) -> int:
        """Rows of this rank in one loss call: every accumulated micro-batch with gradient caching, else one."""
        return self.micro_batch_size * (self.grad_accum_steps if self.grad_cache else 1)

    @property
    def loss_list_length(self) -> int:
        """N, the length of each ranking list: the whole global batch with gradient caching, else micro × world."""
        return self.loss_local_rows * self.world_size

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch_size} = micro {self.micro_batch_size} × accum {self.grad_accum_steps}"
            f" × world {self.world_size}; loss list length N = {self.loss_list_length}"
            + (" (gradient caching: whole global batch)" if self.grad_cache else " (per micro-step: micro × world)")
        )


def resolve_batch(optim: OptimConfig, world_size: int) -> BatchSizes:
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
    return BatchSizes(micro, accum, world_size, derived, optim.grad_cache)


def nodes_hint(optim: OptimConfig, world_size: int, ranks_per_node: int | None) -> str:
    """A multi-node world's arithmetic for a global batch that does not divide it: nodes × ranks per node, the node
    counts that fit, the nearest global batches for this node count."""
    if not ranks_per_node or world_size <= ranks_per_node or world_size % ranks_per_node:
        return ""
    nodes, glob, accum = world_size // ranks_per_node, optim.global_batch_size, optim.grad_accum_steps
    text = f" The world is {nodes} nodes × {ranks_per_node} ranks per node = {world_size} ranks"
    if glob is None or optim.micro_batch_size is not None:
        return text + "."
    unit = accum * world_size
    fit = [str(n) for n in range(1, 4 * nodes + 1) if glob % (accum * n * ranks_per_node) == 0] or ["none"]
    nearest = " or ".join(str(b) for b in (glob // unit * unit, (glob // unit + 1) * unit) if b > 0)
    return (
        f"{text}: launch a node count (of {ranks_per_node} ranks) that divides it (up to {4 * nodes} nodes: "
        f"{', '.join(fit)}), or keep {nodes} nodes with a global batch of {nearest} (a multiple of grad_accum_steps × "
        f"nodes × ranks per node = {accum} × {nodes} × {ranks_per_node} = {unit})."
    )
