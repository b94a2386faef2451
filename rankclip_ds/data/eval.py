"""Labelled evaluation shards (``.jpg|.png|.webp`` + ``.cls``) for zero-shot classification.

A zero-shot set is a folder of shards with a ``classnames.txt`` (one class name per line, line i = label i) and
optionally a ``templates.txt`` (one prompt per line with ``{}`` where the class name goes, e.g. ``a photo of a {}.``).
The loader reads every sample once, in order, no shuffling; shards are split by rank (``url_index % world_size``)
and then by worker, and the last batch may be partial. Ranks may therefore see different numbers of batches:
aggregate with a collective after the loop (sums of correct/total), never per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rankclip_ds.data.decode import DEFAULT_MAX_PIXELS, load_rgb, open_image
from rankclip_ds.data.records import iter_records
from rankclip_ds.data.skips import SkipCounter
from rankclip_ds.data.sources import check_sources_exist, parse_spec

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def load_classnames(path: str | Path) -> list[str]:
    """Class names, one per non-empty line; label i is line i."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class-name file {str(path)!r} has no class names: write one name per line")
    return names


def load_templates(path: str | Path | None) -> list[str]:
    """Prompt templates, one per line, each containing ``{}``; ``DEFAULT_TEMPLATES`` when ``path`` is None/missing."""
    if path is None or not Path(path).exists():
        return list(DEFAULT_TEMPLATES)
    templates = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"templates file {str(path)!r}: every line needs a '{{}}' for the class name; bad: {bad}")
    return templates


class LabelledShards(IterableDataset):
    def __init__(
        self,
        urls: list[str],
        *,
        image_transform: Callable,
        batch_size: int,
        num_classes: int | None,
        rank: int,
        world_size: int,
        label_key: str,
        max_pixels: int,
        skips: SkipCounter,
    ):
        self.urls = urls[rank::world_size]
        self.transform, self.batch_size, self.num_classes = image_transform, batch_size, num_classes
        self.label_key, self.max_pixels, self.skips = label_key, max_pixels, skips

    def _label(self, record: dict) -> int | None:
        raw = record.get(self.label_key)
        try:
            label = int(raw.decode("ascii").strip())
        except (AttributeError, UnicodeDecodeError, ValueError):
            self.skips.add("bad_label", record["__url__"], record["__key__"], detail=f".{self.label_key}={raw!r}")
            return None
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            self.skips.add("bad_label", record["__url__"], record["__key__"], detail=f"label {label} out of range")
            return None
        return label

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        urls = self.urls[info.id :: info.num_workers] if info is not None else self.urls
        collate = getattr(self.transform, "collate", None)
        to_pixels = self.transform.to_array if collate is not None else self.transform
        min_size = getattr(self.transform, "decode_min_size", None)
        images, labels, keys = [], [], []
        for url in urls:
            for record in iter_records(url, self.skips):
                label = self._label(record)
                img = open_image(record, self.skips, self.max_pixels) if label is not None else None
                rgb = load_rgb(img, record, self.skips, min_size) if img is not None else None
                if rgb is None:
                    continue
                images.append(to_pixels(rgb))
                labels.append(label)
                keys.append(record["__key__"])
                if len(images) == self.batch_size:
                    yield self._collate(images, labels, keys, collate)
                    images, labels, keys = [], [], []
        if images:
            yield self._collate(images, labels, keys, collate)
        self.skips.flush()

    def _collate(self, images, labels, keys, collate) -> dict:
        self.skips.flush()
        image = collate(images) if collate is not None else torch.stack(images)
        return {"image": image, "label": torch.tensor(labels, dtype=torch.long), "key": keys}


def build_eval_loader(
    spec: str | list[str],
    *,
    image_transform: Callable,
    batch_size: int,
    num_workers: int = 0,
    classnames: str | Path | list[str] | None = None,
    rank: int = 0,
    world_size: int = 1,
    label_key: str = "cls",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DataLoader:
    """A DataLoader of ``{"image": float32 (B,3,H,W), "label": long (B,), "key": list[str]}`` over labelled shards.

    ``classnames`` (a file or a list) bounds the labels; its names are attached as ``loader.classnames``, and the
    skip counter as ``loader.skips`` (``loader.skips.counts()``).
    """
    sources = parse_spec(spec)
    check_sources_exist(sources)
    urls = [u for s in sources for u in s.urls]
    names = load_classnames(classnames) if isinstance(classnames, (str, Path)) else classnames
    skips = SkipCounter(shared=True)
    dataset = LabelledShards(
        urls,
        image_transform=image_transform,
        batch_size=batch_size,
        num_classes=len(names) if names else None,
        rank=rank,
        world_size=world_size,
        label_key=label_key,
        max_pixels=max_pixels,
        skips=skips,
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    loader.classnames = names
    loader.skips = skips
    return loader
