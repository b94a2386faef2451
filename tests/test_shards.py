"""tools/make_shards.py output read back with plain webdataset; img2dataset's layout read by the loader."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from rankclip_ds.data import build_image_transform, build_train_loader
from rankclip_ds.data.shard_writer import TarShardWriter
from rankclip_ds.data.sources import parse_spec, resolve_counts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_shards


def write_images(folder: Path, n: int) -> list[tuple[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        array = np.full((40 + i, 60, 3), (i * 37) % 256, np.uint8)
        name = f"img{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        Image.fromarray(array).save(folder / name)
        pairs.append((f"images/{name}", f"caption number {i}, with a comma"))
    return pairs


def read_back(output: Path) -> dict[str, tuple[str, tuple[int, int]]]:
    urls = sorted(str(p) for p in output.glob("*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil", handler=wds.reraise_exception)  # plain webdataset
    out = {}
    for sample in dataset:
        image = sample.get("jpg") or sample.get("png") or sample.get("webp")
        out[sample["json"]["source"]] = (sample["txt"], image.size)
    return out


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def csv_input(tmp_path):
    pairs = write_images(tmp_path / "images", 12)
    rows = [*pairs, ("images/does_not_exist.jpg", "missing file"), ("images/img001.jpg", "")]
    (tmp_path / "images" / "garbage.jpg").write_bytes(b"not an image")
    rows.append(("images/garbage.jpg", "garbage"))
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return tmp_path / "pairs.csv", pairs


def test_csv_to_shards_reads_back_with_plain_webdataset(tmp_path, csv_input):
    table, pairs = csv_input
    args = [
        "--input",
        str(table),
        "--image-col",
        "filepath",
        "--caption-col",
        "title",
        "--samples-per-shard",
        "5",
        "--no-progress",
    ]
    stats = make_shards.main([*args, "--output", str(tmp_path / "out")])
    assert stats["written"] == 12
    assert stats["skipped"] == {"bad_image": 1, "missing_caption": 1, "missing_image": 1}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    got = read_back(tmp_path / "out")
    assert {path: caption for path, (caption, _) in got.items()} == dict(pairs)
    assert json.loads((tmp_path / "out" / "_stats.json").read_text())["written"] == 12
    # identical input, identical bytes (also with parallel workers)
    make_shards.main([*args, "--output", str(tmp_path / "again"), "--workers", "2"])
    assert digest(tmp_path / "out") == digest(tmp_path / "again")


def test_resize_reencode_max_count_jsonl_and_folder(tmp_path):
    pairs = write_images(tmp_path / "images", 6)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for image, caption in pairs:
            f.write(json.dumps({"image": image, "caption": caption}) + "\n")
    stats = make_shards.main(
        [
            "--input",
            str(tmp_path / "pairs.jsonl"),
            "--output",
            str(tmp_path / "a"),
            "--max-side",
            "20",
            "--reencode",
            "webp",
            "--max-count",
            "4",
            "--no-progress",
        ]
    )
    assert stats["written"] == 4
    got = read_back(tmp_path / "a")
    assert len(got) == 4 and all(max(size) == 20 for _, size in got.values())
    for i in range(3):  # a folder with sidecar captions
        (tmp_path / "images" / f"img{i:03d}.txt").write_text(f"sidecar {i}")
    stats = make_shards.main(["--input", str(tmp_path / "images"), "--output", str(tmp_path / "b"), "--no-progress"])
    assert stats == {"written": 3, "skipped": {"missing_caption": 3}, "shards": 1, "input": "images"}
    assert sorted(c for c, _ in read_back(tmp_path / "b").values()) == ["sidecar 0", "sidecar 1", "sidecar 2"]


def test_parquet_input(tmp_path):
    import pyarrow as pa  # a pinned dev requirement: its absence is a failure, not a skip
    import pyarrow.parquet as pq

    pairs = write_images(tmp_path / "images", 4)
    pq.write_table(pa.table({"url": [p for p, _ in pairs], "text": [c for _, c in pairs]}), tmp_path / "t.parquet")
    stats = make_shards.main(
        [
            "--input",
            str(tmp_path / "t.parquet"),
            "--output",
            str(tmp_path / "o"),
            "--image-col",
            "url",
            "--caption-col",
            "text",
            "--no-progress",
        ]
    )
    assert stats["written"] == 4
    # Each row became one sample, in row order: its caption, and its image file's bytes unchanged (PNG and JPEG
    # are kept as they are), read back with plain webdataset.
    urls = sorted(str(p) for p in (tmp_path / "o").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(4)]
    for sample, (image, caption) in zip(samples, pairs, strict=True):
        assert sample["txt"].decode() == caption
        assert json.loads(sample["json"])["source"] == image
        ext = image.rsplit(".", 1)[1]
        assert sample[ext] == (tmp_path / image).read_bytes(), image


def test_shards_feed_the_loader(tmp_path, csv_input):
    table, _ = csv_input
    make_shards.main(
        [
            "--input",
            str(table),
            "--output",
            str(tmp_path / "out"),
            "--image-col",
            "filepath",
            "--caption-col",
            "title",
            "--samples-per-shard",
            "5",
            "--no-progress",
        ]
    )
    loader = build_train_loader(
        str(tmp_path / "out" / "shard-{000000..000002}.tar"),
        tokenizer=None,
        image_transform=build_image_transform(16, train=True),
        batch_size=3,
        num_workers=0,
        seed=0,
        rank=0,
        world_size=1,
    )
    assert loader.batches_per_epoch == 4
    assert sorted(k for b in loader.epoch_iter(0) for k in b["key"]) == [f"{i:09d}" for i in range(12)]


def test_img2dataset_layout_is_read(tmp_path):
    """img2dataset: {00000..}.tar with KEY.jpg/.txt/.json, and {shard}_stats.json + {shard}.parquet beside them."""
    keys = []
    for shard in range(2):
        with TarShardWriter(tmp_path / f"{shard:05d}.tar") as w:
            for i in range(5):
                key = f"{shard:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(np.full((32, 48, 3), i * 40, np.uint8)).save(buf, "JPEG")
                meta = {
                    "url": f"http://example.invalid/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "caption": f"caption {key}",
                    "width": 48,
                    "height": 32,
                }
                w.write({"__key__": key, "jpg": buf.getvalue(), "txt": f"caption {key}", "json": json.dumps(meta)})
                keys.append(key)
        stats = {"count": 6, "successes": 5, "failed_to_download": 1, "failed_to_resize": 0}
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
        (tmp_path / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by the loader PAR1")
    sources = parse_spec(str(tmp_path / "{00000..00001}.tar"))
    resolve_counts(sources)
    assert sources[0].counts == [5, 5]  # taken from the _stats.json files
    for caption_key in ("txt", "json:caption"):
        loader = build_train_loader(
            str(tmp_path / "{00000..00001}.tar"),
            tokenizer=None,
            image_transform=build_image_transform(16, train=True),
            batch_size=2,
            num_workers=0,
            seed=0,
            rank=0,
            world_size=1,
            caption_key=caption_key,
        )
        batches = list(loader.epoch_iter(0))
        assert len(batches) == 5
        assert sorted(k for b in batches for k in b["key"]) == keys
        assert all(t == f"caption {k}" for b in batches for t, k in zip(b["text"], b["key"], strict=True))
        assert not loader.skip_counts()
