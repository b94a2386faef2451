"""Checkpoints: DeepSpeed engine state + our client state, a pointer updated atomically, pruning after success.

Layout under ``<run>/checkpoints/``::

    step_00000100/            one DeepSpeed tag (every rank writes its ZeRO shards here)
        rng_rank00000.pt      per-rank RNG states (DeepSpeed's client state is written by rank 0 only)
        COMPLETE              written by rank 0 after every rank's files are on disk (a barrier)
    latest                    text file naming the newest complete tag; DeepSpeed's and zero_to_fp32's format

Every rank calls :meth:`CheckpointManager.save` (ZeRO state is sharded; saving on rank 0 only hangs ZeRO-3). The
pointer is replaced atomically (write + fsync + rename) only after ``COMPLETE`` exists, so a crash mid-write never
makes a partial checkpoint the latest, and older checkpoints are pruned only after a newer one is complete.
The checkpoint folder must be on a file system every rank sees (as DeepSpeed's ``latest`` already assumes).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["CheckpointManager", "capture_rng_state", "restore_rng_state"]

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{8,})$")
COMPLETE = "COMPLETE"
LATEST = "latest"


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    # random.setstate needs tuples all the way down; serialisation may have produced lists.
    if isinstance(x, (list, tuple)):
        return tuple(_as_tuple(v) for v in x)
    return x


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves, finds, loads and prunes checkpoints of one run."""

    def __init__(self, directory: str | Path, *, keep_last: int, rank: int) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.rank = rank

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step:08d}"

    def complete_tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))  # type: ignore[union-attr]

    def latest(self) -> Path | None:
        """The checkpoint the ``latest`` pointer names, if it is complete; else the newest complete one."""
        pointer = self.dir / LATEST
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if (self.dir / tag / COMPLETE).is_file():
                return self.dir / tag
            log.warning(
                "checkpoint pointer %s names %r, which is not complete; using the newest complete one", pointer, tag
            )
        tags = self.complete_tags()
        return self.dir / tags[-1] if tags else None

    def save(self, engine, step: int, client_state: dict[str, Any]) -> Path:
        """Every rank calls this. Returns the checkpoint folder once it is complete and the pointer moved."""
        tag = self.tag_for(step)
        path = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a leftover of a crashed save of the same step: never mix files of two attempts
                shutil.rmtree(path)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(capture_rng_state(), path / f"rng_rank{self.rank:05d}.pt")
        _barrier()  # every rank's shards and RNG file are written
        if self.rank == 0:
            _fsync_write(path / COMPLETE, f"{step}\n")
            _fsync_write(self.dir / LATEST, tag)
            self._prune(keep=tag)
        _barrier()
        log.info("checkpoint saved: %s", path)
        return path

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

    def resolve(self, resume: str) -> Path | None:
        """``latest`` → the newest complete checkpoint of this run (None if there is none); a path → that one."""
        if resume == "latest":
            return self.latest()
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(
                f"checkpoint.resume={resume!r}: not a complete checkpoint folder (no {COMPLETE} marker); "
                f"use 'latest' or one of {self.complete_tags()[-3:]}"
            )
        return path

    def load(self, engine, path: Path) -> dict[str, Any]:
        """Load engine, optimizer and scheduler state and this rank's RNG state; returns the client state."""
        load_path, client = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        rng = path / f"rng_rank{self.rank:05d}.pt"
        if rng.is_file():
            restore_rng_state(torch.load(rng, weights_only=True))
        else:
            log.warning("no RNG state for rank %d in %s (different world size?): RNG streams restart", self.rank, path)
        return client or {}
