"""Resuming: which checkpoint, how to load it on this world size, and where the data stream continues.

A checkpoint's ``COMPLETE`` marker records the world size, ZeRO stage, batch and data position it was written
with (:meth:`Trainer.checkpoint_meta`), so the choice is made before any heavy work: the checkpoint is found, its
global batch compared with this run's, and a world-size (or ZeRO 1↔2) change routed through DeepSpeed's universal
form, which the engine must be told about when it is built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..config import BatchSizes, ConfigError
from .checkpoint import CheckpointManager, LoadTarget

__all__ = ["agree_resume", "batches_consumed", "choose_resume"]

log = logging.getLogger("rankclip_ds.train")


def agree_resume(
    ckpt: CheckpointManager,
    resume: str | None,
    *,
    batch: BatchSizes,
    zero_stage: int,
) -> LoadTarget | None:
    """:func:`choose_resume` on rank 0, its choice (or its error) broadcast to every rank: on a shared file system
    with attribute caching, ranks listing the checkpoint folder could otherwise see different newest checkpoints
    and load different ones."""
    if not resume:
        return None
    choice: list[Any] = [None]
    if ckpt.rank == 0:
        try:
            target = choose_resume(ckpt, resume, batch=batch, zero_stage=zero_stage)
            choice = [("ok", None if target is None else str(target.path))]
            if target is not None and resume != "latest" and target.path.parent.resolve() == ckpt.dir.resolve():
                # Stepping back in this run (e.g. over a loss spike): its later checkpoints are set aside now, so
                # a crash before the next save cannot make `resume latest` jump back onto the abandoned future.
                ckpt.set_aside_newer(int(target.meta.get("step", ckpt.step_of(target.path))))
        except ConfigError as exc:
            choice = [("error", str(exc))]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    kind, value = choice[0]
    if kind == "error":
        raise ConfigError(value)
    if value is None:
        return None
    if ckpt.rank == 0:
        return target
    return ckpt.load_target(Path(value), world_size=batch.world_size, zero_stage=zero_stage)


def choose_resume(
    ckpt: CheckpointManager,
    resume: str | None,
    *,
    batch: BatchSizes,
    zero_stage: int,
) -> LoadTarget | None:
    """The checkpoint ``checkpoint.resume`` names and how to load it here; None to start from scratch. Raises
    :class:`ConfigError` when the checkpoint's global batch differs from this run's (the step count, schedule and
    data position would change meaning) or the ZeRO stage change is one DeepSpeed cannot make."""
    if not resume:
        return None
    path = ckpt.resolve(resume)
    if path is None:
        log.info("checkpoint.resume=%s: no complete checkpoint in %s yet; starting from scratch", resume, ckpt.dir)
        return None
    target = ckpt.load_target(path, world_size=batch.world_size, zero_stage=zero_stage)
    meta = target.meta
    saved = meta.get("global_batch_size")
    if saved is not None and saved != batch.global_batch_size:
        raise ConfigError(
            f"optim.global_batch_size: the checkpoint {path} was trained with a global batch of {saved} "
            f"({meta.get('world_size')} ranks × micro {meta.get('micro_batch_size')} × accum "
            f"{meta.get('grad_accum_steps')}); this run's is {batch.global_batch_size} ({batch.describe()}): "
            f"the step count, schedule and data position would change meaning. Resume with --optim.global_batch_size "
            f"{saved} --optim.micro_batch_size null (or set micro × accum × world = {saved})"
        )
    if "micro_batch_size" in meta and meta.get("data_streams") is None:
        log.warning(
            "checkpoint %s predates the world-size-independent sample order (no data_streams in its marker): the "
            "data position is kept as samples consumed, but the rest of this epoch is not the order the original "
            "run would have read",
            path,
        )
    if target.universal:
        log.info(
            "checkpoint %s was written by %s ranks with ZeRO stage %s; this run has %d ranks, stage %d: loading "
            "DeepSpeed's universal form",
            path,
            meta.get("world_size"),
            meta.get("zero_stage"),
            batch.world_size,
            zero_stage,
        )
    return target


def batches_consumed(client: dict[str, Any], batch: BatchSizes, *, where: object) -> int:
    """Micro-batches per rank of the checkpoint's epoch already consumed, on this run's world size.

    The position is carried as samples consumed in the epoch over all ranks, which the same global batch splits
    evenly over any world size (the checkpoint's ``samples_in_epoch_per_rank`` × its world size)."""
    consumed = int(client["samples_in_epoch_per_rank"]) * int(client.get("world_size", batch.world_size))
    per_batch = batch.samples_per_micro_step
    if consumed % per_batch:
        raise ConfigError(
            f"{where}: {consumed} samples of epoch {client['epoch']} were consumed, which {batch.world_size} ranks × "
            f"micro batch {batch.micro_batch_size} cannot split; resume with the checkpoint's global batch"
        )
    return consumed // per_batch
