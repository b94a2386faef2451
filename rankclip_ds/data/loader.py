"""``build_train_loader``: the object the trainer iterates, one epoch at a time, with skip counts and resume state.

Usage::

    loader = build_train_loader("/data/cc3m/{00000..00331}.tar", tokenizer=tok, image_transform=tf, batch_size=256,
                                grad_accum_steps=1, num_workers=8, seed=0, rank=rank, world_size=world)
    loader.resume(start_epoch, samples=samples_done_on_this_rank)  # when resuming mid-epoch (whole steps)
    for epoch in range(start_epoch, epochs):
        for batch in loader.epoch_iter(epoch):   # exactly loader.batches_per_epoch batches, on every rank
            ...
        log(loader.skip_counts())

Batches are dicts: ``image`` float32 (B, 3, H, W), ``input_ids`` and ``attention_mask`` long (B, L), ``key``
list[str], ``epoch`` int. Each optimizer step's ``grad_accum_steps`` micro-batches are this rank's positions of the
step in the global order (``plan``), put together from the parts its workers hand over. Skip counts reach the main
process through a shared array that the workers add to at every part they hand over (see
:mod:`rankclip_ds.data.skips`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from rankclip_ds.data.decode import DEFAULT_MAX_PIXELS, parse_caption_key
from rankclip_ds.data.pipeline import EpochStart, ShardStream
from rankclip_ds.data.plan import StepLayout, default_streams, plan_epoch
from rankclip_ds.data.remote import RemotePolicy
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
        grad_accum_steps: int,
        pin_memory: bool,
    ):
        self.dataset, self.dataloader, self._skips, self._start = dataset, dataloader, skips, start
        self.batch_size, self.grad_accum_steps, self.pin_memory = batch_size, grad_accum_steps, pin_memory
        self.steps_per_epoch = dataset.steps_per_epoch
        self.batches_per_epoch = self.steps_per_epoch * grad_accum_steps
        self._pending: tuple[int, int] | None = None  # (epoch, optimizer steps done)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def streams(self) -> int:
        """The number of streams of the global order (recorded in checkpoints: a resume keeps it)."""
        return self.dataset.layout.streams

    def resume(self, epoch: int, *, samples: int = 0) -> None:
        """Positions the next ``epoch_iter(epoch)`` after ``samples`` samples consumed on this rank in that epoch
        (whole optimizer steps: a multiple of ``batch_size × grad_accum_steps``)."""
        per_step = self.batch_size * self.grad_accum_steps
        if samples % per_step:
            raise ValueError(
                f"resume samples={samples} is not a multiple of batch_size={self.batch_size} × grad_accum_steps="
                f"{self.grad_accum_steps}: pass the samples this rank consumed in whole optimizer steps"
            )
        steps = samples // per_step
        if steps > self.steps_per_epoch:
            raise ValueError(f"resume at step {steps} of an epoch but an epoch has {self.steps_per_epoch}")
        self._pending = (int(epoch), steps)

    def epoch_iter(self, epoch: int) -> Iterator[dict]:
        """Iterates the micro-batches of ``epoch`` (the rest of it, if a resume position was set for this epoch)."""
        epoch = int(epoch)
        done = self._pending[1] if self._pending is not None and self._pending[0] == epoch else 0
        self._pending = None
        self._start.write(epoch, done)
        return self._batches(epoch, done)

    def _batches(self, epoch: int, done: int) -> Iterator[dict]:
        if done >= self.steps_per_epoch:
            return
        parts = iter(self.dataloader)
        active = self.dataset.active_workers
        for step in range(done, self.steps_per_epoch):
            share = merge_parts([next(parts) for _ in range(active)], step=step, epoch=epoch, pin=self.pin_memory)
            for m in range(self.grad_accum_steps):
                yield slice_batch(share, m * self.batch_size, (m + 1) * self.batch_size)

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples (and ignored members) by reason, summed over this rank's workers since start-up."""
        return self._skips.counts()


def merge_parts(parts: list[dict], *, step: int, epoch: int, pin: bool = False) -> dict:
    """This rank's samples of one step, in step-position order, from its workers' parts; with ``pin``, the tensors
    are put together straight into page-locked memory (one copy, as the DataLoader's own pinning would make)."""
    for part in parts:
        if (part["step"], part["epoch"]) != (step, epoch):
            raise RuntimeError(
                f"data workers out of step: expected epoch {epoch} step {step}, a worker handed over epoch "
                f"{part['epoch']} step {part['step']} (a bug in the loader; please report it)"
            )
    positions = torch.cat([p["pos"] for p in parts])
    # Workers are dealt their segments in position order, so the parts usually arrive sorted: no reordering copy.
    order = None if bool((positions[1:] > positions[:-1]).all()) else torch.argsort(positions)
    out: dict = {"epoch": epoch}
    for name, value in parts[0].items():
        if name in ("step", "epoch", "pos"):
            continue
        if isinstance(value, torch.Tensor):
            out[name] = _joined([p[name] for p in parts], order, pin)
        else:
            joined = [x for p in parts for x in p[name]]
            out[name] = joined if order is None else [joined[i] for i in order.tolist()]
    return out


def _joined(tensors: list[torch.Tensor], order: torch.Tensor | None, pin: bool) -> torch.Tensor:
    """The parts' rows concatenated (and put in ``order``) with one copy, into pinned memory when ``pin``."""
    if len(tensors) == 1 and order is None and not pin:
        return tensors[0]
    rows = sum(len(t) for t in tensors)
    out = torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype, pin_memory=pin)
    if order is None:
        return torch.cat(tensors, out=out)
    return torch.index_select(torch.cat(tensors), 0, order, out=out)


def slice_batch(share: dict, lo: int, hi: int) -> dict:
    """Rows ``lo:hi`` of a merged share (tensors and lists alike)."""
    return {k: v[lo:hi] if isinstance(v, (torch.Tensor, list)) else v for k, v in share.items()}


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
    grad_accum_steps: int = 1,
    streams: int | None = None,
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
    remote: RemotePolicy | None = None,
) -> TrainLoader:
    """Builds the training loader for one rank.

    Args:
        spec: shard spec (brace expressions joined with ``::``, optional ``@WEIGHT``; see ``sources``).
        tokenizer: a Hugging Face tokenizer (called on each caption in the workers), or None to get raw ``text``
            lists instead of ``input_ids``/``attention_mask``.
        image_transform: an :class:`~rankclip_ds.data.transforms.ImageTransform` (fast path) or any callable
            PIL image → float tensor (3, H, W).
        batch_size: per-rank micro batch. grad_accum_steps: micro-batches per optimizer step. seed: base seed.
        rank, world_size: this process's data-parallel position; the global batch is
            ``batch_size × grad_accum_steps × world_size``.
        streams: the number of streams the global order is made of (``plan``); keep it for the life of a run.
            Default: ``world_size × max(1, num_workers)`` (at most the global batch).
        mode: ``"epoch"`` (each sample at most once per epoch, equal batches per rank by construction; needs sample
            counts, see ``manifest``) or ``"resampled"`` (shards drawn with replacement by weight, infinite).
        samples_per_epoch: virtual epoch length over all ranks (resampled mode; default: the counted total).
        weights: per-source weights (instead of ``@WEIGHT`` suffixes). manifest: path or dict shard-name → count.
        shuffle_buffer: samples in each stream's shuffle buffer. max_text_len: token length (padding, truncation).
        caption_key: ``txt`` or ``json:FIELD`` (a field may hold a list: one caption is chosen per epoch).
        pin_memory: default: when CUDA is available. max_pixels: decompression-bomb limit per image.
        remote: retries and timeouts for ``http(s)://`` and ``s3://`` shards (default: ``RemotePolicy()``).
    """
    _check_loader_args(mode, rank=rank, world_size=world_size, batch_size=batch_size, num_workers=num_workers)
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1")
    parse_caption_key(caption_key)
    sources = parse_spec(spec, weights)
    check_sources_exist(sources)
    workers = max(1, num_workers)
    global_batch = batch_size * grad_accum_steps * world_size
    layout = StepLayout(global_batch, default_streams(world_size, num_workers, global_batch, streams))
    if mode == "epoch":
        steps = _epoch_mode_steps(sources, manifest, seed, layout, remote)
    else:
        steps = _resampled_mode_steps(sources, manifest, samples_per_epoch, layout, remote)
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork-safety of HF fast tokenizers in workers
    skips = SkipCounter(shared=True)
    start = EpochStart()
    dataset = ShardStream(
        sources,
        mode=mode,
        tokenizer=tokenizer,
        image_transform=image_transform,
        layout=layout,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=workers,
        steps_per_epoch=steps,
        shuffle_buffer=shuffle_buffer,
        max_text_len=max_text_len,
        caption_key=caption_key,
        max_pixels=max_pixels,
        skips=skips,
        start=start,
        remote=remote,
    )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    dataloader = _build_dataloader(dataset, num_workers, persistent_workers, prefetch_factor, seed, rank)
    return TrainLoader(
        dataset,
        dataloader,
        skips,
        start,
        batch_size=batch_size,
        grad_accum_steps=grad_accum_steps,
        pin_memory=pin_memory,
    )


def _check_loader_args(mode: str, *, rank: int, world_size: int, batch_size: int, num_workers: int) -> None:
    """Rejects a mode, rank, batch size or worker count that no loader can be built with."""
    if mode not in ("epoch", "resampled"):
        raise ValueError(f"mode={mode!r}: use 'epoch' or 'resampled'")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")


def _epoch_mode_steps(
    sources: list[Source], manifest: str | dict | None, seed: int, layout: StepLayout, remote: RemotePolicy | None
) -> int:
    """Optimizer steps per epoch in epoch mode (the same in every epoch): counts the samples (``manifest``), plans
    epoch 0 and logs the plan, with a warning when there are fewer shards than streams."""
    resolve_counts(sources, manifest, remote=remote)
    urls = [u for s in sources for u in s.urls]
    counts = [c for s in sources for c in s.counts]
    plan = plan_epoch(urls, counts, seed=seed, epoch=0, layout=layout)
    logger.info(
        "epoch mode: %d samples in %d shards, %d steps of %d per epoch from %d streams, %d samples dropped per epoch",
        sum(counts),
        len(urls),
        plan.steps,
        layout.global_batch,
        layout.streams,
        plan.dropped,
    )
    if len(urls) < layout.streams:
        logger.warning(
            "%d shards for %d streams: shards are split by sample range, which reads some shards twice; more "
            "shards than streams is faster",
            len(urls),
            layout.streams,
        )
    return plan.steps


def _resampled_mode_steps(
    sources: list[Source],
    manifest: str | dict | None,
    samples_per_epoch: int | None,
    layout: StepLayout,
    remote: RemotePolicy | None,
) -> int:
    """Optimizer steps in a virtual epoch of resampled mode: ``samples_per_epoch`` (default: the counted total)
    over the global batch; at least one global batch is required."""
    if samples_per_epoch is None:
        resolve_counts(sources, manifest, remote=remote)
        samples_per_epoch = sum(c for s in sources for c in s.counts)
    steps = samples_per_epoch // layout.global_batch
    if steps < 1:
        raise ValueError(
            f"samples_per_epoch={samples_per_epoch} is less than one global batch ({layout.global_batch}); raise "
            "samples_per_epoch"
        )
    return steps


def _build_dataloader(
    dataset: ShardStream, num_workers: int, persistent_workers: bool, prefetch_factor: int, seed: int, rank: int
) -> DataLoader:
    """The ``DataLoader`` over ``dataset`` (one part per worker and step: ``batch_size=None``). Pinning happens
    after the parts of a step are merged (``TrainLoader``), not here."""
    extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    # A private generator for the workers' base seed: a DataLoader iterator otherwise draws it from the global torch
    # RNG, so creating one at a resume would shift the stream that dropout draws from, and the resumed steps would
    # differ from the uninterrupted run's (the pipeline's own seeds are integers: see pipeline.py).
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, generator=generator, **extra)
