"""``build_train_loader``: the object the trainer iterates, one epoch at a time, with skip counts and resume state.

Usage::

    loader = build_train_loader("/data/cc3m/{00000..00331}.tar", tokenizer=tok, image_transform=tf, batch_size=256,
                                num_workers=8, seed=0, rank=rank, world_size=world)
    loader.resume(start_epoch, samples=samples_done_on_this_rank)  # when resuming mid-epoch
    for epoch in range(start_epoch, epochs):
        for batch in loader.epoch_iter(epoch):   # exactly loader.batches_per_epoch batches, on every rank
            ...
        log(loader.skip_counts())

Batches are dicts: ``image`` float32 (B, 3, H, W), ``input_ids`` and ``attention_mask`` long (B, L), ``key``
list[str], ``epoch`` int. Skip counts reach the main process through a shared array that the workers add to at
every batch they hand over (see :mod:`rankclip_ds.data.skips`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from rankclip_ds.data.decode import DEFAULT_MAX_PIXELS, parse_caption_key
from rankclip_ds.data.pipeline import EpochStart, ResumeKind, ShardStream
from rankclip_ds.data.plan import batches_done_per_worker, plan_epoch
from rankclip_ds.data.skips import SkipCounter
from rankclip_ds.data.sources import Source, check_sources_exist, parse_spec, resolve_counts

logger = logging.getLogger(__name__)


class TrainLoader:
    """Iterable per epoch; see the module doc. ``batches_per_epoch`` is identical on every rank."""

    def __init__(
        self,
        dataset: ShardStream,
        dataloader: DataLoader,
        skips: SkipCounter,
        start: EpochStart,
        *,
        batch_size: int,
        num_workers: int,
    ):
        self.dataset, self.dataloader, self._skips, self._start = dataset, dataloader, skips, start
        self.batches_per_epoch = dataset.batches_per_epoch
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)
        self._pending: tuple[int, list[tuple[int, int]]] | None = None  # (epoch, (skip, done) per worker)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def resume(self, epoch: int, *, samples: int = 0) -> None:
        """Positions the next ``epoch_iter(epoch)`` after ``samples`` samples consumed on this rank in that epoch
        (a multiple of ``batch_size``)."""
        if samples % self.batch_size:
            raise ValueError(
                f"resume samples={samples} is not a multiple of batch_size={self.batch_size}: pass "
                "the number of samples this rank consumed (batches × per-rank batch size)"
            )
        batches = samples // self.batch_size
        if batches > self.batches_per_epoch:
            raise ValueError(f"resume at {batches} batches but an epoch has {self.batches_per_epoch}")
        done = batches_done_per_worker(batches, self.num_workers)
        self._pending = (int(epoch), [(d * self.batch_size, d) for d in done])

    def epoch_iter(self, epoch: int) -> Iterator[dict]:
        """Iterates the batches of ``epoch`` (the rest of it, if a resume position was set for this epoch)."""
        epoch = int(epoch)
        resuming = self._pending is not None and self._pending[0] == epoch
        per_worker = self._pending[1] if resuming else [(0, 0)] * self.num_workers
        self._pending = None
        kind = ResumeKind.AFTER_SAMPLES if resuming else ResumeKind.FROM_START
        self._start.write(epoch, kind, per_worker)
        return iter(self.dataloader)

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples (and ignored members) by reason, summed over this rank's workers since start-up."""
        return self._skips.counts()


def build_train_loader(
    spec: str | list[str],
    *,
    tokenizer,
    image_transform,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    mode: str = "epoch",
    samples_per_epoch: int | None = None,
    weights: list[float] | None = None,
    manifest: str | dict | None = None,
    shuffle_buffer: int = 1000,
    max_text_len: int = 77,
    caption_key: str = "txt",
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> TrainLoader:
    """Builds the training loader for one rank.

    Args:
        spec: shard spec (brace expressions joined with ``::``, optional ``@WEIGHT``; see ``sources``).
        tokenizer: a Hugging Face tokenizer (called on the batch's captions in the workers), or None to get raw
            ``text`` lists instead of ``input_ids``/``attention_mask``.
        image_transform: an :class:`~rankclip_ds.data.transforms.ImageTransform` (fast path) or any callable
            PIL image → float tensor (3, H, W).
        batch_size: per-rank batch size. seed: base seed. rank, world_size: this process's data-parallel position.
        mode: ``"epoch"`` (each sample at most once per epoch, equal batches per rank by construction; needs sample
            counts, see ``manifest``) or ``"resampled"`` (shards drawn with replacement by weight, infinite).
        samples_per_epoch: virtual epoch length over all ranks (resampled mode; default: the counted total).
        weights: per-source weights (instead of ``@WEIGHT`` suffixes). manifest: path or dict shard-name → count.
        shuffle_buffer: samples in each worker's shuffle buffer. max_text_len: token length (padding, truncation).
        caption_key: ``txt`` or ``json:FIELD`` (a field may hold a list: one caption is chosen per epoch).
        pin_memory: default: when CUDA is available. max_pixels: decompression-bomb limit per image.
    """
    _check_loader_args(mode, rank=rank, world_size=world_size, batch_size=batch_size, num_workers=num_workers)
    parse_caption_key(caption_key)
    sources = parse_spec(spec, weights)
    check_sources_exist(sources)
    workers = max(1, num_workers)
    if mode == "epoch":
        batches = _epoch_mode_batches(sources, manifest, seed, world_size, workers, batch_size)
    else:
        batches = _resampled_mode_batches(
            sources, manifest, samples_per_epoch, world_size=world_size, batch_size=batch_size
        )
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork-safety of HF fast tokenizers in workers
    skips = SkipCounter(shared=True)
    start = EpochStart(workers)
    dataset = ShardStream(
        sources,
        mode=mode,
        tokenizer=tokenizer,
        image_transform=image_transform,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=workers,
        batches_per_epoch=batches,
        shuffle_buffer=shuffle_buffer,
        max_text_len=max_text_len,
        caption_key=caption_key,
        max_pixels=max_pixels,
        skips=skips,
        start=start,
    )
    dataloader = _build_dataloader(dataset, num_workers, pin_memory, persistent_workers, prefetch_factor, seed, rank)
    return TrainLoader(
        dataset,
        dataloader,
        skips,
        start,
        batch_size=batch_size,
        num_workers=num_workers,
    )


def _check_loader_args(mode: str, *, rank: int, world_size: int, batch_size: int, num_workers: int) -> None:
    """Rejects a mode, rank, batch size or worker count that no loader can be built with."""
    if mode not in ("epoch", "resampled"):
        raise ValueError(f"mode={mode!r}: use 'epoch' or 'resampled'")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")


def _epoch_mode_batches(
    sources: list[Source],
    manifest: str | dict | None,
    seed: int,
    world_size: int,
    workers: int,
    batch_size: int,
) -> int:
    """Batches per rank per epoch in epoch mode (the same in every epoch): counts the samples (``manifest``), plans
    epoch 0 and logs the plan, with a warning when there are fewer shards than rank × worker slots."""
    resolve_counts(sources, manifest)
    urls = [u for s in sources for u in s.urls]
    counts = [c for s in sources for c in s.counts]
    plan = plan_epoch(
        urls,
        counts,
        seed=seed,
        epoch=0,
        world_size=world_size,
        num_workers=workers,
        batch_size=batch_size,
    )
    batches = plan.batches_per_rank
    logger.info(
        "epoch mode: %d samples in %d shards, %d batches per rank per epoch, %d samples dropped per epoch",
        sum(counts),
        len(urls),
        batches,
        plan.dropped,
    )
    if len(urls) < world_size * workers:
        logger.warning(
            "%d shards for %d ranks × %d workers: shards are split by sample range, which reads some "
            "shards twice; more shards than rank×worker slots is faster",
            len(urls),
            world_size,
            workers,
        )
    return batches


def _resampled_mode_batches(
    sources: list[Source],
    manifest: str | dict | None,
    samples_per_epoch: int | None,
    *,
    world_size: int,
    batch_size: int,
) -> int:
    """Batches per rank in a virtual epoch of resampled mode: ``samples_per_epoch`` (default: the counted total)
    over the global batch; at least one global batch is required."""
    if samples_per_epoch is None:
        resolve_counts(sources, manifest)
        samples_per_epoch = sum(c for s in sources for c in s.counts)
    batches = samples_per_epoch // (world_size * batch_size)
    if batches < 1:
        raise ValueError(
            f"samples_per_epoch={samples_per_epoch} is less than one global batch "
            f"({world_size} ranks × {batch_size}); raise samples_per_epoch"
        )
    return batches


def _build_dataloader(
    dataset: ShardStream,
    num_workers: int,
    pin_memory: bool | None,
    persistent_workers: bool,
    prefetch_factor: int,
    seed: int,
    rank: int,
) -> DataLoader:
    """The ``DataLoader`` over ``dataset`` (already batched: ``batch_size=None``); pins memory by default when CUDA
    is available."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    # A private generator for the workers' base seed: a DataLoader iterator otherwise draws it from the global torch
    # RNG, so creating one at a resume would shift the stream that dropout draws from, and the resumed steps would
    # differ from the uninterrupted run's (the pipeline's own seeds are integers: see pipeline.py).
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, generator=generator, **extra
    )
