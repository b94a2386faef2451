"""Durable writes and storage diagnostics for checkpoints: fsync'd atomic replacement, flushing what a rank wrote,
and the OS's own words when a write fails."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

__all__ = ["describe", "format_bytes", "fsync_dir", "fsync_files", "fsync_tree", "fsync_write", "storage_diagnosis"]


def _fsync(path: str | Path) -> None:
    """Flush one file or folder (its entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably: a temporary file, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def fsync_files(paths: list[str | Path]) -> None:
    for name in paths:
        _fsync(name)


def fsync_dir(path: Path) -> None:
    _fsync(path)


def fsync_tree(path: Path) -> None:
    """Flush every file of a folder tree and the folders themselves (a kill -9 keeps the page cache, a node crash
    does not)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(root)


def storage_diagnosis(folder: Path) -> str:
    """The OS's own words for a failed write: torch.save's zip writer reports only "unexpected pos", so write a
    1 MiB probe file where the checkpoint goes and report how that fails (disk full, file too large, read-only,
    quota), with the free space."""
    probe = folder / f".write_probe_{os.getpid()}"
    found = ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as fh:
            fh.write(b"\0" * (1 << 20))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        found = f"; a 1 MiB test write there fails with {describe(exc)}"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    with contextlib.suppress(OSError):
        found += f"; {format_bytes(shutil.disk_usage(folder).free)} free"
    return f" ({found[2:]})" if found else ""


def format_bytes(n: float) -> str:
    """``123 B``, ``1.5 KiB`` … ``2.0 TiB``: the one byte format of messages and reports."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
