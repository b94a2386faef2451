"""Writes the many-to-many scenes benchmark (several objects per image, partial captions, facts) as shards.

    python tools/make_scene_shards.py --output data/scenes --num-train 20000 --num-eval 1000 --seed 0

Layout: ``OUTPUT/train/scenes-train-*.tar``, ``OUTPUT/eval/scenes-eval-*.tar`` (each sample: ``jpg``, ``txt``,
``json`` with ``image_facts``, ``caption_facts`` and ``objects``; ``_manifest.json`` beside the shards),
``OUTPUT/zeroshot/scenes-zs-*.tar`` with ``.cls`` labels, ``classnames.txt`` and ``templates.txt``, and
``OUTPUT/info.json``. Prints info.json plus the measured samples/s. See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankclip_ds.data.scenes import write_scene_dataset


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=20_000)
    parser.add_argument("--num-eval", type=int, default=1000)
    parser.add_argument("--num-zeroshot", type=int, default=800)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    info = write_scene_dataset(
        Path(args.output),
        num_train=args.num_train,
        num_eval=args.num_eval,
        num_zeroshot=args.num_zeroshot,
        image_size=args.image_size,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
    )
    elapsed = time.perf_counter() - start
    total = args.num_train + args.num_eval + args.num_zeroshot
    print(json.dumps({**info, "seconds": round(elapsed, 2), "samples_per_second": round(total / elapsed, 1)}, indent=1))
    return info


if __name__ == "__main__":
    main()
