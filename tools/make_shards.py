"""Packs images and captions into WebDataset tar shards.

    python tools/make_shards.py --input pairs.csv --output data/mine --image-col filepath --caption-col title \
        --max-side 512 --reencode --workers 2

Inputs: a CSV, TSV or JSONL file (or Parquet, when pyarrow is installed) with an image-path column (absolute, or
relative to the file's folder) and a caption column; or a folder of images with sidecar captions (``a.jpg`` +
``a.txt``, searched recursively, in sorted order). Output: ``PREFIX-000000.tar`` … (each sample: the image as
``.jpg``/``.png``/``.webp``, ``.txt`` caption, ``.json`` with the source path and size), ``_manifest.json``
(samples per shard, used by the loader in epoch mode) and ``_stats.json`` (written, skipped by reason).
Identical input gives byte-identical output: keys are input row numbers, members have fixed metadata, and the
parallel workers' results are written in input order.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import multiprocessing as mp
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankclip_ds.data.shard_writer import ShardSink

logger = logging.getLogger("rankclip_ds.tools.make_shards")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def read_table(path: Path, image_col: str, caption_col: str) -> Iterator[tuple[str, str | None]]:
    """Yields (image path, caption) rows of a CSV/TSV/JSONL/Parquet file, paths resolved against its folder."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = iter(reader)
            _check_columns(reader.fieldnames or [], path, image_col, caption_col)
            for row in rows:
                yield row.get(image_col) or "", row.get(caption_col)
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    if n == 0:
                        _check_columns(list(row), path, image_col, caption_col)
                    yield str(row.get(image_col) or ""), row.get(caption_col)
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise SystemExit(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to CSV"
            ) from exc
        table = pq.read_table(path)
        _check_columns(table.column_names, path, image_col, caption_col)
        yield from zip(table.column(image_col).to_pylist(), table.column(caption_col).to_pylist(), strict=True)
    else:
        raise SystemExit(f"--input {path}: unknown table type {suffix!r}; use .csv, .tsv, .jsonl, .parquet or a folder")


def _check_columns(columns: list[str], path: Path, image_col: str, caption_col: str) -> None:
    missing = [c for c in (image_col, caption_col) if c not in columns]
    if missing:
        raise SystemExit(f"{path}: no column {missing} (columns: {columns}); set --image-col / --caption-col")


def read_folder(folder: Path) -> Iterator[tuple[str, str | None]]:
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = image.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8", errors="replace") if sidecar.exists() else None
        yield str(image), caption


def process(job: tuple[int, str, str | None, str, int | None, str | None, int]) -> tuple[int, dict | None, str]:
    """Loads, checks, optionally resizes/re-encodes one image; returns (index, sample or None, skip reason)."""
    index, image_path, caption, base, max_side, reencode, quality = job
    caption = (caption or "").strip() if isinstance(caption, str) or caption is None else str(caption).strip()
    if not caption:
        return index, None, "missing_caption"
    path = Path(image_path) if Path(image_path).is_absolute() else Path(base) / image_path
    try:
        data = path.read_bytes()
    except OSError:
        return index, None, "missing_image"
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        fmt = img.format
        needs_resize = max_side is not None and max(width, height) > max_side
        if reencode or needs_resize or fmt not in KEEP_FORMATS:
            img = img.convert("RGB")
            if needs_resize:
                scale = max_side / max(width, height)
                img = img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
            target = reencode or "jpg"
            buf = io.BytesIO()
            pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[target]
            img.save(buf, pil_format, **({"quality": quality} if target != "png" else {}))
            data, ext, (width, height) = buf.getvalue(), target, img.size
        else:
            img.verify()
            ext = KEEP_FORMATS[fmt]
    except Exception:
        return index, None, "bad_image"
    meta = {"source": str(image_path), "width": width, "height": height}
    sample = {"__key__": f"{index:09d}", ext: data, "txt": caption, "json": json.dumps(meta, sort_keys=True)}
    return index, sample, ""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="CSV/TSV/JSONL/Parquet file, or a folder of images + .txt")
    parser.add_argument("--output", required=True, help="output folder for the shards")
    parser.add_argument("--prefix", default="shard", help="shard file prefix (default: shard)")
    parser.add_argument("--image-col", default="image", help="image path column (relative to the input file)")
    parser.add_argument("--caption-col", default="caption", help="caption column")
    parser.add_argument("--max-count", type=int, default=None, help="stop after this many input rows")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--max-side", type=int, default=None, help="downscale so the longer side is at most this")
    parser.add_argument("--reencode", choices=("jpg", "png", "webp"), default=None, help="re-encode every image")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality when re-encoding")
    parser.add_argument("--workers", type=int, default=1, help="parallel image processes")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    source = Path(args.input)
    if not source.exists():
        raise SystemExit(f"--input {source} does not exist")
    rows = read_folder(source) if source.is_dir() else read_table(source, args.image_col, args.caption_col)
    base = str(source if source.is_dir() else source.parent)

    def jobs():
        for index, (image_path, caption) in enumerate(rows):
            if args.max_count is not None and index >= args.max_count:
                return
            yield index, image_path, caption, base, args.max_side, args.reencode, args.quality

    from tqdm import tqdm

    skipped: Counter[str] = Counter()
    written = 0
    pool = mp.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    try:
        results = pool.imap(process, jobs(), chunksize=16) if pool else map(process, jobs())  # ordered either way
        with ShardSink(args.output, args.prefix, args.samples_per_shard) as sink:
            for _, sample, reason in tqdm(results, disable=args.no_progress, unit="img", desc="make_shards"):
                if sample is None:
                    skipped[reason] += 1
                    continue
                sink.write(sample)
                written += 1
    finally:
        if pool:
            pool.close()
            pool.join()
    out = Path(args.output)
    stats = {
        "written": written,
        "skipped": dict(sorted(skipped.items())),
        "shards": len(sink.shard_counts),
        "input": source.name,
    }
    (out / "_stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
    (out / "_manifest.json").write_text(
        json.dumps({"shards": sink.shard_counts, "total": written}, indent=1, sort_keys=True)
    )
    logger.info("wrote %d samples in %d shards to %s; skipped %s", written, len(sink.shard_counts), out, dict(skipped))
    return stats


if __name__ == "__main__":
    main()
