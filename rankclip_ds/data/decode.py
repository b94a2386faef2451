"""Turning a raw record into (image, captions) or a counted skip: whitelisted decoding only.

Images are opened by PIL restricted to the JPEG, PNG and WebP decoders (whatever the member's extension claims),
with a pixel limit checked from the header before any pixel is decoded (the decompression-bomb guard). Captions come
from a ``.txt`` member or a field of the ``.json`` member and must be non-empty UTF-8. Every failure is counted by
reason in a :class:`~rankclip_ds.data.skips.SkipCounter` and the sample is dropped; nothing raises.
"""

from __future__ import annotations

import io
import json
import warnings
import zlib

from PIL import Image

from rankclip_ds.data.records import IMAGE_EXTS
from rankclip_ds.data.skips import SkipCounter

PIL_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; above it an image is skipped as a decompression bomb


def parse_caption_key(caption_key: str) -> tuple[str, str | None]:
    """``"txt"`` → (``txt``, None); ``"json:caption"`` → (``json``, ``caption``). A json field may hold a list."""
    ext, _, field = caption_key.partition(":")
    if not ext or (ext == "json") != bool(field):
        raise ValueError(
            f"caption_key={caption_key!r} is not understood: use a member extension such as 'txt', "
            "or 'json:FIELD' to read the caption (or list of captions) from a field of the .json member"
        )
    return ext.lower(), (field or None)


def extract_captions(record: dict, caption_key: str, skips: SkipCounter) -> list[str] | None:
    """The record's captions (one or more non-empty strings) or None after counting why there are none."""
    ext, field = parse_caption_key(caption_key)
    url, key = record["__url__"], record["__key__"]
    raw = record.get(ext)
    if raw is None:
        skips.add("missing_caption", url, key, detail=f"no .{ext} member")
        return None
    if len(raw) == 0:
        skips.add("zero_byte", url, key, detail=f".{ext} member is empty")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        skips.add("bad_utf8", url, key, detail=f".{ext}: {exc.reason} at byte {exc.start}")
        return None
    if field is None:
        captions = [text.strip()]
    else:
        try:
            value = json.loads(text).get(field) if text.strip() else None
        except (json.JSONDecodeError, AttributeError) as exc:
            skips.add("bad_json", url, key, detail=repr(exc))
            return None
        if value is None:
            skips.add("missing_caption", url, key, detail=f"no field {field!r} in .json")
            return None
        values = value if isinstance(value, list) else [value]
        captions = [v.strip() for v in values if isinstance(v, str)]
    captions = [c for c in captions if c]
    if not captions:
        skips.add("empty_caption", url, key)
        return None
    return captions


def choose_caption(captions: list[str], key: str, seed: int, epoch: int) -> str:
    """Picks one caption, the same for the same (seed, epoch, key) in any process (crc32, never Python ``hash``)."""
    if len(captions) == 1:
        return captions[0]
    return captions[zlib.crc32(f"{seed}:{epoch}:{key}".encode()) % len(captions)]


def open_image(record: dict, skips: SkipCounter, max_pixels: int) -> Image.Image | None:
    """Opens (header only) the record's first image member; None after counting why it cannot be used."""
    url, key = record["__url__"], record["__key__"]
    if record.get("__bad__"):
        skips.add(record["__bad__"], url, key)
        return None
    ext = next((e for e in IMAGE_EXTS if e in record), None)
    if ext is None:
        skips.add("missing_image", url, key, detail=f"members: {sorted(k for k in record if not k.startswith('__'))}")
        return None
    data = record[ext]
    if len(data) == 0:
        skips.add("zero_byte", url, key, detail=f".{ext} member is empty")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        skips.add("oversized_image", url, key, detail=str(exc))
        return None
    except Exception as exc:  # PIL raises many types on garbage (UnidentifiedImageError, SyntaxError, ...)
        skips.add("decode_error", url, key, detail=f".{ext}: {exc!r}")
        return None
    width, height = img.size
    if width * height > max_pixels or width <= 0 or height <= 0:
        skips.add("oversized_image", url, key, detail=f"{width}x{height} > max_pixels={max_pixels}")
        return None
    return img


def load_rgb(img: Image.Image, record: dict, skips: SkipCounter, min_size: int | None = None) -> Image.Image | None:
    """Decodes the pixels as RGB. For JPEG, ``min_size`` lets the decoder downscale by 2/4/8 while keeping the short
    side >= ``min_size`` (much cheaper than decoding full size and resizing)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if min_size and img.format == "JPEG":
                w, h = img.size
                scale = min(w, h) / min_size
                if scale >= 2:
                    img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
            rgb = img.convert("RGB") if img.mode != "RGB" else img
            rgb.load()
            return rgb
    except Exception as exc:  # truncated or corrupt pixel data
        skips.add("decode_error", record["__url__"], record["__key__"], detail=repr(exc))
        return None
