"""Deterministic WebDataset tar writer: identical input gives byte-identical shards.

Every member gets a fixed mtime, uid/gid 0, empty user/group names and mode 0o644, and members are written in the
order given, so a shard's bytes depend only on its samples. ``ShardSink`` rolls over to a new
``{prefix}-{index:06d}.tar`` every ``samples_per_shard`` samples.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: a constant so the bytes never depend on the wall clock


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class TarShardWriter:
    """Writes samples (``{"__key__": str, ext: bytes | str}``) into one tar file, members in sorted-extension order."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.count = 0

    def write(self, sample: Mapping[str, bytes | str]) -> None:
        key = sample["__key__"]
        if not key or "." in os.path.basename(key):
            raise ValueError(f"sample key {key!r} is empty or contains a '.'; keys must not contain dots")
        for ext in sorted(k for k in sample if not k.startswith("__")):
            value = sample[ext]
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            self._tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self._tmp, self.path)  # a shard only appears under its final name once complete

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardSink:
    """Writes ``{prefix}-000000.tar``, ``{prefix}-000001.tar`` … with at most ``samples_per_shard`` samples each.

    ``shard_counts`` maps each written shard's file name to its number of samples (the manifest).
    """

    def __init__(self, output_dir: str | os.PathLike, prefix: str, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.shard_counts: dict[str, int] = {}
        self._writer: TarShardWriter | None = None
        self._index = 0

    def write(self, sample: Mapping[str, bytes | str]) -> None:
        if self._writer is None or self._writer.count >= self.samples_per_shard:
            self._roll()
        assert self._writer is not None
        self._writer.write(sample)

    def _roll(self) -> None:
        self._close_current()
        path = self.output_dir / f"{self.prefix}-{self._index:06d}.tar"
        self._index += 1
        self._writer = TarShardWriter(path)

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.shard_counts[self._writer.path.name] = self._writer.count
            self._writer = None

    def close(self) -> None:
        self._close_current()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
