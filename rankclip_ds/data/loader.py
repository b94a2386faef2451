"""``build_train_loader``: the object the trainer iterates, one epoch at a time, with skip counts and resume state.

Usage::

    loader = build_train_loader("/data/cc3m/{00000..00331}.tar", tokenizer=tok, image_transform=tf, batch_size=256,
                                num_workers=8, seed=0, rank=rank, world_size=world)
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
import multiprocessing as mp
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from rankclip_ds.data.decode import DEFAULT_MAX_PIXELS, parse_caption_key
from rankclip_ds.data.pipeline import RESUME_CURSOR, RESUME_NONE, RESUME_SAMPLES, ShardStream
from rankclip_ds.data.plan import batches_done_per_worker, plan_epoch
from rankclip_ds.data.skips import SkipCounter
from rankclip_ds.data.sources import check_sources_exist, parse_spec, resolve_counts

logger = logging.getLogger(__name__)


class TrainLoader:
    """Iterable per epoch; see the module doc. ``batches_per_epoch`` is identical on every rank."""

    def __init__(
        self,
        dataset: ShardStream,
        dataloader: DataLoader,
        skips: SkipCounter,
        state,
        *,
        start_epoch: int,
        resume_samples: int,
        batch_size: int,
        num_workers: int,
    ):
        self.dataset, self.dataloader, self._skips, self._state = dataset, dataloader, skips, state
        self.batches_per_epoch = dataset.batches_per_epoch
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)
        self.epoch = start_epoch
        self._pending: tuple[int, int, list[tuple[int, int]]] | None = None
        if resume_samples:
            self.resume(start_epoch, samples=resume_samples)
        self._cursors = [0] * self.num_workers
        self._done = [0] * self.num_workers
        self._batches = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict]:
        return self.epoch_iter(self.epoch)

    def resume(self, epoch: int, *, samples: int = 0, state: dict | None = None) -> None:
        """Positions the next ``epoch_iter(epoch)`` after ``samples`` samples consumed on this rank in that epoch
        (a multiple of ``batch_size``), or exactly at a ``state_dict()`` taken from this rank's loader."""
        if state is not None:
            if len(state["cursors"]) != self.num_workers:
                raise ValueError(
                    f"resume state was taken with {len(state['cursors'])} workers, this loader has "
                    f"{self.num_workers}; resume with samples={state['batches'] * self.batch_size}"
                )
            self._pending = (
                int(state["epoch"]),
                RESUME_CURSOR,
                list(zip(state["cursors"], state["done"], strict=True)),
            )
            return
        if samples % self.batch_size:
            raise ValueError(
                f"resume samples={samples} is not a multiple of batch_size={self.batch_size}: pass "
                "the number of samples this rank consumed (batches × per-rank batch size)"
            )
        batches = samples // self.batch_size
        if batches > self.batches_per_epoch:
            raise ValueError(f"resume at {batches} batches but an epoch has {self.batches_per_epoch}")
        done = batches_done_per_worker(batches, self.num_workers)
        self._pending = (int(epoch), RESUME_SAMPLES, [(d * self.batch_size, d) for d in done])

    def epoch_iter(self, epoch: int) -> Iterator[dict]:
        """Iterates the batches of ``epoch`` (the rest of it, if a resume position was set for this epoch)."""
        self.epoch = int(epoch)
        kind, targets = RESUME_NONE, [(0, 0)] * self.num_workers
        if self._pending is not None and self._pending[0] == self.epoch:
            _, kind, targets = self._pending
        self._pending = None
        self._state[0], self._state[1] = self.epoch, kind
        for w, (target, done) in enumerate(targets):
            self._state[2 + 2 * w], self._state[3 + 2 * w] = target, done
        self._state[2 + 2 * self.num_workers] = sum(d for _, d in targets) % self.num_workers
        self._done = [d for _, d in targets]
        self._cursors = [t if kind == RESUME_CURSOR else 0 for t, _ in targets]
        self._batches = sum(self._done)
        return self._generate()

    def _generate(self) -> Iterator[dict]:
        for batch in self.dataloader:
            w = int(batch.pop("_worker"))
            self._cursors[w] = int(batch.pop("_cursor"))
            self._done[w] = int(batch.pop("_done"))
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        """This rank's exact position: ``{"epoch", "batches", "cursors", "done"}`` (small; save one per rank)."""
        return {"epoch": self.epoch, "batches": self._batches, "cursors": list(self._cursors), "done": list(self._done)}

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
    start_epoch: int = 0,
    resume_samples: int = 0,
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
        start_epoch, resume_samples: the first ``iter()`` starts at this epoch after this many samples consumed on
            this rank (see :meth:`TrainLoader.resume` for the exact, ``state_dict`` based alternative).
        pin_memory: default: when CUDA is available. max_pixels: decompression-bomb limit per image.
    """
    if mode not in ("epoch", "resampled"):
        raise ValueError(f"mode={mode!r}: use 'epoch' or 'resampled'")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
    parse_caption_key(caption_key)
    sources = parse_spec(spec, weights)
    check_sources_exist(sources)
    workers = max(1, num_workers)
    per_step = world_size * batch_size
    if mode == "epoch":
        resolve_counts(sources, manifest)
        urls = [u for s in sources for u in s.urls]
        counts = [c for s in sources for c in s.counts]
        plan = plan_epoch(
            urls,
            counts,
            seed=seed,
            epoch=start_epoch,
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
    else:
        if samples_per_epoch is None:
            resolve_counts(sources, manifest)
            samples_per_epoch = sum(c for s in sources for c in s.counts)
        batches = samples_per_epoch // per_step
        if batches < 1:
            raise ValueError(
                f"samples_per_epoch={samples_per_epoch} is less than one global batch "
                f"({world_size} ranks × {batch_size}); raise samples_per_epoch"
            )
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork-safety of HF fast tokenizers in workers
    skips = SkipCounter(shared=True)
    state = mp.Array("q", 3 + 2 * workers, lock=False)  # epoch, kind, (target, done) per worker, shift
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
        state=state,
    )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    # A private generator for the workers' base seed: a DataLoader iterator otherwise draws it from the global torch
    # RNG, so creating one at a resume would shift the stream that dropout draws from, and the resumed steps would
    # differ from the uninterrupted run's (the pipeline's own seeds are integers: see pipeline.py).
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    dataloader = DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, generator=generator, **extra
    )
    return TrainLoader(
        dataset,
        dataloader,
        skips,
        state,
        start_epoch=start_epoch,
        resume_samples=resume_samples,
        batch_size=batch_size,
        num_workers=num_workers,
    )
