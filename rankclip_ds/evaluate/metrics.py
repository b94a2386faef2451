"""Ranking arithmetic shared by zero-shot classification and retrieval: ranks, top-k accuracy, Recall@k.

**Tie rule.** Candidates are ordered by score, highest first; candidates with *equal* scores are ordered by their
index, lowest first. This is the order of a stable descending sort (``torch.sort(scores, descending=True,
stable=True)``), so the rank of candidate ``j`` in a row ``s`` is::

    rank(j) = #{i : s_i > s_j} + #{i < j : s_i == s_j}        (0 = first place)

It depends only on the scores and the candidate order, never on the sorting kernel, the device, the batch size or
the number of ranks: the same embeddings always give the same numbers. Ties are rare with float32 scores but occur
with duplicate images or captions and with quantised (e.g. fp16) embeddings.

**Several positives.** A query with several correct candidates (an image with several captions) is counted at the
rank of its best-placed positive: it is correct at ``k`` when any positive is among the first ``k`` candidates.

Scores are computed in blocks of queries (``block_size`` rows at a time), so no (queries × candidates) matrix larger
than ``block_size × candidates`` is ever held.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "TIE_RULE",
    "best_positive_rank",
    "classification_metrics",
    "rank_of_target",
    "recall_at_k",
    "retrieval_metrics",
]

TIE_RULE = "equal scores are ordered by candidate index, lowest first (a stable descending sort)"
DEFAULT_BLOCK = 1024


def best_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """The rank (0-based, see the module's tie rule) of the best-placed positive of each row.

    Args:
        scores: (Q, K) float, one row of candidate scores per query.
        positives: (Q, K) bool, True where the candidate is a correct answer; every row needs at least one.

    Returns:
        (Q,) long.
    """
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must be equal (Q, K)")
    if not bool(positives.any(dim=1).all()):
        bad = int((~positives.any(dim=1)).nonzero()[0, 0])
        raise ValueError(f"query {bad} has no positive candidate; every query needs at least one correct answer")
    _check_finite(scores)
    num_candidates = scores.shape[1]
    neg_inf = torch.finfo(scores.dtype).min
    best = scores.masked_fill(~positives, neg_inf).max(dim=1, keepdim=True).values  # (Q, 1) best positive score
    column = torch.arange(num_candidates, device=scores.device).expand_as(scores)  # (Q, K)
    # the lowest-index positive that reaches the best score is the best-placed positive under the tie rule
    first = torch.where(positives & (scores == best), column, num_candidates).min(dim=1, keepdim=True).values
    above = (scores > best).sum(dim=1)  # (Q,) strictly better candidates
    tied_before = ((scores == best) & (column < first)).sum(dim=1)  # (Q,) equal candidates with a lower index
    return above + tied_before


def rank_of_target(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank (0-based, module tie rule) of candidate ``targets[q]`` in row ``q`` of ``scores`` (Q, K) → (Q,) long."""
    if targets.dim() != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} must be (Q,) for scores {tuple(scores.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= scores.shape[1]):
        raise ValueError(
            f"targets must lie in [0, {scores.shape[1]}), got min {int(targets.min())} max {int(targets.max())}"
        )
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(scores.shape[0], device=scores.device), targets.to(scores.device)] = True
    return best_positive_rank(scores, positives)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose rank is below ``k``, for each ``k`` (a rank-0 query is correct at every k ≥ 1)."""
    if ranks.numel() == 0:
        raise ValueError("no queries to score: the evaluation set is empty (check the data path and the skip counts)")
    return {int(k): float((ranks < k).double().mean()) for k in ks}


def classification_metrics(
    image_emb: torch.Tensor,
    classifier: torch.Tensor,
    labels: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5),
    classnames: Sequence[str] | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> dict:
    """Top-k and per-class accuracy of ``argmax(image_emb @ classifier.T)`` (ties: module rule).

    Args:
        image_emb: (N, D) image embeddings (normalise them first for cosine scores; the ranking is what counts).
        classifier: (C, D) one weight row per class.
        labels: (N,) long in [0, C).
        ks: the k of top-k; a k ≥ C is trivially 1.0.
        classnames: C names for the per-class records (default: the class index as a string).

    Returns:
        ``{"top{k}": fraction for each k, "mean_per_class": mean over classes with samples of their top-1 recall,
        "num_samples": N, "num_classes": C, "per_class": [{"index", "name", "count", "top{k}"...}]}``.
        Accuracies are fractions in [0, 1]. A class without samples has ``count`` 0 and ``None`` accuracies and is
        left out of ``mean_per_class``.
    """
    num_classes = classifier.shape[0]
    if classnames is not None and len(classnames) != num_classes:
        raise ValueError(f"{len(classnames)} class names for a classifier of {num_classes} classes")
    if image_emb.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} embeddings but {labels.shape[0]} labels")
    if image_emb.shape[0] == 0:
        raise ValueError("no samples to score: the evaluation set is empty (check the data path and the skip counts)")
    labels = labels.to(image_emb.device)
    ranks = torch.cat(
        [
            rank_of_target(image_emb[i : i + block_size] @ classifier.T, labels[i : i + block_size])  # (b, C) scores
            for i in range(0, image_emb.shape[0], block_size)
        ]
    ).cpu()
    labels = labels.cpu()
    result: dict = {f"top{k}": v for k, v in recall_at_k(ranks, ks).items()}
    counts = torch.bincount(labels, minlength=num_classes)  # (C,)
    per_class = []
    for c in range(num_classes):
        entry: dict = {"index": c, "name": classnames[c] if classnames else str(c), "count": int(counts[c])}
        mask = labels == c
        for k in ks:
            entry[f"top{k}"] = float((ranks[mask] < k).double().mean()) if counts[c] else None
        per_class.append(entry)
    present = [e[f"top{ks[0]}"] for e in per_class if e["count"]]
    result["mean_per_class"] = sum(present) / len(present)
    result["num_samples"] = int(labels.shape[0])
    result["num_classes"] = int(num_classes)
    result["per_class"] = per_class
    return result


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = DEFAULT_BLOCK,
) -> dict:
    """Image→text and text→image Recall@k with several captions per image.

    Args:
        image_emb: (N, D) one row per image.
        text_emb: (M, D) one row per caption.
        text_to_image: (M,) long, the image each caption belongs to; every image needs at least one caption.

    An image query is correct at k when any of its captions is among the first k captions; a caption query when its
    image is among the first k images. Every query is scored (no subsampling).

    Returns:
        ``{"image_to_text_R@k", "text_to_image_R@k" for each k, "mean_recall", "num_images", "num_captions"}``,
        recalls as fractions in [0, 1]; ``mean_recall`` is the mean of all the recalls.
    """
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image {tuple(text_to_image.shape)} must be ({num_texts},), one image per caption")
    owner = text_to_image.to(image_emb.device)
    if num_texts and (int(owner.min()) < 0 or int(owner.max()) >= num_images):
        raise ValueError(f"text_to_image must index the {num_images} images, got range [{owner.min()}, {owner.max()}]")
    captions_per_image = torch.bincount(owner, minlength=num_images)
    if num_images and int(captions_per_image.min()) == 0:
        missing = int((captions_per_image == 0).nonzero()[0, 0])
        raise ValueError(f"image {missing} has no caption; every image needs at least one for image→text retrieval")
    image_ranks = []
    for i in range(0, num_images, block_size):
        scores = image_emb[i : i + block_size] @ text_emb.T  # (b, M)
        rows = torch.arange(i, min(i + block_size, num_images), device=owner.device)
        image_ranks.append(best_positive_rank(scores, owner.unsqueeze(0) == rows.unsqueeze(1)))
    text_ranks = [
        rank_of_target(text_emb[i : i + block_size] @ image_emb.T, owner[i : i + block_size])  # (b, N) scores
        for i in range(0, num_texts, block_size)
    ]
    if not image_ranks or not text_ranks:
        raise ValueError(f"retrieval needs images and captions, got {num_images} images and {num_texts} captions")
    i2t = recall_at_k(torch.cat(image_ranks), ks)
    t2i = recall_at_k(torch.cat(text_ranks), ks)
    result: dict = {f"image_to_text_R@{k}": v for k, v in i2t.items()}
    result.update({f"text_to_image_R@{k}": v for k, v in t2i.items()})
    result["mean_recall"] = (sum(i2t.values()) + sum(t2i.values())) / (2 * len(ks))
    result["num_images"] = int(num_images)
    result["num_captions"] = int(num_texts)
    return result


def _check_finite(scores: torch.Tensor) -> None:
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).any(dim=1).sum())
        raise ValueError(
            f"{bad} query rows have non-finite (NaN/inf) scores: the model produced non-finite embeddings. "
            "Evaluate an earlier checkpoint, or check the run for a diverged loss"
        )
