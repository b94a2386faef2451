"""Writes the embedded default dataset (procedural shape scenes) as WebDataset shards.

    python tools/make_synthetic_shards.py --output data/synthetic --num-train 20000 --num-zeroshot 800 --seed 0

Layout: ``OUTPUT/train/synth-train-000000.tar`` … (+ ``_manifest.json``), ``OUTPUT/zeroshot/synth-zs-*.tar`` with
``.cls`` labels, ``classnames.txt`` and ``templates.txt``, and ``OUTPUT/info.json``. See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankclip_ds.data.synthetic import write_synthetic_dataset


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=20_000)
    parser.add_argument("--num-zeroshot", type=int, default=800)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = write_synthetic_dataset(
        args.output,
        num_train=args.num_train,
        num_zeroshot=args.num_zeroshot,
        image_size=args.image_size,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        image_format=args.format,
        quality=args.quality,
    )
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
