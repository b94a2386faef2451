"""Evaluation inputs: labelled shards, ImageFolder directories and multi-caption retrieval shards.

Every input is read in a fixed order, and each sample carries an integer sort key (its ``index``), so that the
slices read by different ranks and DataLoader workers can be put back in the same order after gathering.

- **Shards** (a brace expression such as ``/data/val-{000000..000063}.tar``, several joined with ``::``, or a
  directory holding ``*.tar``): records are read through :func:`rankclip_ds.data.records.iter_records`, which reads
  only whitelisted members (jpg/jpeg/png/webp, txt, json, cls) and never unpickles anything. The sort key of record
  ``r`` of shard ``s`` (in spec order) is ``s · 2³² + r``. Ranks take contiguous, balanced runs of records, using
  the per-shard counts of a ``_manifest.json`` or of the tar headers (cheap for local files); when a count is unknown
  (remote shards without a manifest) ranks take contiguous runs of whole shards instead.
- **ImageFolder** (a directory with one sub-folder per class): image files (jpg/jpeg/png/webp, any depth, other files
  ignored) in sorted path order; the sort key is the position in that order. Labels follow the sorted folder names,
  or, when every folder name is a non-negative integer, are those integers (so ``0/ … 999/`` line up with a
  classnames file).

Both decode images with the same whitelisted decoder as training (:mod:`rankclip_ds.data.decode`: PIL limited to
JPEG/PNG/WebP, pixel limit checked before decoding), so the same image bytes give the same pixels either way. Bad
samples are counted by reason (``skips``) and dropped, never fatal.

Class names: a list, a file (one per line, line i = label i), or by default ``classnames.txt`` beside the data (in
the ImageFolder root, or in the folder of the first shard). An ImageFolder without a classnames file uses its folder
names, with ``_`` read as a space.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rankclip_ds.data.decode import DEFAULT_MAX_PIXELS, extract_captions, load_rgb, open_image, parse_caption_key
from rankclip_ds.data.records import IMAGE_EXTS, iter_records
from rankclip_ds.data.skips import SkipCounter
from rankclip_ds.data.sources import check_sources_exist, parse_spec

from .slices import SHARD_KEY_STRIDE, FolderPiece, ShardPiece, plan_shard_pieces, split_contiguous

__all__ = [
    "CLASSNAMES_FILE",
    "EvalData",
    "list_image_folder",
    "load_classnames_file",
    "open_eval_data",
    "resolve_classnames",
]

log = logging.getLogger(__name__)

CLASSNAMES_FILE = "classnames.txt"
AUTO_CAPTIONS = "auto"  # the .json member's "captions" list when present, else the .txt member


def load_classnames_file(path: str | Path) -> list[str]:
    """Class names, one per non-empty line; label i is line i."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"classnames file {str(path)!r} does not exist; write one class name per line")
    names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"classnames file {str(path)!r} holds no class name; write one per line, line i = label i")
    return names


def _image_ext(name: str) -> str | None:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext if ext in IMAGE_EXTS else None


def list_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """The images of an ImageFolder directory: ``(paths, labels, folder_names)``, paths in sorted order.

    ``folder_names[label]`` is the folder of that label (``None``-free: integer folders that skip a label get
    ``""`` there). Raises when the directory has no class folder or no image at all.
    """
    root = Path(root)
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(
            f"{str(root)!r} has no sub-folders: an ImageFolder directory holds one sub-folder of images per class"
        )
    if all(name.isdecimal() for name in folders):
        labels_of = {name: int(name) for name in folders}
    else:
        labels_of = {name: i for i, name in enumerate(folders)}
    names = [""] * (max(labels_of.values()) + 1)
    for name, label in labels_of.items():
        if names[label]:
            raise ValueError(f"{str(root)!r}: folders {names[label]!r} and {name!r} both mean label {label}")
        names[label] = name
    paths, labels = [], []
    for name in folders:
        files = sorted(
            Path(dirpath, f) for dirpath, _, filenames in os.walk(root / name) for f in filenames if _image_ext(f)
        )
        paths.extend(files)
        labels.extend([labels_of[name]] * len(files))
    order = sorted(range(len(paths)), key=lambda i: paths[i].relative_to(root).as_posix())
    paths = [paths[i] for i in order]
    labels = [labels[i] for i in order]
    if not paths:
        raise ValueError(f"{str(root)!r} has class folders but no image ({', '.join(IMAGE_EXTS)}) in them")
    return paths, labels, names


def _is_folder_input(data: str) -> bool:
    """An existing directory that is not just a folder of .tar shards."""
    p = Path(data)
    return p.is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in p.iterdir())


def _shard_urls(data: str | list[str]) -> list[str]:
    if isinstance(data, str) and Path(data).is_dir():
        urls = sorted(str(p) for p in Path(data).glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"{data!r} is a directory with neither class sub-folders nor *.tar shards")
        return urls
    sources = parse_spec(data)
    check_sources_exist(sources)
    return [u for s in sources for u in s.urls]


def resolve_classnames(data: str | list[str], classnames: str | Path | Sequence[str] | None) -> list[str] | None:
    """Class names for ``data`` (see the module doc); None for shards without a classnames file."""
    if classnames is not None and not isinstance(classnames, (str, Path)):
        names = [str(c) for c in classnames]
        if not names:
            raise ValueError("classnames is an empty list; give one name per class, in label order")
        return names
    if classnames is not None:
        return load_classnames_file(classnames)
    if isinstance(data, str) and _is_folder_input(data):
        default = Path(data) / CLASSNAMES_FILE
        if default.is_file():
            return load_classnames_file(default)
        _, _, folders = list_image_folder(data)
        if all(f.isdecimal() or not f for f in folders):
            raise ValueError(
                f"ImageFolder {data!r} has numbered class folders and no {CLASSNAMES_FILE}: numbers make no prompts. "
                f"Fix: write {default} (one class name per line, line i = folder i) or pass classnames=FILE"
            )
        return [f.replace("_", " ") for f in folders]
    urls = _shard_urls(data)
    first = urls[0][len("file://") :] if urls[0].startswith("file://") else urls[0]
    default = Path(first).parent / CLASSNAMES_FILE
    if "://" not in urls[0] and default.is_file():
        return load_classnames_file(default)
    return None


@dataclass
class EvalData:
    """An evaluation input opened for this rank: iterate ``loader`` for batches.

    Batches are dicts: ``index`` long (B,) sort keys, ``image`` float32 (B, 3, H, W) normalised, ``key`` list[str],
    plus ``label`` long (B,) when labels were asked for, ``captions`` list[list[str]] when captions were and
    ``json`` list[dict] (the parsed ``.json`` member) when metadata was.
    """

    loader: DataLoader
    kind: str
    """``shards`` or ``folder``."""
    classnames: list[str] | None
    skips: SkipCounter
    image_size: tuple[int, int]
    has_labels: bool
    """Batches carry ``label``."""
    caption_key: str | None
    """Batches carry ``captions`` (read with this key) when set."""
    num_local: int | None
    """Samples this rank reads before skips (None when a shard count is unknown)."""
    num_batches: int | None = None
    """Batches this rank's loader yields at most (None when unknown)."""
    has_metadata: bool = False
    """Batches carry ``json`` (the parsed ``.json`` member of each sample)."""


class _EvalStream(IterableDataset):
    """Reads this rank's pieces (split again between DataLoader workers), decodes, transforms and batches."""

    def __init__(
        self,
        pieces: list,
        *,
        files: list[tuple[Path, int]] | None,
        root: Path | None,
        transform: Callable,
        batch_size: int,
        want_labels: bool,
        caption_key: str | None,
        num_classes: int | None,
        label_key: str,
        max_pixels: int,
        skips: SkipCounter,
        metadata: bool = False,
    ):
        self.pieces, self.files, self.root, self.metadata = pieces, files, root, metadata
        self.transform, self.batch_size = transform, batch_size
        self.want_labels, self.caption_key, self.num_classes = want_labels, caption_key, num_classes
        self.label_key, self.max_pixels, self.skips = label_key, max_pixels, skips

    def _records(self, pieces: list) -> Iterator[tuple[int, dict]]:
        for piece in pieces:
            if isinstance(piece, ShardPiece):
                for record in iter_records(piece.url, self.skips, piece.start, piece.stop):
                    yield piece.shard_pos * SHARD_KEY_STRIDE + record["__index__"], record
                continue
            for i in range(piece.start, piece.stop):
                path, label = self.files[i]
                key = path.relative_to(self.root).as_posix().rsplit(".", 1)[0]
                record = {"__key__": key, "__url__": str(path), "__index__": i, "__label__": label}
                try:
                    record[_image_ext(path.name)] = path.read_bytes()
                except OSError as exc:
                    self.skips.add("read_error", str(path), key, detail=repr(exc))
                    continue
                yield i, record

    def _label(self, record: dict) -> int | None:
        if "__label__" in record:
            label = record["__label__"]
        else:
            raw = record.get(self.label_key)
            try:
                label = int(raw.decode("ascii").strip())
            except (AttributeError, UnicodeDecodeError, ValueError):
                self.skips.add("bad_label", record["__url__"], record["__key__"], detail=f".{self.label_key}={raw!r}")
                return None
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            detail = f"label {label} outside the {self.num_classes} class names"
            self.skips.add("bad_label", record["__url__"], record["__key__"], detail=detail)
            return None
        return label

    def _captions(self, record: dict) -> list[str] | None:
        key = self.caption_key
        if key == AUTO_CAPTIONS:
            raw = record.get("json")
            if raw:
                try:
                    value = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    value = None
                if isinstance(value, dict) and "captions" in value:
                    return extract_captions(record, "json:captions", self.skips)
            key = "txt"
        return extract_captions(record, key, self.skips)

    def _metadata(self, record: dict) -> dict | None:
        """The parsed ``.json`` member (a JSON object), or None after counting why there is none."""
        raw = record.get("json")
        try:
            value = json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            value = None
        if not isinstance(value, dict):
            detail = "no .json member" if not raw else ".json is not a JSON object"
            self.skips.add("bad_json", record["__url__"], record["__key__"], detail=detail)
            return None
        return value

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        pieces = split_contiguous(self.pieces, info.num_workers, info.id) if info is not None else self.pieces
        to_array = self.transform.to_array
        min_size = getattr(self.transform, "decode_min_size", None)
        rows: list[tuple] = []
        for index, record in self._records(pieces):
            label = self._label(record) if self.want_labels else -1
            if label is None:
                continue
            captions = self._captions(record) if self.caption_key else None
            if self.caption_key and captions is None:
                continue
            meta = self._metadata(record) if self.metadata else None
            if self.metadata and meta is None:
                continue
            img = open_image(record, self.skips, self.max_pixels)
            rgb = load_rgb(img, record, self.skips, min_size) if img is not None else None
            if rgb is None:
                continue
            try:
                pixels = to_array(rgb)
            except Exception as exc:  # a transform failure drops the sample, never the evaluation
                self.skips.add("transform_error", record["__url__"], record["__key__"], detail=repr(exc))
                continue
            rows.append((index, pixels, label, captions, record["__key__"], meta))
            if len(rows) == self.batch_size:
                yield self._collate(rows)
                rows = []
        if rows:
            yield self._collate(rows)
        self.skips.flush()

    def _collate(self, rows: list[tuple]) -> dict:
        self.skips.flush()
        index, pixels, labels, captions, keys, metas = zip(*rows, strict=True)
        batch = {
            "index": torch.tensor(index, dtype=torch.long),
            "image": self.transform.collate(pixels),  # (B, 3, H, W) float32
            "key": list(keys),
        }
        if self.want_labels:
            batch["label"] = torch.tensor(labels, dtype=torch.long)
        if self.caption_key:
            batch["captions"] = list(captions)
        if self.metadata:
            batch["json"] = list(metas)
        return batch


def open_eval_data(
    data: str | list[str],
    *,
    image_transform,
    batch_size: int,
    num_workers: int = 0,
    classnames: str | Path | Sequence[str] | None = None,
    labels: bool = True,
    captions: str | None = None,
    label_key: str = "cls",
    rank: int = 0,
    world_size: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    metadata: bool = False,
) -> EvalData:
    """Open ``data`` (shards or an ImageFolder directory) for this rank.

    Args:
        image_transform: an eval :class:`rankclip_ds.data.transforms.ImageTransform` (``to_array`` + ``collate``).
        labels: read an integer label per sample (``.cls`` for shards, the folder for ImageFolder) and check it
            against the class names when they are known.
        captions: None, ``"auto"`` (the ``.json`` member's ``captions`` list when present, else ``.txt``), ``"txt"``
            or ``"json:FIELD"`` (a string or a list of strings). Shards only.
        metadata: give each batch the samples' parsed ``.json`` members (``json``: list[dict]); a sample without a
            JSON object there is skipped (``bad_json``). Shards only.
        rank, world_size: this process's contiguous slice of the input (see the module doc).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")
    if captions not in (None, AUTO_CAPTIONS):
        parse_caption_key(captions)  # raises with the accepted forms
    names = resolve_classnames(data, classnames) if labels else None
    skips = SkipCounter(shared=num_workers > 0)
    if isinstance(data, str) and _is_folder_input(data):
        if captions or metadata:
            raise ValueError(f"{data!r} is an ImageFolder directory: captions and .json metadata need shards")
        paths, folder_labels, folders = list_image_folder(data)
        if names is not None and len(names) < len(folders):
            raise ValueError(
                f"ImageFolder {data!r} has labels up to {len(folders) - 1} but the class names list only "
                f"{len(names)}; give one class name per class folder, in label order"
            )
        files = list(zip(paths, folder_labels, strict=True))
        pieces: list = split_contiguous([FolderPiece(0, len(files))], world_size, rank)
        kind, root = "folder", Path(data)
    else:
        files, root, kind = None, None, "shards"
        pieces = split_contiguous(plan_shard_pieces(_shard_urls(data)), world_size, rank)
    sizes = [p.size for p in pieces]
    num_local = None if any(s is None for s in sizes) else sum(sizes)
    dataset = _EvalStream(
        pieces,
        files=files,
        root=root,
        transform=image_transform,
        batch_size=batch_size,
        want_labels=labels,
        caption_key=captions,
        num_classes=len(names) if names else None,
        label_key=label_key,
        max_pixels=max_pixels,
        skips=skips,
        metadata=metadata,
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    num_batches = None
    if num_local is not None:
        workers = max(1, num_workers)
        per_worker = [sum(p.size for p in split_contiguous(pieces, workers, w)) for w in range(workers)]
        num_batches = sum(-(-n // batch_size) for n in per_worker)
    return EvalData(
        loader=loader,
        kind=kind,
        classnames=names,
        skips=skips,
        image_size=tuple(image_transform.size),
        has_labels=labels,
        caption_key=captions,
        num_local=num_local,
        num_batches=num_batches,
        has_metadata=metadata,
    )
