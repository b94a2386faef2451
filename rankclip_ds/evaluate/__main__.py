"""Command line: ``python -m rankclip_ds.evaluate {zeroshot,retrieval,relevance,linear-probe} --model PATH ...``.

Examples::

    python -m rankclip_ds.evaluate zeroshot --model runs/demo/export --data data/synthetic/zeroshot \\
        --templates openai --output zs.json
    python -m rankclip_ds.evaluate retrieval --model runs/demo/export --data "coco/val-{0000..0004}.tar"
    python -m rankclip_ds.evaluate relevance --model runs/demo/export --data data/scenes/eval
    python -m rankclip_ds.evaluate linear-probe --model runs/demo/export --train-data train/ --test-data val/
    torchrun --nproc_per_node 8 -m rankclip_ds.evaluate zeroshot --model ... --data ...   # every GPU embeds a slice

The model is loaded with :func:`rankclip_ds.load_model`. The eval transform's size, mean and std come from the image
tower's timm data config unless given. Rank 0 prints a summary and writes ``--output``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .datasets import AUTO_CAPTIONS
from .linear_probe import DEFAULT_WEIGHT_DECAYS

log = logging.getLogger("rankclip_ds.evaluate")

DEFAULT_MAX_LENGTH = 32


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1e-4,1e-3") from exc
    if not values:
        raise argparse.ArgumentTypeError("give at least one value, e.g. 1e-4")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,5,10") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers ≥ 1, e.g. 1,5,10")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rankclip_ds.evaluate",
        description="Zero-shot classification, image-text retrieval, graded relevance and ranking consistency, or a "
        "linear probe of an exported model. "
        "Launch under torchrun (or srun, deepspeed) to spread the work over every rank. See docs/evaluation.md.",
    )
    sub = parser.add_subparsers(dest="task", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        required=True,
        help="export folder (model.safetensors + config.json) or training checkpoint folder (<run>/checkpoints/step_…)",
    )
    common.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (this rank's GPU if any)")
    common.add_argument("--batch-size", type=int, default=64, help="images per forward pass, per rank")
    common.add_argument("--text-batch-size", type=int, default=256, help="texts per forward pass, per rank")
    common.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    common.add_argument("--image-size", type=int, default=None, help="default: the image tower's input size")
    common.add_argument("--crop-pct", type=float, default=1.0, help="resize to image_size/crop_pct, centre crop")
    common.add_argument("--max-length", type=int, default=None, help="text tokens (default: the model's config)")
    common.add_argument("--output", default=None, help="write the result JSON here")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")

    zs = sub.add_parser("zeroshot", parents=[common], help="zero-shot classification")
    zs.add_argument("--data", required=True, help="labelled shards (.cls) or an ImageFolder directory")
    zs.add_argument("--classnames", default=None, help="one class name per line (default: classnames.txt beside)")
    zs.add_argument("--templates", default="a photo of {}.", help="'openai', a template with {}, or a file")
    zs.add_argument("--label-key", default="cls", help="member holding the integer label in shards")

    rt = sub.add_parser("retrieval", parents=[common], help="image-text retrieval Recall@1/5/10")
    rt.add_argument("--data", required=True, help="shards with an image and one or several captions per sample")
    rt.add_argument("--captions", default=AUTO_CAPTIONS, help="auto, txt or json:FIELD (a string or a list)")

    rel = sub.add_parser("relevance", parents=[common], help="NDCG, mAP, rank correlation against graded relevance")
    rel.add_argument("--data", required=True, help="shards with an image, a .txt caption and a .json of facts")
    rel.add_argument("--relevance", default=None, help=".npy (N, N) relevance matrix (default: shared .json facts)")
    rel.add_argument("--ks", type=_ints, default=(1, 5, 10), help="comma-separated k of NDCG@k, e.g. 1,5,10")

    lp = sub.add_parser("linear-probe", parents=[common], help="logistic regression on frozen image features")
    lp.add_argument("--train-data", required=True, help="labelled shards or an ImageFolder directory")
    lp.add_argument("--test-data", required=True, help="labelled shards or an ImageFolder directory")
    lp.add_argument("--classnames", default=None, help="class names file (default: classnames.txt beside)")
    lp.add_argument("--weight-decays", type=_floats, default=DEFAULT_WEIGHT_DECAYS, help="comma-separated sweep")
    lp.add_argument("--val-fraction", type=float, default=0.2, help="share of train held out to pick the decay")
    lp.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    lp.add_argument("--max-iter", type=int, default=200, help="L-BFGS iterations per fit")
    lp.add_argument("--feature", choices=("embedding", "tower"), default="embedding", help="which image features")
    lp.add_argument("--label-key", default="cls", help="member holding the integer label in shards")
    return parser


def _max_length(model_path: str) -> int:
    try:
        from rankclip_ds.export import model_source_config

        return int(model_source_config(model_path).text.max_length)
    except Exception as exc:  # a folder without an export config: fall back, and say so
        log.warning("no text max_length in %s (%s); using %d, set --max-length", model_path, exc, DEFAULT_MAX_LENGTH)
        return DEFAULT_MAX_LENGTH


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import rankclip_ds
    from rankclip_ds.dist import init_distributed, read_dist_env, setup_logging

    info = read_dist_env()
    setup_logging(info)
    init_distributed(info, use_deepspeed=False)
    device = info.device if args.device == "auto" else args.device
    try:
        model, tokenizer = rankclip_ds.load_model(args.model, device=device, with_tokenizer=True)
        common = _common_options(args, model, device)
        max_length = args.max_length or _max_length(args.model)
        result = _run_task(args, model, tokenizer, common, max_length)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["model"] = str(args.model)
    if info.is_main:
        _print_result(result, args.output)
    _close_distributed()
    return 0


def _common_options(args: argparse.Namespace, model, device: str) -> dict:
    """Keyword arguments shared by every task: batching, device, progress and the eval transform (size, mean and std
    from the image tower's timm data config unless given)."""
    data_cfg = model.image_tower.data_config()
    transform = {
        "image_size": args.image_size or tuple(data_cfg["input_size"][1:]),
        "mean": tuple(data_cfg["mean"]),
        "std": tuple(data_cfg["std"]),
        "crop_pct": args.crop_pct,
    }
    return {
        "batch_size": args.batch_size,
        "device": device,
        "num_workers": args.num_workers,
        "progress": not args.no_progress,
        **transform,
    }


def _run_task(args: argparse.Namespace, model, tokenizer, common: dict, max_length: int) -> dict:
    """Runs ``args.task`` on its data and returns the result dict."""
    from . import linear_probe_eval, relevance_eval, retrieval_eval, zeroshot_eval

    if args.task == "zeroshot":
        return zeroshot_eval(
            model,
            tokenizer,
            data=args.data,
            classnames=args.classnames,
            templates=args.templates,
            max_length=max_length,
            text_batch_size=args.text_batch_size,
            label_key=args.label_key,
            **common,
        )
    if args.task == "retrieval":
        return retrieval_eval(
            model,
            tokenizer,
            data=args.data,
            captions=args.captions,
            max_length=max_length,
            text_batch_size=args.text_batch_size,
            **common,
        )
    if args.task == "relevance":
        return relevance_eval(
            model,
            tokenizer,
            data=args.data,
            relevance=args.relevance,
            ks=args.ks,
            max_length=max_length,
            text_batch_size=args.text_batch_size,
            **common,
        )
    return linear_probe_eval(
        model,
        train_data=args.train_data,
        test_data=args.test_data,
        classnames=args.classnames,
        weight_decays=args.weight_decays,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_iter=args.max_iter,
        feature=args.feature,
        label_key=args.label_key,
        **common,
    )


def _print_result(result: dict, output: str | None) -> None:
    """Prints the summary and writes the result JSON to ``output`` when given (rank 0 only)."""
    from .report import format_summary, write_json

    print(format_summary(result))
    if output:
        print(f"wrote {write_json(result, output)}")


def _close_distributed() -> None:
    """Tears the process group down, if one was started, once every rank is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        # Every rank done before any tears its connections down: gloo can abort a process ("terminate called without
        # an active exception") whose peer closes the pairs while its own last transfer is still being processed.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
