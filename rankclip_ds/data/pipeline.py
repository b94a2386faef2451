"""The training stream: shard records → seeded shuffle → whitelisted decode → transform → tokenize → batches.

Everything up to the batch runs in the DataLoader workers. Per epoch, each (rank, worker) reads the record ranges
that :func:`~rankclip_ds.data.plan.plan_epoch` gives it (epoch mode) or draws shards with replacement by source
weight (resampled mode); either way it yields exactly its quota of batches, so every rank yields
``batches_per_epoch`` batches and no collective ever waits on a rank that ran dry. If bad samples leave a worker
short, it tops up ("padded") from a second, separately shuffled pass over its own records, then over the epoch's
shards.

The epoch and the resume position reach the workers through :class:`EpochStart`, shared memory that the main process
writes before each ``iter()``; with persistent workers each new iterator re-reads it.

Resume (epoch mode). A position is (epoch, samples consumed on this rank). The worker replays its shuffled record
stream without decoding images and discards what was already consumed, so the resumed stream continues with exactly
the samples an uninterrupted run would have produced. The replay counts the samples that
pass the cheap checks (caption, image header, pixel limit): exact unless a skipped-over image had corrupt pixel data
(then the stream is shifted by that many samples). Resampled mode does not replay: a resumed epoch yields its
remaining batches from a stream seeded with (seed, epoch, rank, worker, batches done).
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing as mp
import random
from collections.abc import Callable, Iterator
from enum import IntEnum

import torch
from torch.utils.data import IterableDataset, get_worker_info

from rankclip_ds.data.decode import choose_caption, extract_captions, load_rgb, open_image
from rankclip_ds.data.plan import (
    TAG_PADDING,
    TAG_RESAMPLE,
    TAG_SAMPLE_SHUFFLE,
    Piece,
    derive_seed,
    make_rng,
    plan_epoch,
    worker_quotas,
)
from rankclip_ds.data.records import iter_records
from rankclip_ds.data.skips import SkipCounter
from rankclip_ds.data.sources import Source

logger = logging.getLogger(__name__)


class ResumeKind(IntEnum):
    """How a worker starts its stream in an epoch."""

    FROM_START = 0
    AFTER_SAMPLES = 1
    """Replay the stream and discard the first ``skip`` usable samples (what this worker produced before)."""


class EpochStart:
    """Where every worker of this rank starts its next epoch, in shared memory (``multiprocessing.Array``): the
    DataLoader's workers are forked once (and persist across epochs), so each new iterator reads the position the
    main process wrote just before it. Per worker: usable samples to skip and batches already done; and the shift
    of the DataLoader's round robin after a resume."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        # [epoch, kind, shift, skip_0, done_0, skip_1, done_1, ...]
        self._array = mp.Array("q", 3 + 2 * num_workers, lock=False)

    def write(self, epoch: int, kind: ResumeKind, per_worker: list[tuple[int, int]]) -> None:
        """``per_worker[w] = (samples to skip, batches done)``; the round robin continues with the worker after
        the last batch done (batch n came from logical worker n % W)."""
        shift = sum(done for _, done in per_worker) % self.num_workers
        self._array[0], self._array[1], self._array[2] = epoch, int(kind), shift
        for w, (skip, done) in enumerate(per_worker):
            self._array[3 + 2 * w], self._array[4 + 2 * w] = skip, done

    @property
    def epoch(self) -> int:
        return int(self._array[0])

    @property
    def kind(self) -> ResumeKind:
        return ResumeKind(int(self._array[1]))

    @property
    def shift(self) -> int:
        return int(self._array[2])

    def of_worker(self, worker: int) -> tuple[int, int]:
        """``(samples to skip, batches done)`` of logical worker ``worker``."""
        return int(self._array[3 + 2 * worker]), int(self._array[4 + 2 * worker])


TAG_CROP = 5


def shuffle_buffer(records: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle: keep ``size`` items, emit a random one for each new item, then drain randomly."""
    if size <= 1:
        yield from records
        return
    buffer = []
    for item in records:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Yields batches for one rank; see the module doc. Built by :func:`build_train_loader`."""

    def __init__(
        self,
        sources: list[Source],
        *,
        mode: str,
        tokenizer,
        image_transform: Callable,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        batches_per_epoch: int,
        shuffle_buffer: int,
        max_text_len: int,
        caption_key: str,
        max_pixels: int,
        skips: SkipCounter,
        start: EpochStart,
    ):
        self.sources = sources
        self.urls = [u for s in sources for u in s.urls]
        self.counts = [c for s in sources for c in (s.counts or [])]
        self.mode, self.tokenizer, self.transform = mode, tokenizer, image_transform
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers = max(1, num_workers)
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_size, self.max_text_len, self.caption_key = shuffle_buffer, max_text_len, caption_key
        self.max_pixels, self.skips, self.start = max_pixels, skips, start

    # ---------------------------------------------------------------- record streams
    def _read_pieces(self, pieces: list[Piece]) -> Iterator[dict]:
        for p in pieces:
            yield from iter_records(p.url, self.skips, p.start, p.stop)

    def _epoch_stream(self, epoch: int, worker: int) -> Iterator[tuple[dict, bool]]:
        plan = plan_epoch(
            self.urls,
            self.counts,
            seed=self.seed,
            epoch=epoch,
            world_size=self.world_size,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
        )
        mine = plan.pieces[self.rank][worker]
        rng = make_rng(self.seed, epoch, self.rank, worker, TAG_SAMPLE_SHUFFLE)
        for record in shuffle_buffer(self._read_pieces(mine), self.shuffle_size, rng):
            yield record, False
        # top-up passes, only reached when bad samples left this worker short of its quota
        everything = [Piece(u, 0, c) for u, c in zip(self.urls, self.counts, strict=True) if c > 0]
        for n in itertools.count(1):
            pieces = list(mine if n == 1 else everything)
            prng = make_rng(self.seed, epoch, self.rank, worker, TAG_PADDING, n)
            prng.shuffle(pieces)
            got = 0
            for record in shuffle_buffer(self._read_pieces(pieces), self.shuffle_size, prng):
                got += 1
                yield record, True
            if got == 0 and n > 1:
                raise RuntimeError(f"no shard of {[s.spec for s in self.sources]} could be read (see warnings)")

    def _resampled_stream(self, epoch: int, worker: int, done: int) -> Iterator[tuple[dict, bool]]:
        rng = make_rng(self.seed, epoch, self.rank, worker, done, TAG_RESAMPLE)
        weights = [s.weight for s in self.sources]
        empty_in_a_row = 0
        limit = max(100, 10 * len(self.urls))

        def draw() -> Iterator[dict]:
            nonlocal empty_in_a_row
            while True:
                src = rng.choices(self.sources, weights=weights)[0]
                url = src.urls[rng.randrange(len(src.urls))]
                got = 0
                for record in iter_records(url, self.skips):
                    got += 1
                    yield record
                empty_in_a_row = 0 if got else empty_in_a_row + 1
                if empty_in_a_row >= limit:
                    specs = [s.spec for s in self.sources]
                    raise RuntimeError(f"{limit} shards in a row gave no sample; check {specs}")

        for record in shuffle_buffer(draw(), self.shuffle_size, rng):
            yield record, False

    # ---------------------------------------------------------------- samples and batches
    def _usable(self, record: dict):
        captions = extract_captions(record, self.caption_key, self.skips)
        if captions is None:
            return None
        img = open_image(record, self.skips, self.max_pixels)
        if img is None:
            return None
        return captions, img

    def _collate(self, images: list, texts: list[str], keys: list[str]) -> dict:
        batch: dict = {"key": keys}
        collate = getattr(self.transform, "collate", None)
        batch["image"] = collate(images) if collate is not None else torch.stack(images)
        if self.tokenizer is None:
            batch["text"] = texts
        else:
            tok = self.tokenizer(
                texts, max_length=self.max_text_len, padding="max_length", truncation=True, return_tensors="pt"
            )
            batch["input_ids"] = tok["input_ids"].long()
            batch["attention_mask"] = tok["attention_mask"].long()
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardStream was planned for {self.num_workers} workers but runs in {info.num_workers}")
        epoch, kind = self.start.epoch, self.start.kind
        # The DataLoader always starts its round robin at process 0; after a resume at batch n the canonical order
        # continues with logical worker n % W, so process i plays logical worker (i + shift) % W.
        worker = ((info.id if info is not None else 0) + self.start.shift) % self.num_workers
        skip, done = self.start.of_worker(worker)
        quota = worker_quotas(self.batches_per_epoch, self.num_workers)[worker]
        stream, cursor = self._worker_stream(epoch, worker, kind, skip, done)
        # fast path: ImageTransform gives uint8 arrays, normalised per batch; any other callable gives float tensors
        to_pixels = self.transform.to_array if hasattr(self.transform, "collate") else self.transform
        min_size = getattr(self.transform, "decode_min_size", None)
        rng, crop_base = self._crop_seeding(epoch, worker)
        images, texts, keys = [], [], []
        produced = done
        since_valid = 0
        if produced >= quota:
            return
        for record, padded in stream:
            cursor += 1
            if crop_base is not None:
                rng.seed(crop_base + cursor)
            since_valid += 1
            if since_valid > max(100_000, 4 * sum(self.counts)):
                raise RuntimeError(f"no usable sample in the last {since_valid} records of {self.urls[:3]}...")
            sample = self._sample(record, padded, to_pixels, min_size, epoch)
            if sample is None:
                continue
            since_valid = 0
            images.append(sample[0])
            texts.append(sample[1])
            keys.append(record["__key__"])
            if len(images) == self.batch_size:
                batch = self._collate_or_skip(images, texts, keys, record)
                images, texts, keys = [], [], []
                if batch is None:
                    continue
                produced += 1
                batch["epoch"] = epoch
                self.skips.flush()
                yield batch
                if produced >= quota:
                    break
        self.skips.flush()

    def _worker_stream(
        self, epoch: int, worker: int, kind: ResumeKind, skip: int, done: int
    ) -> tuple[Iterator[tuple[dict, bool]], int]:
        """This worker's ``(record, padded)`` stream for ``epoch``, positioned after a resume, and its record
        cursor: resampled streams restart from their seed at ``done`` batches, epoch streams skip ``skip`` usable
        samples."""
        if self.mode == "resampled":
            return self._resampled_stream(epoch, worker, done), 0
        stream = self._epoch_stream(epoch, worker)
        return stream, self._fast_forward(stream, kind, skip)

    def _crop_seeding(self, epoch: int, worker: int) -> tuple[random.Random | None, int | None]:
        """The transform's ``random.Random`` and the base seed it is re-seeded from at every record (plus the record
        cursor), or ``(rng, None)`` when the transform has no such generator."""
        rng = getattr(self.transform, "rng", None)
        # crops are seeded per record position, so a resumed stream crops exactly as an uninterrupted one
        seeded = isinstance(rng, random.Random)
        crop_base = derive_seed(self.seed, epoch, self.rank, worker, TAG_CROP) if seeded else None
        return rng, crop_base

    def _sample(
        self, record: dict, padded: bool, to_pixels: Callable, min_size: int | None, epoch: int
    ) -> tuple[object, str] | None:
        """``(pixels, caption)`` of a record, or None (counted in the skips) when it has no usable caption or image,
        or the image fails to decode or transform. A padded record is counted as ``padded`` but still used."""
        usable = self._usable(record)
        if usable is None:
            return None
        captions, img = usable
        rgb = load_rgb(img, record, self.skips, min_size)
        if rgb is None:
            return None
        try:
            pixels = to_pixels(rgb)
        except Exception as exc:
            self.skips.add("transform_error", record["__url__"], record["__key__"], detail=repr(exc))
            return None
        if padded:
            self.skips.add("padded", record["__url__"], record["__key__"])
        return pixels, choose_caption(captions, record["__key__"], self.seed, epoch)

    def _collate_or_skip(self, images: list, texts: list[str], keys: list[str], record: dict) -> dict | None:
        """The batch of the collected samples, or None when collation fails: a tokenizer failure drops the batch's
        samples (counted as ``transform_error`` at the last ``record``), never the run."""
        try:
            return self._collate(images, texts, keys)
        except Exception as exc:
            self.skips.add("transform_error", record["__url__"], record["__key__"], detail=repr(exc), n=len(images))
            return None

    def _fast_forward(self, stream: Iterator[tuple[dict, bool]], kind: ResumeKind, skip: int) -> int:
        """Consumes the part of the stream that was already used before a resume (``skip`` usable samples, checked
        without decoding images); returns the record cursor."""
        if kind == ResumeKind.FROM_START or skip <= 0:
            return 0
        quiet = SkipCounter(shared=False, warn_first=0, warn_every_s=math.inf)
        cursor = valid = 0
        for record, _ in stream:
            cursor += 1
            if (
                extract_captions(record, self.caption_key, quiet) is not None
                and open_image(record, quiet, self.max_pixels) is not None
            ):
                valid += 1
                if valid >= skip:
                    break
        return cursor
