"""Image–text retrieval (Recall@k both ways) on shards with one or several captions per image."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from rankclip_ds.data.transforms import build_image_transform

from .datasets import AUTO_CAPTIONS, open_eval_data
from .features import dist_rank_world, encode_texts, extract_image_features, same_on_every_rank
from .metrics import retrieval_metrics

__all__ = ["retrieval_eval"]

log = logging.getLogger(__name__)


def retrieval_eval(
    model: nn.Module,
    tokenizer,
    *,
    data: str | list[str],
    image_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    captions: str = AUTO_CAPTIONS,
    batch_size: int = 64,
    text_batch_size: int = 256,
    max_length: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = True,
) -> dict:
    """Image→text and text→image Recall@k of ``model`` on retrieval shards.

    Args:
        data: shards (brace expression or a directory of ``*.tar``) with an image and its captions per sample.
        captions: where the captions are: ``"auto"`` (the ``.json`` member's ``"captions"`` list when it has one,
            else the ``.txt`` member), ``"txt"``, or ``"json:FIELD"`` (a string or a list of strings).
        Other arguments as in :func:`~rankclip_ds.evaluate.zeroshot_eval`.

    Every image and every caption is a query. An image query is correct at k when any of its captions is among the
    k best-scored captions; a caption query when its image is among the k best-scored images. Equal scores are
    ordered by index (see :mod:`.metrics`).

    Returns:
        A JSON-ready dict: ``image_to_text_R@{k}`` and ``text_to_image_R@{k}`` for each k (fractions in [0, 1]),
        ``mean_recall``, ``num_images``, ``num_captions``, ``captions_per_image`` (min/max/mean), ``skipped``,
        ``task`` (``"retrieval"``) and ``data``. Identical on every rank under ``torch.distributed``.
    """
    transform = build_image_transform(
        image_size, mean=mean, std=std, train=False, interpolation=interpolation, crop_pct=crop_pct
    )
    rank, world = dist_rank_world()
    opened = open_eval_data(
        data,
        image_transform=transform,
        batch_size=batch_size,
        num_workers=num_workers,
        labels=False,
        captions=captions,
        rank=rank,
        world_size=world,
    )
    images = extract_image_features(model, opened, device=device, normalize=True, progress=progress)
    if images.features.shape[0] == 0:
        raise ValueError(f"no usable sample in {data!r} (skipped: {images.skipped}); check the data and --captions")
    texts = [c for caps in images.captions for c in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(images.captions) for _ in caps], dtype=torch.long)
    text_emb = encode_texts(
        model,
        tokenizer,
        texts,
        batch_size=text_batch_size,
        max_length=max_length,
        device=device,
        normalize=True,
        progress=progress,
        desc="captions",
    )  # (M, D)
    result = {"task": "retrieval", "data": data if isinstance(data, str) else "::".join(data)}
    result.update(retrieval_metrics(images.features, text_emb, text_to_image, ks=ks))
    counts = [len(c) for c in images.captions]
    result["captions_per_image"] = {"min": min(counts), "max": max(counts), "mean": sum(counts) / len(counts)}
    result["skipped"] = images.skipped
    if images.skipped:
        log.warning("retrieval on %s: skipped input %s", result["data"], images.skipped)
    return same_on_every_rank(result, device)
