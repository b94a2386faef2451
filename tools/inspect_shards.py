"""Inspects WebDataset shards: counts, extensions, caption lengths, failures, a manifest and a PNG grid.

    python tools/inspect_shards.py "data/cc3m/{00000..00331}.tar" --manifest --grid grid.png --json report.json

``--manifest`` writes ``_manifest.json`` (samples per shard) beside the shards of each folder (or to
``--manifest-path``): the loader reads it in epoch mode to plan equal batches per rank without scanning the tars.
Failures are counted with the same checks as the training pipeline (whitelisted decode only).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankclip_ds.data.decode import DEFAULT_MAX_PIXELS, extract_captions, load_rgb, open_image
from rankclip_ds.data.records import WHITELIST, is_local, iter_records, local_path
from rankclip_ds.data.redact import redact
from rankclip_ds.data.skips import SkipCounter
from rankclip_ds.data.sources import MANIFEST_NAME, check_sources_exist, parse_spec

_EVERYTHING = frozenset()  # marker: count every extension, read only whitelisted ones


def inspect(urls: list[str], caption_key: str, decode: bool, grid_n: int, max_pixels: int) -> tuple[dict, list]:
    skips = SkipCounter(shared=False, warn_first=0)
    per_shard: dict[str, int] = {}
    extensions: Counter[str] = Counter()
    lengths: list[int] = []
    thumbs: list[tuple[Image.Image, str]] = []
    for url in urls:
        n = 0
        for record in iter_records(url, skips, extensions=WHITELIST):
            n += 1
            extensions.update(k for k in record if not k.startswith("__"))
            captions = extract_captions(record, caption_key, skips)
            if captions is None:
                continue
            lengths.extend(len(c.split()) for c in captions)
            if not decode and len(thumbs) >= grid_n:
                continue
            img = open_image(record, skips, max_pixels)
            rgb = load_rgb(img, record, skips, 128) if img is not None else None
            if rgb is not None and len(thumbs) < grid_n:
                thumbs.append((rgb.copy(), captions[0]))
        per_shard[url] = n
    counts = skips.counts()
    ignored = {k: counts.pop(k) for k in ("unknown_extension", "unsafe_member") if k in counts}
    arr = np.array(lengths or [0])
    report = {
        "shards": len(urls),
        "samples": sum(per_shard.values()),
        "samples_per_shard": per_shard,
        "extensions": dict(sorted(extensions.items())),
        "ignored_members": ignored,
        "caption_words": {
            "min": int(arr.min()),
            "mean": round(float(arr.mean()), 2),
            "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95)),
            "max": int(arr.max()),
        },
        "failures": counts,
        "images_decoded": decode,
    }
    return report, thumbs


def write_manifests(per_shard: dict[str, int], path: str | None) -> list[str]:
    groups: dict[Path, dict[str, int]] = defaultdict(dict)
    for url, n in per_shard.items():
        p = Path(local_path(url))
        groups[Path(path) if path else p.parent / MANIFEST_NAME][p.name] = n
    for target, shards in groups.items():
        existing = {}
        if target.exists():
            existing = json.loads(target.read_text()).get("shards", {})
        existing.update(shards)
        target.write_text(json.dumps({"shards": existing, "total": sum(existing.values())}, indent=1, sort_keys=True))
    return [str(t) for t in groups]


def save_grid(thumbs: list[tuple[Image.Image, str]], path: str, cell: int = 160, columns: int = 4) -> None:
    font = ImageFont.load_default()
    rows = max(1, -(-len(thumbs) // columns))
    text_h = 48
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, caption) in enumerate(thumbs):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        scale = (cell - 8) / max(img.size)
        thumb = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.NEAREST if scale > 1 else Image.BICUBIC,
        )
        grid.paste(thumb, (x + (cell - thumb.width) // 2, y + 4))
        lines = textwrap.wrap(caption, width=cell // 7)[:3]
        draw.multiline_text((x + 4, y + cell - 2), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
    grid.save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="shard spec: brace expressions joined with '::'")
    parser.add_argument("--caption-key", default="txt", help="'txt' or 'json:FIELD'")
    parser.add_argument("--no-decode", action="store_true", help="skip decoding images (faster; fewer failure kinds)")
    parser.add_argument("--manifest", action="store_true", help="write _manifest.json beside the shards")
    parser.add_argument("--manifest-path", default=None, help="write one manifest here instead")
    parser.add_argument("--grid", default=None, help="save a PNG grid of samples with their captions")
    parser.add_argument("--grid-n", type=int, default=16)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--json", default=None, help="write the report as json here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sources = parse_spec(args.spec)
    check_sources_exist(sources)
    urls = [u for s in sources for u in s.urls]
    remote = [u for u in urls if not is_local(u)]
    if args.manifest and not args.manifest_path and remote:
        parser.error(
            f"--manifest writes beside the shards, which cannot be done for remote shards ({redact(remote[0])}): "
            "pass --manifest-path _manifest.json and upload that file next to the shards"
        )
    report, thumbs = inspect(
        urls, args.caption_key, not args.no_decode, args.grid_n if args.grid else 0, args.max_pixels
    )
    if args.manifest or args.manifest_path:
        report["manifests"] = write_manifests(report["samples_per_shard"], args.manifest_path)
    if args.grid:
        save_grid(thumbs, args.grid)
        report["grid"] = args.grid
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    summary = {k: v for k, v in report.items() if k != "samples_per_shard"}
    print(json.dumps(summary, indent=1))
    return report


if __name__ == "__main__":
    main()
