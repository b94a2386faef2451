"""Patch dropout's speed-up: forward + backward time of a ViT image tower on the CPU at several ``patch_dropout``
rates (FLIP), in one process, repetitions interleaved across the rates, median per rate.

    python tools/bench_patch_dropout.py --json patch_dropout.json            # ViT-B/16 at 224 px, batch 8
    python tools/bench_patch_dropout.py --quick                              # a small ViT, seconds

The tower is this package's ``ImageTower`` (timm's ViT with ``patch_drop_rate``), in train mode, random images,
the loss the sum of the features; each repetition times one forward and one backward (gradients set to None
between). Interleaving (rate 0, 0.25, 0.5, 0.75, rate 0, ...) spreads machine noise over every rate alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankclip_ds.model import ImageTower

RATES = (0.0, 0.25, 0.5, 0.75)


def build_towers(name: str, image_size: int, model_kwargs: dict, rates: tuple[float, ...]) -> dict[float, ImageTower]:
    """One tower per rate, all with the same weights."""
    towers = {}
    for rate in rates:
        torch.manual_seed(0)
        towers[rate] = ImageTower(name, image_size, patch_dropout=rate, model_kwargs=model_kwargs).train()
    return towers


def time_step(tower: ImageTower, images: torch.Tensor) -> tuple[float, float]:
    """Wall seconds and process CPU seconds (all threads; less sensitive to a shared machine) for one forward and
    backward."""
    tower.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    tower(images).sum().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(towers: dict[float, ImageTower], images: torch.Tensor, reps: int, warmup: int) -> dict[float, list]:
    """Interleaved repetitions: each round times every rate once; the warm-up rounds are dropped. Per rate a list
    of (wall s, cpu s)."""
    times: dict[float, list] = {rate: [] for rate in towers}
    for round_ in range(warmup + reps):
        for rate, tower in towers.items():
            seconds = time_step(tower, images)
            if round_ >= warmup:
                times[rate].append(seconds)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a small ViT (depth 4, width 192) at 64 px, 5 reps")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    model_kwargs: dict = {}
    if args.quick:
        args.model, args.image_size, args.reps, args.warmup = "vit_tiny_patch16_224", 64, 5, 1
        model_kwargs = {"patch_size": 8, "depth": 4}
    if args.threads:
        torch.set_num_threads(args.threads)
    towers = build_towers(args.model, args.image_size, model_kwargs, RATES)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    times = measure(towers, images, args.reps, args.warmup)

    def median(rate: float, i: int) -> float:
        return statistics.median(t[i] for t in times[rate])

    tokens = (args.image_size // towers[0.0].trunk.patch_embed.patch_size[0]) ** 2
    rows = [
        {"patch_dropout": rate, "tokens_kept": tokens - int(tokens * rate), "median_s": median(rate, 0),
         "median_cpu_s": median(rate, 1), "speedup": median(0.0, 0) / median(rate, 0),
         "speedup_cpu": median(0.0, 1) / median(rate, 1)}
        for rate in times
    ]  # fmt: skip
    print(f"{args.model} at {args.image_size} px ({tokens} patches), batch {args.batch}, forward + backward, "
          f"{args.reps} interleaved reps, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'patch_dropout':>13} {'tokens kept':>11} {'median s':>9} {'speed-up':>8} {'cpu s':>8} {'speed-up':>8}")
    for r in rows:
        print(f"{r['patch_dropout']:>13} {r['tokens_kept']:>11} {r['median_s']:>9.3f} {r['speedup']:>7.2f}× "
              f"{r['median_cpu_s']:>8.3f} {r['speedup_cpu']:>7.2f}×")  # fmt: skip
    result = {
        "model": args.model, "image_size": args.image_size, "batch": args.batch, "reps": args.reps,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or
        platform.machine(), "rows": rows, "times": {str(k): v for k, v in times.items()},
    }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
