"""Zero-shot evaluation during training (``eval.zeroshot_data``): run on every rank, logged to TensorBoard, the
console and ``<run>/eval.jsonl``."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import Config
from .metrics import MetricsWriter
from .setup import ImagePreprocessing

__all__ = ["record_zeroshot", "zeroshot_during_training"]

log = logging.getLogger("rankclip_ds.train")

SUMMARY_KEYS = ("top1", "top5", "mean_per_class", "num_samples", "num_classes")


def zeroshot_during_training(
    model, tokenizer, cfg: Config, preprocessing: ImagePreprocessing, device: torch.device
) -> dict[str, Any]:
    """Top-1/top-5/mean-per-class accuracy on ``eval.zeroshot_data``, with the chance level."""
    from ..evaluate import zeroshot_eval

    ev = cfg.eval
    with torch.no_grad():
        result = zeroshot_eval(
            model,
            tokenizer,
            data=ev.zeroshot_data,
            classnames=ev.classnames,
            templates=ev.templates,
            image_size=preprocessing.image_size,
            mean=preprocessing.mean,
            std=preprocessing.std,
            batch_size=ev.batch_size,
            max_length=cfg.model.text.max_length,
            device=device,
        )
    summary = {k: result[k] for k in SUMMARY_KEYS}
    return {**summary, "chance": 1.0 / max(1, summary["num_classes"])}


def record_zeroshot(metrics: MetricsWriter, step: int, summary: dict[str, Any]) -> None:
    """TensorBoard ``eval/zeroshot_*``, a line of ``eval.jsonl`` and of the console."""
    metrics.scalars(step, {f"eval/zeroshot_{k}": summary[k] for k in ("top1", "top5", "mean_per_class")})
    metrics.eval_record(step, {"task": "zeroshot", **summary})
    log.info(
        "eval step %d: zero-shot top-1 %.1f%% top-5 %.1f%% (chance %.1f%%, %d images, %d classes)",
        step,
        100 * summary["top1"],
        100 * summary["top5"],
        100 * summary["chance"],
        summary["num_samples"],
        summary["num_classes"],
    )
