"""Who reads what: contiguous, balanced slices of an evaluation input per rank and per DataLoader worker.

A *piece* is a run of samples in input order: records ``[start, stop)`` of one shard (:class:`ShardPiece`) or files
``[start, stop)`` of an ImageFolder listing (:class:`FolderPiece`). Splitting a list of pieces into ``parts``
contiguous runs and concatenating the parts in order gives the input back, so results gathered in rank order (then
worker order, restored by the sort keys) are in input order. Every sample gets a sort key: its position in the
listing (ImageFolder) or ``shard position · 2³² + record index`` (shards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rankclip_ds.data.sources import shard_count

__all__ = ["SHARD_KEY_STRIDE", "FolderPiece", "ShardPiece", "plan_shard_pieces", "split_contiguous"]

SHARD_KEY_STRIDE = 1 << 32  # sort key = shard position × stride + record index


@dataclass(frozen=True)
class ShardPiece:
    """Records ``start <= r < stop`` of the shard at position ``shard_pos`` of the spec (``stop`` None: to the end)."""

    url: str
    shard_pos: int
    start: int
    stop: int | None

    @property
    def size(self) -> int | None:
        return None if self.stop is None else self.stop - self.start


@dataclass(frozen=True)
class FolderPiece:
    """Files ``start <= i < stop`` of an ImageFolder listing."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def split_contiguous(pieces: Sequence, parts: int, part: int) -> list:
    """Part ``part`` of ``parts`` contiguous, balanced runs of ``pieces`` (in order).

    When every piece knows its ``size``, runs are balanced by sample count and a piece may be cut (part ``p`` gets
    samples ``[p·T/parts, (p+1)·T/parts)`` of the ``T`` in total); otherwise whole pieces are split by count.
    """
    if not 0 <= part < parts:
        raise ValueError(f"part {part} outside [0, {parts})")
    sizes = [p.size for p in pieces]
    if any(s is None for s in sizes):
        n = len(pieces)
        return list(pieces[part * n // parts : (part + 1) * n // parts])
    total = sum(sizes)
    lo, hi = part * total // parts, (part + 1) * total // parts
    out, offset = [], 0
    for piece, size in zip(pieces, sizes, strict=True):
        a, b = max(lo, offset), min(hi, offset + size)
        if a < b:
            start = piece.start + (a - offset)
            out.append(_with_range(piece, start, start + (b - a)))
        offset += size
    return out


def _with_range(piece, start: int, stop: int):
    if isinstance(piece, ShardPiece):
        return ShardPiece(piece.url, piece.shard_pos, start, stop)
    return FolderPiece(start, stop)


def plan_shard_pieces(urls: Sequence[str]) -> list[ShardPiece]:
    """One piece per shard, with its record count when a manifest or the tar headers give it (else ``stop=None``)."""
    cache: dict = {}
    pieces = []
    for pos, url in enumerate(urls):
        count = shard_count(url, cache=cache, scan=True)
        pieces.append(ShardPiece(url, pos, 0, count))
    return pieces
