"""Zero-shot classification: a text classifier built from prompt templates, scored against image embeddings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rankclip_ds.data.transforms import build_image_transform

from .datasets import CLASSNAMES_FILE, open_eval_data
from .features import dist_rank_world, encode_texts, extract_image_features, same_on_every_rank
from .metrics import classification_metrics
from .templates import fill_template, resolve_templates

__all__ = ["build_zeroshot_classifier", "zeroshot_classifier_from_embeddings", "zeroshot_eval"]

log = logging.getLogger(__name__)


def build_zeroshot_classifier(
    model: nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    max_length: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """One unit-norm weight row per class → (C, D) float32 on the CPU.

    Each class's prompts (every template filled with the class name) are embedded, then combined by
    :func:`zeroshot_classifier_from_embeddings` (CLIP's prompt ensembling).
    """
    if not classnames:
        raise ValueError("no class names: zero-shot classification needs one name per class")
    if not templates:
        raise ValueError("no templates: give at least one, e.g. 'a photo of a {}.'")
    prompts = [fill_template(t, name) for name in classnames for t in templates]  # class-major: C × T prompts
    emb = encode_texts(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        normalize=False,
        progress=progress,
        desc="class prompts",
    )  # (C·T, D)
    return zeroshot_classifier_from_embeddings(emb, len(classnames))


def zeroshot_classifier_from_embeddings(prompt_emb: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The zero-shot classifier from prompt embeddings: (C·T, D) class-major (the T prompts of class 0, then of
    class 1, ...) → (C, D), one unit-norm row per class, on the device and in the dtype of ``prompt_emb``.

    Each prompt embedding is L2-normalised, the T of a class are averaged, and the mean is L2-normalised again.
    """
    if num_classes < 1 or prompt_emb.dim() != 2 or prompt_emb.shape[0] % num_classes:
        raise ValueError(
            f"prompt embeddings {tuple(prompt_emb.shape)} must be (C·T, D) for C={num_classes} classes: "
            "the same number of templates for every class, class-major"
        )
    per_prompt = F.normalize(prompt_emb, dim=-1)  # (C·T, D)
    per_class = per_prompt.view(num_classes, prompt_emb.shape[0] // num_classes, -1).mean(dim=1)  # (C, D)
    return F.normalize(per_class, dim=-1)


def zeroshot_eval(
    model: nn.Module,
    tokenizer,
    *,
    data: str | list[str],
    classnames: str | Path | Sequence[str] | None = None,
    templates: str | Sequence[str] = "a photo of {}.",
    image_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
    max_length: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
    ks: Sequence[int] = (1, 5),
    text_batch_size: int = 256,
    label_key: str = "cls",
    progress: bool = True,
) -> dict:
    """Zero-shot classification accuracy of ``model`` on labelled shards or an ImageFolder directory.

    Args:
        model: a :class:`~rankclip_ds.model.DualEncoder` (or a DeepSpeed engine / DDP wrapper around one).
        tokenizer: its Hugging Face tokenizer.
        data: labelled shards (brace expression with a ``.cls`` integer label per sample, or a directory of
            ``*.tar``) or an ImageFolder directory (one sub-folder per class).
        classnames: a file (one name per line, line i = label i), a list, or None for ``classnames.txt`` beside
            the data (an ImageFolder falls back to its folder names).
        templates: ``"openai"`` (the 80 ImageNet prompts), one template with ``{}``, a templates file, or a list.
        image_size, mean, std, interpolation, crop_pct: the eval transform (resize the short side to
            ``image_size / crop_pct``, centre crop); take them from ``model.image_tower.data_config()``.
        batch_size: images per forward pass, per rank; ``text_batch_size``: prompts per forward pass.
        max_length: prompt length in tokens (use the training ``model.text.max_length``).
        ks: the k of the top-k accuracies reported.
        num_workers: DataLoader workers per rank.

    Under ``torch.distributed`` every rank must call this with the same arguments; each embeds a slice of the images
    and of the prompts, and every rank returns the same result.

    Returns:
        A JSON-ready dict: ``top1``, ``top5`` (fractions in [0, 1]; a k ≥ the number of classes gives 1.0),
        ``mean_per_class`` (mean over classes that have samples of their top-1 recall), ``num_samples``,
        ``num_classes``, ``num_templates``, ``per_class`` (one ``{"index", "name", "count", "top1", "top5"}`` per
        class; ``None`` accuracies for a class without samples), ``skipped`` (input samples dropped, by reason),
        ``task`` (``"zeroshot"``) and ``data``.
    """
    transform = build_image_transform(
        image_size, mean=mean, std=std, train=False, interpolation=interpolation, crop_pct=crop_pct
    )
    prompts = resolve_templates(templates)
    rank, world = dist_rank_world()
    opened = open_eval_data(
        data,
        image_transform=transform,
        batch_size=batch_size,
        num_workers=num_workers,
        classnames=classnames,
        labels=True,
        label_key=label_key,
        rank=rank,
        world_size=world,
    )
    if opened.classnames is None:
        raise ValueError(
            f"zero-shot on {data!r} needs class names: none were given and there is no {CLASSNAMES_FILE} beside the "
            "shards. Fix: pass classnames=FILE (one name per line, line i = label i)"
        )
    classifier = build_zeroshot_classifier(
        model,
        tokenizer,
        opened.classnames,
        prompts,
        batch_size=text_batch_size,
        max_length=max_length,
        device=device,
        progress=progress,
    )  # (C, D)
    images = extract_image_features(model, opened, device=device, normalize=True, progress=progress)
    if images.features.shape[0] == 0:
        raise ValueError(f"no usable sample in {data!r} (skipped: {images.skipped}); check the data and its labels")
    result = {"task": "zeroshot", "data": data if isinstance(data, str) else "::".join(data)}
    result.update(
        classification_metrics(images.features, classifier, images.labels, ks=ks, classnames=opened.classnames)
    )
    result["num_templates"] = len(prompts)
    result["skipped"] = images.skipped
    if images.skipped:
        log.warning("zero-shot on %s: skipped input %s", result["data"], images.skipped)
    return same_on_every_rank(result, device)
