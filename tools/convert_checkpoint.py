#!/usr/bin/env python
"""Converts a training checkpoint to DeepSpeed's universal (world-size independent) form ahead of time.

    python tools/convert_checkpoint.py runs/my_run/checkpoints/step_00012000

The trainer does this by itself when a run resumes on another world size (rank 0 converts while the other ranks
wait); for a large model that can take a while, so a cluster user may prefer to run it once on a CPU node before
submitting the resized job. The result is ``<checkpoint>/universal/`` (with its own ``COMPLETE`` marker), which a
resume finds and reuses.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankclip_ds.trainer.checkpoint import COMPLETE, UNIVERSAL, read_meta
from rankclip_ds.trainer.universal import convert_to_universal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a complete checkpoint folder (…/checkpoints/step_NNNNNNNN)")
    parser.add_argument("--force", action="store_true", help="convert again even if universal/ is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    path: Path = args.checkpoint
    if not (path / COMPLETE).is_file():
        print(f"error: {path} is not a complete checkpoint folder (no {COMPLETE} marker)", file=sys.stderr)
        return 2
    out = path / UNIVERSAL
    if (out / COMPLETE).is_file() and not args.force:
        print(f"{out} is already complete (use --force to convert again)")
        return 0
    meta = read_meta(path)
    start = time.time()
    convert_to_universal(path)
    print(
        f"converted {path} (step {meta.get('step')}, written by {meta.get('world_size', '?')} ranks, ZeRO stage "
        f"{meta.get('zero_stage', '?')}) to {out} in {time.time() - start:.1f} s; resume with any world size and "
        f"the same global batch ({meta.get('global_batch_size', '?')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
