"""The epoch plan: one global sample order per epoch, cut into optimizer steps, then into ranks.

The order does not depend on the world size, the micro batch or the number of DataLoader workers, so a run resumed
on another number of ranks (with the same global batch) trains every global step on exactly the samples of the
uninterrupted run.

**Streams.** An epoch's records come from ``S`` *streams* (``data.streams``, fixed for the life of a run and
recorded in its checkpoints). The shard order is shuffled with a seed made of (seed, epoch) only; the shuffled
shards are laid end to end and cut into ``S`` contiguous record ranges, one per stream, each exactly as long as
the stream's part of the epoch. Each stream reads its range through its own seeded shuffle buffer, so its sample
sequence is a function of (data, seed, epoch, stream) alone.

**Steps.** Global step ``s`` of an epoch has ``G`` (the global batch) positions; stream ``k`` fills the ``share(k)``
consecutive positions starting at ``offset(k)`` (``G // S`` each, the first ``G % S`` streams one more) with its
samples ``s·share(k) … (s+1)·share(k) − 1``. Rank ``r`` of ``W`` takes positions ``r·G/W … (r+1)·G/W − 1`` of every
step: whole streams where it can, a part of a stream's share where a stream straddles two ranks (both then read
that stream and keep their own part). A shard may be cut between two streams (each reads its own record range),
so uneven shard counts and sizes never give one stream fewer samples than another; the < ``G`` records left at
the end of the shuffled order are dropped for that epoch (a different tail every epoch).

All seeds are derived from integers through ``numpy.random.SeedSequence``, never from Python's ``hash``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

# Tags that keep the random streams of the different uses of (seed, epoch, stream) apart.
TAG_SHARD_ORDER = 1
TAG_SAMPLE_SHUFFLE = 2
TAG_PADDING = 3
TAG_RESAMPLE = 4
TAG_CROP = 5


def derive_seed(*values: int) -> int:
    """A 64-bit seed from non-negative integers; identical in every process and under any PYTHONHASHSEED."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(1, np.uint64)[0])


def make_rng(*values: int) -> random.Random:
    return random.Random(derive_seed(*values))


@dataclass(frozen=True)
class Piece:
    """Records ``start <= i < stop`` of shard ``url`` (record indices as counted by ``records.iter_records``)."""

    url: str
    start: int
    stop: int


@dataclass(frozen=True)
class Segment:
    """Positions ``lo <= i < hi`` of ``stream``'s share of every step (``0 <= lo < hi <= share``)."""

    stream: int
    lo: int
    hi: int


@dataclass(frozen=True)
class StepLayout:
    """How the ``global_batch`` positions of every step are filled by ``streams`` streams and split over ranks."""

    global_batch: int
    streams: int

    def __post_init__(self) -> None:
        if not 1 <= self.streams <= self.global_batch:
            raise ValueError(
                f"data.streams={self.streams} must be between 1 and the global batch {self.global_batch}: each "
                "stream gives at least one sample to every step; use at most the global batch"
            )

    def share(self, stream: int) -> int:
        """Samples that ``stream`` gives to every step."""
        base, extra = divmod(self.global_batch, self.streams)
        return base + (1 if stream < extra else 0)

    def offset(self, stream: int) -> int:
        """The step position of ``stream``'s first sample."""
        base, extra = divmod(self.global_batch, self.streams)
        return stream * base + min(stream, extra)

    def segments(self, lo: int, hi: int) -> list[Segment]:
        """The stream parts that fill step positions ``lo <= p < hi``, in position order."""
        out = []
        for k in range(self.streams):
            start, size = self.offset(k), self.share(k)
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                out.append(Segment(k, a - start, b - start))
        return out

    def rank_segments(self, rank: int, world_size: int) -> list[Segment]:
        """The stream parts of rank ``rank``'s ``global_batch / world_size`` positions of every step."""
        if self.global_batch % world_size:
            raise ValueError(f"global batch {self.global_batch} does not split over {world_size} ranks")
        per_rank = self.global_batch // world_size
        return self.segments(rank * per_rank, (rank + 1) * per_rank)

    def worker_segments(self, rank: int, world_size: int, num_workers: int) -> list[list[Segment]]:
        """Rank ``rank``'s segments dealt to its ``num_workers`` workers in turn (a worker may get none)."""
        segments = self.rank_segments(rank, world_size)
        return [segments[w::num_workers] for w in range(num_workers)]


def default_streams(world_size: int, num_workers: int, global_batch: int, streams: int | None = None) -> int:
    """``streams`` if given, else one per (rank, worker) slot of this run (at most the global batch)."""
    if streams is not None:
        return streams
    return min(global_batch, world_size * max(1, num_workers))


@dataclass
class EpochPlan:
    epoch: int
    steps: int  # optimizer steps in the epoch (identical for every world size)
    pieces: list[list[Piece]]  # [stream] -> pieces in read order, steps × share(stream) records each
    dropped: int  # records of this epoch read by no stream

    def describe(self) -> str:
        lines = [f"epoch {self.epoch}: {self.steps} steps, {self.dropped} records dropped"]
        for k, pieces in enumerate(self.pieces):
            lines.append(f"  stream {k}: {sum(p.stop - p.start for p in pieces)} records from {len(pieces)} pieces")
        return "\n".join(lines)


def plan_epoch(urls: list[str], counts: list[int], *, seed: int, epoch: int, layout: StepLayout) -> EpochPlan:
    """Computes the epoch plan (identical in every process, for every world size, for the same arguments)."""
    if len(urls) != len(counts):
        raise ValueError(f"{len(urls)} shards but {len(counts)} counts")
    total = int(sum(counts))
    steps = total // layout.global_batch
    if steps == 0:
        raise ValueError(
            f"{total} samples in {len(urls)} shards cannot fill one global batch of {layout.global_batch}: add "
            "data, lower the batch size, or use mode='resampled' with samples_per_epoch"
        )
    order = list(range(len(urls)))
    make_rng(seed, epoch, TAG_SHARD_ORDER).shuffle(order)
    pieces: list[list[Piece]] = [[] for _ in range(layout.streams)]
    shard_pos, offset = 0, 0  # position in the shuffled shard order, and the first unread record of that shard
    for k in range(layout.streams):
        need = steps * layout.share(k)
        while need > 0:
            i = order[shard_pos]
            available = counts[i] - offset
            if available <= 0:
                shard_pos, offset = shard_pos + 1, 0
                continue
            take = min(need, available)
            pieces[k].append(Piece(urls[i], offset, offset + take))
            need -= take
            offset += take
    return EpochPlan(epoch, steps, pieces, total - steps * layout.global_batch)
