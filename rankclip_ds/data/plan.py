"""The epoch plan: which records of which shards each (rank, worker) reads in an epoch, equal by construction.

Epoch mode shuffles the shard order with a seed made of (seed, epoch) only, lays the shuffled shards end to end
and cuts the resulting sequence of records into contiguous pieces, one per (rank, worker) slot, of exactly
``quota × batch_size`` records each, where every rank gets ``batches_per_rank = total // (world_size × batch_size)``
batches and its workers split them as evenly as possible. A shard may be cut between two slots (each reads its own
record range), so uneven shard counts and sizes never give a rank fewer batches than another, and every record is
read at most once per epoch; the < world_size × batch_size records left at the end of the shuffled order are
dropped for that epoch (a different tail every epoch).

All seeds are derived from integers through ``numpy.random.SeedSequence``, never from Python's ``hash``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

# Tags that keep the random streams of the different uses of (seed, epoch, rank, worker) apart.
TAG_SHARD_ORDER = 1
TAG_SAMPLE_SHUFFLE = 2
TAG_PADDING = 3
TAG_RESAMPLE = 4


def derive_seed(*values: int) -> int:
    """A 64-bit seed from non-negative integers; identical in every process and under any PYTHONHASHSEED."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(1, np.uint64)[0])


def make_rng(*values: int) -> random.Random:
    return random.Random(derive_seed(*values))


def worker_quotas(batches_per_rank: int, num_workers: int) -> list[int]:
    """Batches per worker, the first ``batches_per_rank % num_workers`` workers one more.

    This matches the order in which ``torch.utils.data.DataLoader`` takes batches from its workers (round robin),
    so after ``n`` batches of a rank, worker ``w`` has produced ``n // W + (w < n % W)`` of them.
    """
    base, extra = divmod(batches_per_rank, num_workers)
    return [base + (1 if w < extra else 0) for w in range(num_workers)]


def batches_done_per_worker(batches: int, num_workers: int) -> list[int]:
    return worker_quotas(batches, num_workers)


@dataclass(frozen=True)
class Piece:
    """Records ``start <= i < stop`` of shard ``url`` (record indices as counted by ``records.iter_records``)."""

    url: str
    start: int
    stop: int


@dataclass
class EpochPlan:
    epoch: int
    batches_per_rank: int
    quotas: list[int]  # batches per worker (same on every rank)
    pieces: list[list[list[Piece]]]  # [rank][worker] -> pieces in read order
    dropped: int  # records of this epoch read by no slot

    def describe(self) -> str:
        lines = [f"epoch {self.epoch}: {self.batches_per_rank} batches per rank, {self.dropped} records dropped"]
        for r, workers in enumerate(self.pieces):
            for w, pieces in enumerate(workers):
                shards = len({p.url for p in pieces})
                lines.append(f"  rank {r} worker {w}: {self.quotas[w]} batches from {shards} shards")
        return "\n".join(lines)


def plan_epoch(
    urls: list[str], counts: list[int], *, seed: int, epoch: int, world_size: int, num_workers: int, batch_size: int
) -> EpochPlan:
    """Computes the epoch plan (identical on every rank and worker for the same arguments)."""
    if len(urls) != len(counts):
        raise ValueError(f"{len(urls)} shards but {len(counts)} counts")
    total = int(sum(counts))
    per_step = world_size * batch_size
    batches_per_rank = total // per_step
    if batches_per_rank == 0:
        shards_each = len(urls) / max(1, world_size * num_workers)
        raise ValueError(
            f"{total} samples in {len(urls)} shards cannot give one batch of {batch_size} to each of {world_size} "
            f"ranks ({shards_each:.2f} shards per rank×worker with {num_workers} workers): add data, lower "
            "batch_size, or use mode='resampled' with samples_per_epoch"
        )
    quotas = worker_quotas(batches_per_rank, num_workers)
    order = list(range(len(urls)))
    make_rng(seed, epoch, TAG_SHARD_ORDER).shuffle(order)
    pieces: list[list[list[Piece]]] = [[[] for _ in range(num_workers)] for _ in range(world_size)]
    shard_pos, offset = 0, 0  # position in the shuffled shard order, and the first unread record of that shard
    for r in range(world_size):
        for w in range(num_workers):
            need = quotas[w] * batch_size
            while need > 0:
                i = order[shard_pos]
                available = counts[i] - offset
                if available <= 0:
                    shard_pos, offset = shard_pos + 1, 0
                    continue
                take = min(need, available)
                pieces[r][w].append(Piece(urls[i], offset, offset + take))
                need -= take
                offset += take
    return EpochPlan(epoch, batches_per_rank, quotas, pieces, total - batches_per_rank * per_step)
