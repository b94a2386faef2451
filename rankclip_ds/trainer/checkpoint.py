"""Checkpoints: DeepSpeed engine state + our client state, a pointer updated atomically, pruning after success.

Layout under ``<run>/checkpoints/``::

    step_00000100/            one DeepSpeed tag (every rank writes its ZeRO shards here)
        rng_rank00000.pt      per-rank RNG states (DeepSpeed's client state is written by rank 0 only)
        COMPLETE              JSON metadata (step, world size, ZeRO stage, batch, data position), written by
                              rank 0 after every rank's files are on disk (a barrier) and fsynced
        universal/            only after a resume on another world size or ZeRO stage: DeepSpeed's universal
                              (world-size independent) form of this checkpoint, converted once by rank 0
    latest                    text file naming the newest complete tag; DeepSpeed's and zero_to_fp32's format

Every rank calls :meth:`CheckpointManager.save` (ZeRO state is sharded; saving on rank 0 only hangs ZeRO-3). The
pointer is replaced atomically (write + fsync + rename) only after ``COMPLETE`` exists, so a crash mid-write never
makes a partial checkpoint the latest, and older checkpoints are pruned only after a newer one is complete.
A write that fails on any rank (disk full, read-only, quota) is agreed on by all ranks and raised as
:class:`CheckpointWriteError` naming the path; the partial folder is removed and the previous checkpoint and the
pointer are untouched. The checkpoint folder must be on a file system every rank sees (as DeepSpeed's ``latest``
already assumes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError
from .durable import (
    describe,
    format_bytes,
    fsync_dir,
    fsync_files,
    fsync_write,
    storage_diagnosis,
)
from .errors import CheckpointWriteError, TrainingError
from .rng import capture_rng_state, restore_rng_state
from .watchdog import is_collective_failure

__all__ = ["COMPLETE", "TAG_RE", "UNIVERSAL", "CheckpointManager", "LoadTarget", "read_meta"]

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{8,})$")
COMPLETE = "COMPLETE"
LATEST = "latest"
UNIVERSAL = "universal"


def barrier_if_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather_errors(error: str | None) -> list[str | None]:
    """Every rank's error text (or None), on every rank: the agreement that keeps ranks from deadlocking when one
    of them failed and the others would wait for it in the next collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return [error]
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


def _folder_bytes(path: Path) -> int:
    """Bytes of the checkpoint's own files (not the universal copy made from it)."""
    total = 0
    for root, dirs, files in os.walk(path):
        if Path(root) == path and UNIVERSAL in dirs:
            dirs.remove(UNIVERSAL)
        total += sum((Path(root) / f).stat().st_size for f in files)
    return total


class _RecordingWrites:
    """Wraps the engine's ``checkpoint_engine.save`` for one checkpoint: records the files this rank wrote (to
    flush them) and the first failed write instead of raising it, so DeepSpeed's ``save_checkpoint`` still runs its
    whole collective sequence on every rank and the ranks agree on the failure afterwards."""

    def __init__(self, engine) -> None:
        self.target = engine.checkpoint_engine
        self.paths: list[str] = []
        self.error: str | None = None

    def __enter__(self) -> _RecordingWrites:
        original = self.target.save

        def save(state_dict, path, *args, **kwargs):
            if self.error is not None:
                return None  # after the first failure nothing more is written
            try:
                result = original(state_dict, path, *args, **kwargs)
            except Exception as exc:  # OSError, or RuntimeError from torch.save's zip writer
                self.error = f"writing {path}: {describe(exc)}"
                return None
            self.paths.append(str(path))
            return result

        self.target.save = save  # an instance attribute: shadows the method for this checkpoint only
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(AttributeError):
            del self.target.save


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata a complete checkpoint's ``COMPLETE`` marker holds (step, world size, ZeRO stage, batch and
    data position); ``{}`` beyond the step for markers that hold only a step number."""
    text = (Path(path) / COMPLETE).read_text().strip()
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        meta = None
    if isinstance(meta, dict):
        return meta
    return {"step": int(text)} if text.isdigit() else {}


@dataclass(frozen=True)
class LoadTarget:
    """What to hand DeepSpeed's ``load_checkpoint``: the checkpoint itself, or its universal form."""

    path: Path  # the complete checkpoint folder
    meta: dict[str, Any]
    universal: bool  # the world size or ZeRO stage differs: load the universal (world-size independent) form

    @property
    def load_dir(self) -> Path:
        return self.path if self.universal else self.path.parent

    @property
    def tag(self) -> str:
        return UNIVERSAL if self.universal else self.path.name


class CheckpointManager:
    """Saves, finds, loads and prunes checkpoints of one run."""

    def __init__(self, directory: str | Path, *, keep_last: int, rank: int, min_free_factor: float = 1.1) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.rank = rank
        self.min_free_factor = min_free_factor

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step:08d}"

    @staticmethod
    def step_of(path: Path) -> int:
        m = TAG_RE.match(Path(path).name)
        if not m:
            raise ValueError(f"{path} is not a checkpoint folder name (step_NNNNNNNN)")
        return int(m.group(1))

    def complete_tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))  # type: ignore[union-attr]

    def latest(self) -> Path | None:
        """The newest complete checkpoint. The ``latest`` pointer normally names it; after a crash between the
        marker and the pointer it names an older one, and the newer complete checkpoint wins."""
        tags = self.complete_tags()
        if not tags:
            return None
        pointer = self.dir / LATEST
        if pointer.is_file():
            named = pointer.read_text().strip()
            if named != tags[-1]:
                log.warning("checkpoint pointer %s names %r; the newest complete checkpoint is %r, using it",
                            pointer, named, tags[-1])  # fmt: skip
        return self.dir / tags[-1]

    # ------------------------------------------------------------------------------------------------ save
    def save(self, engine, step: int, client_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Every rank calls this. Returns the checkpoint folder once it is complete and the pointer moved.

        Raises :class:`CheckpointWriteError` on every rank if preparing or writing failed on any rank; the
        previous checkpoint and the pointer are then untouched and the partial folder is removed."""
        tag = self.tag_for(step)
        path = self.dir / tag
        previous = self.latest()
        problem = None
        if self.rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                if path.exists():  # a leftover of a crashed save of the same step: never mix files of two attempts
                    shutil.rmtree(path)
                self.set_aside_newer(step)
                previous = self.latest()
                problem = self._free_space_problem(previous)
            except OSError as exc:
                problem = f"cannot prepare {self.dir}: {describe(exc)}"
        self._raise_if_any(_gather_errors(problem), path, step, previous, stage="before writing")

        error = None
        with _RecordingWrites(engine) as writes:
            try:
                engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
            except Exception as exc:  # a failure outside checkpoint_engine.save (e.g. copying zero_to_fp32.py)
                if is_collective_failure(exc):
                    raise  # a lost peer or a timeout, not a write error: the watchdog names it
                error = describe(exc)
                # DeepSpeed's save ends with a barrier that the ranks whose writes succeeded are waiting in.
                barrier_if_distributed()
        error = error or writes.error
        if error is None:
            try:
                path.mkdir(parents=True, exist_ok=True)
                rng = path / f"rng_rank{self.rank:05d}.pt"
                torch.save(capture_rng_state(engine.device), rng)
                # Each rank flushes what it wrote (a node crash loses the page cache; rank 0's fsync would not
                # reach another node's files on every file system).
                fsync_files([*writes.paths, rng])
            except Exception as exc:
                error = describe(exc)
        if error is not None:
            error += storage_diagnosis(path)
            log.error("rank %d: writing checkpoint %s failed: %s", self.rank, path, error)
        self._raise_if_any(_gather_errors(error), path, step, previous, stage="while writing")

        # Every rank's files are written and flushed: mark the checkpoint complete, then move the pointer.
        if self.rank == 0:
            try:
                fsync_dir(path)
                fsync_write(path / COMPLETE, json.dumps({"step": step, **meta}, sort_keys=True) + "\n")
                fsync_write(self.dir / LATEST, tag)
            except OSError as exc:
                error = describe(exc)
        self._raise_if_any(_gather_errors(error), path, step, previous, stage="while marking it complete")
        if self.rank == 0:
            self._prune(keep=tag)
        barrier_if_distributed()
        log.info("checkpoint saved: %s", path)
        return path

    def set_aside_newer(self, step: int) -> list[Path]:
        """Rank 0: checkpoints of steps after ``step`` belong to a future this run abandoned (it resumed from an
        older checkpoint, e.g. to step back over a loss spike). They are renamed ``abandoned_<tag>_<time>``: kept
        (no data is deleted), but never again taken as the latest, loaded by ``resume latest``, or counted by the
        pruning."""
        moved = []
        if not self.dir.is_dir():
            return moved
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for p in sorted(self.dir.iterdir()):
            m = TAG_RE.match(p.name)
            if m and int(m.group(1)) > step:
                target = p.with_name(f"abandoned_{p.name}_{stamp}")
                os.replace(p, target)
                moved.append(target)
                log.warning("checkpoint %s is newer than step %d, which this run continues from: kept as %s", p, step,
                            target)  # fmt: skip
        return moved

    def _free_space_problem(self, previous: Path | None) -> str | None:
        if not self.min_free_factor or previous is None:
            return None
        size = _folder_bytes(previous)
        free = shutil.disk_usage(self.dir).free
        if free >= size * self.min_free_factor:
            return None
        return (
            f"{self.dir} has {format_bytes(free)} free, less than checkpoint.min_free_factor="
            f"{self.min_free_factor} × the size of the last checkpoint ({format_bytes(size)}, {previous})"
        )

    def _raise_if_any(
        self, errors: list[str | None], path: Path, step: int, previous: Path | None, *, stage: str
    ) -> None:
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # a partial folder only takes space; it is never loaded
        barrier_if_distributed()
        details = "; ".join(f"rank {r}: {e}" for r, e in failed)
        kept = (
            f"the previous complete checkpoint {previous} and the '{LATEST}' pointer are untouched, so "
            f"--checkpoint.resume latest restarts from it"
            if previous is not None
            else "there is no earlier complete checkpoint of this run"
        )
        raise CheckpointWriteError(
            f"checkpoint {path} (step {step}) failed {stage}: {details}. The partial checkpoint was removed; "
            f"{kept}. Free space or fix permissions in {self.dir} (or set run.output_dir to another file "
            f"system; checkpoint.keep_last lowers the space needed), then resume."
        )

    def _prune(self, keep: str) -> None:
        complete = self.complete_tags()
        survivors = set(complete[-self.keep_last :]) | {keep}
        newest = int(TAG_RE.match(keep).group(1))  # type: ignore[union-attr]
        for p in self.dir.iterdir():
            m = TAG_RE.match(p.name)
            if not m or p.name in survivors:
                continue
            # Older complete checkpoints beyond keep_last, and incomplete leftovers older than the newest complete.
            if int(m.group(1)) < newest:
                shutil.rmtree(p, ignore_errors=True)
                log.info("pruned checkpoint %s", p)

    # ------------------------------------------------------------------------------------------------ load
    def resolve(self, resume: str) -> Path | None:
        """``latest`` → the newest complete checkpoint of this run (None if there is none); a path → that one."""
        if resume == "latest":
            return self.latest()
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise ConfigError(
                f"checkpoint.resume={resume!r}: not a complete checkpoint folder (no {COMPLETE} marker); "
                f"use 'latest' or one of {self.complete_tags()[-3:]}"
            )
        return path

    def load_target(self, path: Path, *, world_size: int, zero_stage: int) -> LoadTarget:
        """How to load ``path`` here: directly, or through its universal form when it was written by another
        world size or ZeRO stage (DeepSpeed cannot re-partition ZeRO optimizer state otherwise)."""
        meta = read_meta(path)
        src_world, src_stage = meta.get("world_size"), meta.get("zero_stage")
        if src_world is None or src_stage is None:
            return LoadTarget(path, meta, universal=False)  # no metadata: assume this topology
        if (src_world, src_stage) == (world_size, zero_stage) or src_stage == zero_stage == 0:
            return LoadTarget(path, meta, universal=False)  # without ZeRO the optimizer state is not partitioned
        if (src_stage != zero_stage and 3 in (src_stage, zero_stage)) or 0 in (src_stage, zero_stage):
            # DeepSpeed's universal form carries stages 1 and 2 into each other and stage 3 into stage 3 only.
            raise ConfigError(
                f"checkpoint {path} was written with ZeRO stage {src_stage} on {src_world} ranks; this run uses "
                f"stage {zero_stage} on {world_size}: DeepSpeed can move a checkpoint between world sizes and "
                f"between stages 1 and 2, not into or out of stage {3 if 3 in (src_stage, zero_stage) else 0}; "
                f"resume with zero_optimization.stage={src_stage} (any world size)"
            )
        return LoadTarget(path, meta, universal=True)

    def load(self, engine, target: LoadTarget, *, same_world: bool) -> dict[str, Any]:
        """Load engine, optimizer and scheduler state (and this rank's RNG state when the world size is the
        one the checkpoint was written with); returns the client state."""
        try:
            load_path, client = engine.load_checkpoint(
                str(target.load_dir), tag=target.tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except Exception as exc:
            if is_collective_failure(exc):
                raise
            raise TrainingError(
                f"loading checkpoint {target.path} failed: {describe(exc)}. If it was written by another world "
                f"size or ZeRO stage before checkpoints recorded theirs (no metadata in {COMPLETE}), resume with "
                f"that topology; otherwise resume from an older checkpoint of {self.dir}"
            ) from exc
        if load_path is None:
            raise TrainingError(f"DeepSpeed could not load the checkpoint at {target.path}")
        from .universal import repair_zero3_universal_load  # imports this module

        repair_zero3_universal_load(engine, target)  # Adam steps and group settings (DeepSpeed 0.19.8)
        rng = target.path / f"rng_rank{self.rank:05d}.pt"
        if same_world and rng.is_file():
            restore_rng_state(torch.load(rng, weights_only=True), engine.device)
        elif self.rank == 0:
            log.warning(
                "%s: RNG streams (dropout, augmentation) restart from the seed: the checkpoint was written by "
                "%s ranks, this run has another world size",
                target.path,
                target.meta.get("world_size", "?"),
            )
        return client or {}
