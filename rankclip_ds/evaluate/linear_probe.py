"""Linear probe: multinomial logistic regression on frozen image features, weight decay chosen on a validation split.

Procedure (deterministic for a given ``seed``):

1. Embed the train and test images with the frozen model (:func:`.features.extract_image_features`).
2. Hold out ``val_fraction`` of the train samples (a seeded random permutation) as the validation split.
3. For each weight decay ``λ`` of the sweep, fit on the rest and score top-1 on the validation split. The best
   ``λ`` wins; on equal validation accuracy the one listed first wins.
4. Refit on all train samples with that ``λ`` and report top-1 (and mean per-class accuracy) on the test split.

The model: features standardised with the fitting set's per-dimension mean and standard deviation, then
``logits = x W^T + b``, loss ``mean cross-entropy + λ ||W||²`` (the bias is not penalised), minimised full-batch by
L-BFGS with a strong-Wolfe line search from zero weights (the problem is convex, so the start does not matter).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rankclip_ds.data.transforms import build_image_transform

from .datasets import open_eval_data
from .features import dist_rank_world, extract_image_features, same_on_every_rank
from .metrics import classification_metrics

__all__ = ["DEFAULT_WEIGHT_DECAYS", "fit_logistic_regression", "linear_probe_eval", "linear_probe_from_features"]

log = logging.getLogger(__name__)

DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=0)  # (D,)
    std = x.std(dim=0, unbiased=False).clamp(min=1e-6)  # (D,)  constant dimensions stay finite
    return mean, std


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 200,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``softmax(z W^T + b)`` with ``z = (x - mean) / std`` (statistics of ``x``); see the module doc.

    Args:
        x: (N, D) features; y: (N,) long labels in [0, num_classes).

    Returns:
        ``(W (C, D), b (C,))`` acting on the *raw* features (the standardisation folded in): ``logits = x W^T + b``,
        float32 on the CPU.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need as many labels as features (got {x.shape[0]} features, {y.shape[0]} labels), > 0")
    device = torch.device(device)
    x = x.to(device=device, dtype=torch.float32)
    y = y.to(device)
    mean, std = _standardise(x)
    z = (x - mean) / std  # (N, D)
    weight = torch.zeros(num_classes, x.shape[1], device=device, requires_grad=True)  # (C, D)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)  # (C,)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = (weight.detach() / std).cpu()  # (C, D): x W'^T = z W^T + mean/std W^T
    b = (bias.detach() - (weight.detach() * (mean / std)).sum(dim=1)).cpu()  # (C,)
    return w, b


def linear_probe_from_features(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
    device: str | torch.device = "cpu",
    classnames: Sequence[str] | None = None,
) -> dict:
    """Steps 2–4 of the module doc on precomputed features. Returns ``top1`` (test, fraction in [0, 1]),
    ``mean_per_class``, ``per_class``, ``best_weight_decay``, ``sweep`` (``[{"weight_decay", "val_top1"}]``),
    ``num_train``, ``num_val``, ``num_test``, ``num_classes``."""
    if not weight_decays:
        raise ValueError("weight_decays is empty; give at least one value, e.g. (1e-4,)")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    n = train_x.shape[0]
    num_val = min(max(1, round(n * val_fraction)), n - 1)
    if num_val < 1:
        raise ValueError(f"{n} train samples: need at least 2 to hold out a validation split")
    train_y = train_y.to(train_x.device)
    # the split is drawn on the host by a seeded CPU generator (the same split on every device), then moved to the
    # features' device to index them
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    val_idx, fit_idx = perm[:num_val], perm[num_val:]
    sweep = []
    for wd in weight_decays:
        w, b = fit_logistic_regression(
            train_x[fit_idx],
            train_y[fit_idx],
            num_classes=num_classes,
            weight_decay=wd,
            max_iter=max_iter,
            device=device,
        )
        w, b = w.to(train_x.device), b.to(train_x.device)  # fitted on `device`, returned on the CPU
        val_pred = (train_x[val_idx].float() @ w.T + b).argmax(dim=1)  # (V,)  argmax: first index on ties
        sweep.append({"weight_decay": float(wd), "val_top1": float((val_pred == train_y[val_idx]).double().mean())})
    best = max(range(len(sweep)), key=lambda i: (sweep[i]["val_top1"], -i))  # first listed wins a tie
    best_wd = sweep[best]["weight_decay"]
    w, b = fit_logistic_regression(
        train_x, train_y, num_classes=num_classes, weight_decay=best_wd, max_iter=max_iter, device=device
    )
    # logits = [x, 1] @ [W, b]^T: the metrics' rank rule then applies unchanged (scored on the test features' device)
    ones = test_x.new_ones(test_x.shape[0], 1, dtype=torch.float32)  # (N, 1)
    metrics = classification_metrics(
        torch.cat([test_x.float(), ones], dim=1), torch.cat([w, b[:, None]], dim=1).to(test_x.device), test_y, ks=(1,),
        classnames=classnames,
    )  # fmt: skip
    return {
        "top1": metrics["top1"],
        "mean_per_class": metrics["mean_per_class"],
        "best_weight_decay": best_wd,
        "sweep": sweep,
        "num_train": int(n - num_val),
        "num_val": int(num_val),
        "num_test": int(test_x.shape[0]),
        "num_classes": int(num_classes),
        "per_class": metrics["per_class"],
    }


def linear_probe_eval(
    model: nn.Module,
    *,
    train_data: str | list[str],
    test_data: str | list[str],
    image_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    classnames: str | Path | Sequence[str] | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
    feature: str = "embedding",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
    label_key: str = "cls",
    progress: bool = True,
) -> dict:
    """Linear-probe top-1 of ``model``'s frozen image features (see the module doc for the procedure).

    Args:
        train_data, test_data: labelled shards or ImageFolder directories, as for
            :func:`~rankclip_ds.evaluate.zeroshot_eval`.
        classnames: names for the per-class records (default: ``classnames.txt`` beside ``train_data`` when there is
            one, else the class indices); the number of classes is the number of names, or the largest label + 1.
        feature: ``"embedding"`` (the L2-normalised projected embedding, what the contrastive loss sees) or
            ``"tower"`` (the image tower's pooled features before the projection).
        weight_decays, val_fraction, seed, max_iter: the sweep, the held-out share of ``train_data``, the split's
            seed and the L-BFGS iterations per fit.

    Returns:
        A JSON-ready dict: ``top1`` (test top-1 as a fraction in [0, 1]), ``mean_per_class``, ``per_class``,
        ``best_weight_decay``, ``sweep``, ``num_train``, ``num_val``, ``num_test``, ``num_classes``, ``feature``,
        ``skipped`` and ``task`` (``"linear_probe"``). Identical on every rank under ``torch.distributed``.
    """
    transform = build_image_transform(
        image_size, mean=mean, std=std, train=False, interpolation=interpolation, crop_pct=crop_pct
    )
    rank, world = dist_rank_world()
    feats = {}
    names = None
    for split, spec in (("train", train_data), ("test", test_data)):
        opened = open_eval_data(
            spec,
            image_transform=transform,
            batch_size=batch_size,
            num_workers=num_workers,
            classnames=classnames,
            labels=True,
            label_key=label_key,
            rank=rank,
            world_size=world,
        )
        names = names or opened.classnames
        feats[split] = extract_image_features(
            model, opened, device=device, normalize=feature == "embedding", feature=feature, progress=progress,
            desc=f"{split} images",
        )  # fmt: skip
        if feats[split].features.shape[0] == 0:
            raise ValueError(f"no usable sample in {split} data {spec!r} (skipped: {feats[split].skipped})")
    train, test = feats["train"], feats["test"]
    num_classes = len(names) if names else int(max(train.labels.max(), test.labels.max())) + 1
    result = {"task": "linear_probe", "train_data": str(train_data), "test_data": str(test_data), "feature": feature}
    result.update(
        linear_probe_from_features(
            train.features,
            train.labels,
            test.features,
            test.labels,
            num_classes=num_classes,
            weight_decays=weight_decays,
            val_fraction=val_fraction,
            seed=seed,
            max_iter=max_iter,
            device=device,
            classnames=names,
        )
    )
    skipped: dict[str, int] = {}
    for part in (train.skipped, test.skipped):
        for reason, n in (part or {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
    result["skipped"] = skipped
    return same_on_every_rank(result, device)
