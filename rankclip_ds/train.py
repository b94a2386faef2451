"""Entry point: ``deepspeed rankclip_ds/train.py --deepspeed ds_configs/zero2.json [--config X.yaml] [--a.b v ...]``.

Also runs under ``torchrun`` and ``srun`` (the rank environment is read by :mod:`rankclip_ds.dist`), and as
``python rankclip_ds/train.py ... --dry-run`` to validate a configuration and print the plan without a process
group or real allocations.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Launched as a file (deepspeed/torchrun/srun pass a path): make the package importable even without
    # `pip install -e .`, and keep this folder off sys.path so its modules cannot shadow top-level ones.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse
from typing import TYPE_CHECKING

from rankclip_ds.config import Config, ConfigError, field_docs, load_config

if TYPE_CHECKING:
    from rankclip_ds.dist import DistInfo
    from rankclip_ds.trainer.signals import StopRequest

__all__ = ["main", "parse_args"]


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
    parser.add_argument(
        "--dry-run-world-size",
        type=int,
        default=None,
        metavar="N",
        help="world size assumed by --dry-run (default: the launcher's, or 1)",
    )
    parser.add_argument("--help-config", action="store_true", help="list every config field with its doc, exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def _print_config_help() -> None:
    import dataclasses
    import typing

    def walk(cls: type, prefix: str) -> None:
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            print(f"--{prefix}{f.name} (default {default!r})\n    {docs.get(f.name, '')}")

    walk(Config, "")


def main(argv: list[str] | None = None) -> int:
    """Run the entry point with ``argv`` (default ``sys.argv[1:]``); returns the process exit code."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        _print_config_help()
        return 0
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from rankclip_ds.dist import read_dist_env

    info = read_dist_env()
    if args.dry_run:
        from rankclip_ds.ds_config import load_deepspeed_json
        from rankclip_ds.model import ModelConfigError
        from rankclip_ds.plan import build_plan

        world = args.dry_run_world_size or info.world_size
        try:
            ds_json = load_deepspeed_json(args.deepspeed) if args.deepspeed else {}
            # build_plan runs the pre-flight first: every config problem at once, before the model is built.
            plan = build_plan(cfg, ds_json, world, source=args.deepspeed or "(no --deepspeed)")
        except (ConfigError, ModelConfigError) as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        print(plan.format(cfg))
        return 0

    if not args.deepspeed:
        print(
            "config error: --deepspeed JSON is required to train (e.g. --deepspeed ds_configs/zero2.json)",
            file=sys.stderr,
        )
        return 2
    return _train(cfg, args.deepspeed, info)


def _train(cfg: Config, ds_path: str, info: DistInfo) -> int:
    from rankclip_ds.dist import setup_logging
    from rankclip_ds.ds_config import load_deepspeed_json
    from rankclip_ds.preflight import run_preflight
    from rankclip_ds.trainer.signals import StopRequest

    setup_logging(info, cfg.logging.level)
    # Installed first and kept through training: a SIGTERM/SIGUSR1 during start-up or during the final save,
    # evaluation and export is recorded, never fatal; the training loop acts on it. Restored when _train returns,
    # for callers of main() that go on living (tests, notebooks).
    stop = StopRequest()
    try:
        try:
            ds_json = load_deepspeed_json(ds_path)
            # Every cheap check, all problems at once, before the process group, the model and the data loader.
            run_preflight(cfg, ds_json, info.world_size, ds_source=ds_path)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        return _run_trainer(cfg, ds_json, ds_path, info, stop)
    finally:
        stop.restore()


def _run_trainer(cfg: Config, ds_json: dict, ds_path: str, info: DistInfo, stop: StopRequest) -> int:
    """Build the trainer and train; a :class:`TrainingError` (or a config mistake the trainer finds, such as a
    checkpoint of another global batch) becomes a message and an exit code instead of a traceback."""
    from rankclip_ds.trainer import Trainer
    from rankclip_ds.trainer.errors import TRAINING_ERROR_EXIT_CODE, TrainingError
    from rankclip_ds.trainer.signals import REQUEUE_EXIT_CODE

    trainer = None
    failed = False
    try:
        trainer = Trainer(cfg, ds_json, info, ds_source=ds_path)
        summary = trainer.train(stop)
    except ConfigError as exc:
        failed = True
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        failed = True
        print(f"error (rank {info.rank}): {exc}", file=sys.stderr)
        return TRAINING_ERROR_EXIT_CODE
    except BaseException:
        failed = True
        raise
    finally:
        if trainer is not None:
            # After a failure the ranks may disagree about where they are, so close()'s barrier could wait
            # forever for a rank that already left: then flush and close the files only.
            trainer.close(barrier=not failed)
    if summary["stopped_by_signal"]:
        if info.is_main:
            print(
                f"stopped by signal {summary['stopped_by_signal']} at step {summary['steps']}; checkpoint "
                f"{summary['checkpoint']}; exit code {REQUEUE_EXIT_CODE} (resume with --checkpoint.resume latest)"
            )
        return REQUEUE_EXIT_CODE
    if info.is_main:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """The end-of-run report: what was trained, how well, and where everything is."""
    lines = ["", "RankCLIP-DS run finished", f"  steps            {summary['steps']} in {summary['seconds']:.0f} s"]
    ev = summary.get("eval")
    if ev:
        lines.append(
            f"  zero-shot        top-1 {100 * ev['top1']:.1f}% (chance {100 * ev['chance']:.1f}%), "
            f"top-5 {100 * ev['top5']:.1f}%, mean per class {100 * ev['mean_per_class']:.1f}% "
            f"on {ev['num_samples']} held-out images of {ev['num_classes']} classes"
        )
    run = summary["run_dir"]
    lines += [
        f"  run folder       {run} (resolved config: {run}/config.yaml)",
        f"  TensorBoard      tensorboard --logdir {run}/tb",
        f"  checkpoint       {summary['checkpoint']}",
        f"  export           {summary['export']} (rankclip_ds.load_model(path) loads it without DeepSpeed)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
