"""The training stream: shard records → per-stream seeded shuffle → whitelisted decode → transform → tokenize → parts.

The epoch's sample order is the one of :mod:`rankclip_ds.data.plan`: ``S`` streams, each a deterministic sequence of
usable samples, fill the positions of every global step; a rank owns a fixed range of positions. Everything up to
the tensors runs in the DataLoader workers: each worker serves some of its rank's stream segments and hands over,
for every step, one *part* (its samples of that step with their step positions); the loader puts a step's parts
back in position order (:mod:`rankclip_ds.data.loader`). Every worker with segments yields exactly one part per
step, so every rank yields the same number of batches and no collective ever waits on a rank that ran dry. If bad
samples leave a stream short, it tops up ("padded") from a second, separately shuffled pass over its own records,
then over the epoch's shards.

A stream's usable samples are those whose caption, image, decode and transform all succeed; every
reader of a stream (two workers of different ranks when a stream straddles ranks) checks all of the stream's
samples the same way, so they agree on its sequence.

The epoch and the resume position reach the workers through :class:`EpochStart`, shared memory that the main process
writes before each ``iter()``; with persistent workers each new iterator re-reads it.

Resume (epoch mode). A position is (epoch, optimizer steps done), the same on every world size. Each stream replays
its record sequence without decoding images and discards the ``steps × share`` samples already used. The replay
counts the samples that pass the cheap checks (caption, image header, pixel limit): exact unless a skipped-over image
had corrupt pixel data (then that stream is shifted by that many samples). Resampled mode does not replay: a resumed
epoch continues each stream from a seed made of (seed, epoch, stream, steps done).
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing as mp
import random
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from rankclip_ds.data.decode import choose_caption, extract_captions, load_rgb, open_image
from rankclip_ds.data.plan import (
    TAG_CROP,
    TAG_PADDING,
    TAG_RESAMPLE,
    TAG_SAMPLE_SHUFFLE,
    EpochPlan,
    Piece,
    Segment,
    StepLayout,
    derive_seed,
    make_rng,
    plan_epoch,
)
from rankclip_ds.data.records import iter_records
from rankclip_ds.data.redact import redact
from rankclip_ds.data.remote import RemotePolicy
from rankclip_ds.data.skips import SkipCounter
from rankclip_ds.data.sources import Source

logger = logging.getLogger(__name__)

Sample = tuple[object, str, str, str]  # (pixels, caption, key, shard url)


class EpochStart:
    """Where the workers of this rank start their next epoch, in shared memory (``multiprocessing.Array``): the
    DataLoader's workers are forked once (and persist across epochs), so each new iterator reads the position the
    main process wrote just before it: the epoch and the optimizer steps of it already done."""

    def __init__(self) -> None:
        self._array = mp.Array("q", 2, lock=False)

    def write(self, epoch: int, steps_done: int) -> None:
        self._array[0], self._array[1] = int(epoch), int(steps_done)

    @property
    def epoch(self) -> int:
        return int(self._array[0])

    @property
    def steps_done(self) -> int:
        return int(self._array[1])


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
    """Yields one part per step for one worker of one rank; see the module doc. Built by ``build_train_loader``."""

    def __init__(
        self,
        sources: list[Source],
        *,
        mode: str,
        tokenizer,
        image_transform: Callable,
        layout: StepLayout,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        steps_per_epoch: int,
        shuffle_buffer: int,
        max_text_len: int,
        caption_key: str,
        max_pixels: int,
        skips: SkipCounter,
        start: EpochStart,
        remote: RemotePolicy | None = None,
    ):
        self.sources = sources
        self.urls = [u for s in sources for u in s.urls]
        self.counts = [c for s in sources for c in (s.counts or [])]
        self.mode, self.tokenizer, self.transform = mode, tokenizer, image_transform
        self.layout, self.seed, self.rank, self.world_size = layout, seed, rank, world_size
        self.num_workers = max(1, num_workers)
        self.steps_per_epoch = steps_per_epoch
        self.shuffle_size, self.max_text_len, self.caption_key = shuffle_buffer, max_text_len, caption_key
        self.max_pixels, self.skips, self.start, self.remote = max_pixels, skips, start, remote
        self.segments = layout.worker_segments(rank, world_size, self.num_workers)

    @property
    def active_workers(self) -> int:
        """Workers that hand over a part every step (the others have no segment and stop at once)."""
        return sum(1 for segments in self.segments if segments)

    # ---------------------------------------------------------------- record streams
    def _read_pieces(self, pieces: list[Piece]) -> Iterator[dict]:
        for p in pieces:
            yield from iter_records(p.url, self.skips, p.start, p.stop, remote=self.remote)

    def _epoch_records(self, plan: EpochPlan, stream: int) -> Iterator[tuple[dict, bool]]:
        """``(record, padded)`` of ``stream`` in ``plan``'s epoch: its pieces, then top-up passes if it runs short."""
        mine = plan.pieces[stream]
        rng = make_rng(self.seed, plan.epoch, stream, TAG_SAMPLE_SHUFFLE)
        for record in shuffle_buffer(self._read_pieces(mine), self.shuffle_size, rng):
            yield record, False
        # top-up passes, only reached when bad samples left this stream short of its samples
        everything = [Piece(u, 0, c) for u, c in zip(self.urls, self.counts, strict=True) if c > 0]
        for n in itertools.count(1):
            pieces = list(mine if n == 1 else everything)
            prng = make_rng(self.seed, plan.epoch, stream, TAG_PADDING, n)
            prng.shuffle(pieces)
            got = 0
            for record in shuffle_buffer(self._read_pieces(pieces), self.shuffle_size, prng):
                got += 1
                yield record, True
            if got == 0 and n > 1:
                raise RuntimeError(redact(f"no shard of {[s.spec for s in self.sources]} could be read (see warnings)"))

    def _resampled_records(self, epoch: int, stream: int, done: int) -> Iterator[tuple[dict, bool]]:
        rng = make_rng(self.seed, epoch, stream, done, TAG_RESAMPLE)
        weights = [s.weight for s in self.sources]
        limit = max(100, 10 * len(self.urls))

        def draw() -> Iterator[dict]:
            empty_in_a_row = 0
            while True:
                src = rng.choices(self.sources, weights=weights)[0]
                url = src.urls[rng.randrange(len(src.urls))]
                got = 0
                for record in iter_records(url, self.skips, remote=self.remote):
                    got += 1
                    yield record
                empty_in_a_row = 0 if got else empty_in_a_row + 1
                if empty_in_a_row >= limit:
                    specs = [s.spec for s in self.sources]
                    raise RuntimeError(redact(f"{limit} shards in a row gave no sample; check {specs}"))

        for record in shuffle_buffer(draw(), self.shuffle_size, rng):
            yield record, False

    # ---------------------------------------------------------------- samples
    def _stream_samples(self, plan: EpochPlan | None, epoch: int, stream: int, done: int) -> Iterator[Sample]:
        """The usable samples of ``stream`` from step ``done`` of ``epoch`` on (see the module doc)."""
        if plan is None:
            records, cursor = self._resampled_records(epoch, stream, done), 0
        else:
            records = self._epoch_records(plan, stream)
            cursor = self._fast_forward(records, done * self.layout.share(stream))
        # fast path: ImageTransform gives uint8 arrays, normalised per part; any other callable gives float tensors
        to_pixels = self.transform.to_array if hasattr(self.transform, "collate") else self.transform
        min_size = getattr(self.transform, "decode_min_size", None)
        rng = getattr(self.transform, "rng", None)
        # crops are seeded per record position of the stream, so any reader, resumed or not, crops alike
        crop_base = derive_seed(self.seed, epoch, stream, TAG_CROP) if isinstance(rng, random.Random) else None
        since_valid = 0
        for record, padded in records:
            cursor += 1
            if crop_base is not None:
                rng.seed(crop_base + cursor)
            since_valid += 1
            if since_valid > max(100_000, 4 * sum(self.counts)):
                raise RuntimeError(redact(f"no usable sample in the last {since_valid} records of {self.urls[:3]}..."))
            sample = self._sample(record, padded, to_pixels, min_size, epoch)
            if sample is not None:
                since_valid = 0
                yield sample

    def _sample(
        self, record: dict, padded: bool, to_pixels: Callable, min_size: int | None, epoch: int
    ) -> Sample | None:
        """``(pixels, caption, key, url)`` of a record, or None (counted in the skips) when it has no usable caption
        or image, or the image fails to decode or transform. A padded record is counted as ``padded`` but still
        used."""
        captions = extract_captions(record, self.caption_key, self.skips)
        if captions is None:
            return None
        img = open_image(record, self.skips, self.max_pixels)
        if img is None:
            return None
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
        return (
            pixels,
            choose_caption(captions, record["__key__"], self.seed, epoch),
            record["__key__"],
            record["__url__"],
        )

    def _tokenize(self, samples: list[Sample]) -> dict:
        """One batched tokenizer call for a part. Should it raise, each caption is tokenized alone and one that the
        tokenizer refuses is counted as ``transform_error`` and trained as an empty caption: whether a sample is
        usable is decided before the stream's samples are dealt to positions, which a tokenizer failure must not
        change (two ranks reading one stream would disagree)."""
        kwargs = {"max_length": self.max_text_len, "padding": "max_length", "truncation": True, "return_tensors": "pt"}
        try:
            tok = self.tokenizer([s[1] for s in samples], **kwargs)
            return {"input_ids": tok["input_ids"].long(), "attention_mask": tok["attention_mask"].long()}
        except Exception:
            rows = []
            for _, caption, key, url in samples:
                try:
                    rows.append(self.tokenizer([caption], **kwargs))
                except Exception as exc:
                    self.skips.add("transform_error", url, key, detail=f"tokenizer: {exc!r}; trained as ''")
                    rows.append(self.tokenizer([""], **kwargs))
            return {name: torch.cat([r[name] for r in rows]).long() for name in ("input_ids", "attention_mask")}

    def _fast_forward(self, records: Iterator[tuple[dict, bool]], skip: int) -> int:
        """Consumes the part of the record stream that was already used before a resume (``skip`` usable samples,
        checked without decoding images); returns the record cursor."""
        if skip <= 0:
            return 0
        quiet = SkipCounter(shared=False, warn_first=0, warn_every_s=math.inf)
        cursor = valid = 0
        for record, _ in records:
            cursor += 1
            if (
                extract_captions(record, self.caption_key, quiet) is not None
                and open_image(record, quiet, self.max_pixels) is not None
            ):
                valid += 1
                if valid >= skip:
                    break
        return cursor

    # ---------------------------------------------------------------- parts
    def _part(self, step: int, epoch: int, samples: list[tuple[int, Sample]]) -> dict:
        """One step's samples of this worker as tensors, with their step positions."""
        part: dict = {"step": step, "epoch": epoch, "pos": torch.tensor([p for p, _ in samples], dtype=torch.long)}
        pixels = [s[0] for _, s in samples]
        collate = getattr(self.transform, "collate", None)
        part["image"] = collate(pixels) if collate is not None else torch.stack(pixels)
        part["key"] = [s[2] for _, s in samples]
        if self.tokenizer is None:
            part["text"] = [s[1] for _, s in samples]
        else:
            part.update(self._tokenize([s for _, s in samples]))
        return part

    def _take(self, stream: Iterator[Sample], segment: Segment) -> list[tuple[int, Sample]]:
        """The next step's share of ``stream``; the samples of ``segment`` with their step positions."""
        share = self.layout.share(segment.stream)
        got = list(itertools.islice(stream, share))
        if len(got) < share:
            raise RuntimeError(f"stream {segment.stream} ended after {len(got)} of {share} samples of a step")
        base = self.layout.offset(segment.stream)
        return [(base + i, got[i]) for i in range(segment.lo, segment.hi)]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardStream was planned for {self.num_workers} workers but runs in {info.num_workers}")
        segments = self.segments[info.id if info is not None else 0]
        epoch, done = self.start.epoch, self.start.steps_done
        if not segments or done >= self.steps_per_epoch:
            return
        plan = None
        if self.mode == "epoch":
            plan = plan_epoch(self.urls, self.counts, seed=self.seed, epoch=epoch, layout=self.layout)
        streams = {s.stream: self._stream_samples(plan, epoch, s.stream, done) for s in segments}
        for step in range(done, self.steps_per_epoch):
            samples = [pair for s in segments for pair in self._take(streams[s.stream], s)]
            part = self._part(step, epoch, samples)
            self.skips.flush()
            yield part
        self.skips.flush()
