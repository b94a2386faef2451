"""Entry point: ``deepspeed rankclip_ds/train.py --deepspeed ds_configs/zero2.json [--config X.yaml] [--a.b v ...]``.

Also runs under ``torchrun`` and ``srun`` (the rank environment is read by :mod:`rankclip_ds.dist`), and with
``--dry-run`` to validate a configuration and print the plan without a process group or real allocations.
Parse → pre-flight → build → train; every failure the user must act on becomes a message and an exit code.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # launched as a file (deepspeed/torchrun/srun pass a path)
    _here = os.path.dirname(os.path.abspath(__file__))  # importable without `pip install -e .`, and this folder
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]  # off sys.path (no shadowing)
    sys.path.insert(0, os.path.dirname(_here))

import argparse
from typing import TYPE_CHECKING

from rankclip_ds.config import ConfigError, describe_fields, load_config

if TYPE_CHECKING:
    from rankclip_ds.dist import DistInfo

__all__ = ["main", "parse_args"]

CONFIG_ERROR_EXIT_CODE = 2


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="rankclip_ds/train.py",
        description="Train a RankCLIP dual encoder with DeepSpeed. Config precedence: defaults < --config YAML < "
        "--section.key VALUE overrides (e.g. --optim.lr 1e-3 --model.image.name vit_base_patch16_224).",
        allow_abbrev=False,
    )
    parser.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config, e.g. ds_configs/zero2.json")
    parser.add_argument("--config", metavar="YAML", help="recipe, e.g. configs/demo_cpu.yaml")
    parser.add_argument("--dry-run", action="store_true", help="validate, build on meta, print the plan, exit")
    parser.add_argument("--dry-run-world-size", type=int, metavar="N", help="world size of --dry-run (default: 1)")
    parser.add_argument("--help-config", action="store_true", help="list every config field with its doc, exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the entry point with ``argv`` (default ``sys.argv[1:]``); returns the process exit code: 0 done, 75 stopped
    by a signal (requeue), 2 a configuration or launcher-environment mistake, 1 a training error."""
    from rankclip_ds.dist import DistEnvError, read_dist_env
    from rankclip_ds.trainer.errors import TRAINING_ERROR_EXIT_CODE, TrainingError

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(describe_fields())
        return 0
    try:
        info = read_dist_env()
    except DistEnvError as exc:
        print(f"launcher environment error: {exc}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    try:
        return _run(args, overrides, info)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    except TrainingError as exc:
        print(f"error (rank {info.rank}): {exc}", file=sys.stderr)
        return TRAINING_ERROR_EXIT_CODE
    except DistEnvError as exc:  # the process group could not be formed (dist.RendezvousError)
        print(f"launcher environment error (rank {info.rank}): {exc}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE


def _run(args: argparse.Namespace, overrides: list[str], info: DistInfo) -> int:
    from rankclip_ds.dist import setup_logging
    from rankclip_ds.ds_config import load_deepspeed_json

    cfg = load_config(args.config, overrides)
    if args.dry_run:
        from rankclip_ds.dry_run import dry_run

        world = args.dry_run_world_size or info.world_size
        ds_json = load_deepspeed_json(args.deepspeed) if args.deepspeed else {}
        print(dry_run(cfg, ds_json, world, source=args.deepspeed or "(no --deepspeed)").format(cfg))
        return 0
    if not args.deepspeed:
        raise ConfigError("--deepspeed JSON is required to train (e.g. --deepspeed ds_configs/zero2.json)")
    from rankclip_ds.preflight import run_preflight
    from rankclip_ds.trainer import REQUEUE_EXIT_CODE, Trainer
    from rankclip_ds.trainer.metrics import format_summary
    from rankclip_ds.trainer.signals import StopRequest

    setup_logging(info, cfg.logging.level)
    # Installed first, kept through the final save, evaluation and export: a SIGTERM/SIGUSR1 at any point is
    # recorded and acted on by the loop, never fatal; restored on return for callers that go on (tests, notebooks).
    with StopRequest() as stop:
        # Every cheap check, all problems at once, before the process group, the model and the data loader.
        run = run_preflight(
            cfg,
            load_deepspeed_json(args.deepspeed),
            info.world_size,
            ds_source=args.deepspeed,
            ranks_per_node=info.local_world_size,
        )
        trainer = Trainer(cfg, run, info)
        try:
            summary = trainer.train(stop)
        except BaseException:  # the ranks may disagree where they are: no barrier, only flush and close
            trainer.close(barrier=False)
            raise
        trainer.close()
    if info.is_main:
        print(format_summary(summary, requeue_exit_code=REQUEUE_EXIT_CODE))
    return REQUEUE_EXIT_CODE if summary["stopped_by_signal"] else 0


if __name__ == "__main__":
    sys.exit(main())
