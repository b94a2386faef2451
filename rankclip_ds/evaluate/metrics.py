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

**Tensors, then numbers.** The scoring itself (:func:`classification_counts`, :func:`retrieval_ranks`,
:func:`hits_at_k`, :func:`best_positive_rank`, :func:`rank_of_target`) returns tensors on the embeddings' device and
never reads a value back to the host, so it runs on a GPU without a stall and traces under fake tensors and
``torch.compile``. :func:`classification_metrics`, :func:`retrieval_metrics` and :func:`recall_at_k` turn those
tensors into JSON-ready numbers with one device-to-host read, and check the input (labels in range, a caption per
image, finite scores) on the values of that same read. The checks of :func:`best_positive_rank` and
:func:`rank_of_target` read their inputs back and are skipped while tracing (fake tensors, ``torch.compile``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import is_fake

__all__ = [
    "TIE_RULE",
    "ClassificationCounts",
    "RetrievalRanks",
    "best_positive_rank",
    "classification_counts",
    "classification_metrics",
    "hits_at_k",
    "rank_of_target",
    "recall_at_k",
    "retrieval_metrics",
    "retrieval_ranks",
]

TIE_RULE = "equal scores are ordered by candidate index, lowest first (a stable descending sort)"
DEFAULT_BLOCK = 1024


class ClassificationCounts(NamedTuple):
    """Per-class tallies of a classification, on the embeddings' device (see :func:`classification_counts`)."""

    count: torch.Tensor
    """(C,) long: samples per class."""
    hits: torch.Tensor
    """(len(ks), C) long: samples of each class whose class ranks below ``ks[j]``."""
    bad_labels: torch.Tensor
    """() long: samples whose label lies outside [0, C) (counted nowhere else)."""
    nonfinite: torch.Tensor
    """() long: samples with a non-finite (NaN/inf) score."""


class RetrievalRanks(NamedTuple):
    """Ranks of both retrieval directions, on the embeddings' device (see :func:`retrieval_ranks`)."""

    image_to_text: torch.Tensor
    """(N,) long: rank of each image's best-placed caption among all captions."""
    text_to_image: torch.Tensor
    """(M,) long: rank of each caption's image among all images."""
    uncaptioned: torch.Tensor
    """() long: images without a caption (their rank means nothing)."""
    bad_owners: torch.Tensor
    """() long: captions whose image index lies outside [0, N) (their rank means nothing)."""
    nonfinite: torch.Tensor
    """() long: query rows, of both directions, with a non-finite (NaN/inf) score."""


def best_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """The rank (0-based, see the module's tie rule) of the best-placed positive of each row.

    Args:
        scores: (Q, K) float, one row of candidate scores per query.
        positives: (Q, K) bool, True where the candidate is a correct answer; every row needs at least one.

    Returns:
        (Q,) long, on the device of ``scores``. The input checks (a positive per row, finite scores) read values back
        to the host; they are skipped while tracing (fake tensors, ``torch.compile``).
    """
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must be equal (Q, K)")
    if _values_readable(scores, positives) and not bool(positives.any(dim=1).all() & torch.isfinite(scores).all()):
        if not bool(positives.any(dim=1).all()):
            bad = int((~positives.any(dim=1)).nonzero()[0, 0])
            raise ValueError(f"query {bad} has no positive candidate; every query needs at least one correct answer")
        raise ValueError(_nonfinite_message(int(_nonfinite_rows(scores))))
    return _best_positive_rank(scores, positives)


def rank_of_target(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank (0-based, module tie rule) of candidate ``targets[q]`` in row ``q`` of ``scores`` (Q, K) → (Q,) long,
    on the device of ``scores``. The input checks are skipped while tracing, as in :func:`best_positive_rank`."""
    if targets.dim() != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} must be (Q,) for scores {tuple(scores.shape)}")
    if targets.numel() and _values_readable(scores, targets):
        lo, hi = torch.stack([targets.min(), targets.max()]).tolist()  # one read
        if lo < 0 or hi >= scores.shape[1]:
            raise ValueError(f"targets must lie in [0, {scores.shape[1]}), got min {lo} max {hi}")
    return best_positive_rank(scores, _target_mask(targets, scores.shape[1], scores.device))


def hits_at_k(ranks: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """How many ``ranks`` lie below each ``k`` → (len(ks),) long on the device of ``ranks`` (no host read)."""
    if not ks:
        return ranks.new_zeros(0, dtype=torch.long)
    return torch.stack([(ranks < k).sum() for k in ks])


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose rank is below ``k``, for each ``k`` (a rank-0 query is correct at every k ≥ 1)."""
    if ranks.numel() == 0:
        raise ValueError("no queries to score: the evaluation set is empty (check the data path and the skip counts)")
    hits = hits_at_k(ranks, ks).tolist()  # one read
    return {int(k): h / ranks.numel() for k, h in zip(ks, hits, strict=True)}


def classification_counts(
    image_emb: torch.Tensor,
    classifier: torch.Tensor,
    labels: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5),
    block_size: int = DEFAULT_BLOCK,
) -> ClassificationCounts:
    """The scoring of :func:`classification_metrics` as tensors on ``image_emb``'s device, without a host read.

    Scores are ``image_emb @ classifier.T`` (ties: module rule). A sample is a hit at ``k`` when its label's rank is
    below ``k``. Labels outside [0, C) and non-finite scores are counted, not raised (raising needs a host read);
    :func:`classification_metrics` checks the counts.

    Args:
        image_emb: (N, D); classifier: (C, D), on the same device; labels: (N,) long (moved to ``image_emb``'s device).
    """
    if image_emb.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} embeddings but {labels.shape[0]} labels")
    if not ks:
        raise ValueError("ks is empty; give at least one k, e.g. (1, 5)")
    device, num_classes = image_emb.device, classifier.shape[0]
    labels = labels.to(device)
    classes = torch.arange(num_classes, device=device)  # (C,)
    count = torch.zeros(num_classes, dtype=torch.long, device=device)
    hits = torch.zeros(len(ks), num_classes, dtype=torch.long, device=device)
    bad_labels = torch.zeros((), dtype=torch.long, device=device)
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, image_emb.shape[0], block_size):
        scores = image_emb[i : i + block_size] @ classifier.T  # (b, C)
        truth = labels[i : i + block_size].unsqueeze(1) == classes  # (b, C) one-hot; all False for a bad label
        ranks = _best_positive_rank(scores, truth)  # (b,)
        count += truth.sum(dim=0)
        hits += torch.stack([(truth & (ranks < k).unsqueeze(1)).sum(dim=0) for k in ks])  # (len(ks), C)
        bad_labels += (~truth.any(dim=1)).sum()
        nonfinite += _nonfinite_rows(scores)
    return ClassificationCounts(count, hits, bad_labels, nonfinite)


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
        classifier: (C, D) one weight row per class, on the device of ``image_emb``.
        labels: (N,) long in [0, C).
        ks: the k of top-k; a k ≥ C is trivially 1.0.
        classnames: C names for the per-class records (default: the class index as a string).

    Returns:
        ``{"top{k}": fraction for each k, "mean_per_class": mean over classes with samples of their top-1 recall,
        "num_samples": N, "num_classes": C, "per_class": [{"index", "name", "count", "top{k}"...}]}``.
        Accuracies are fractions in [0, 1]. A class without samples has ``count`` 0 and ``None`` accuracies and is
        left out of ``mean_per_class``. The scoring runs on ``image_emb``'s device (:func:`classification_counts`);
        its counts come back to the host in one read.
    """
    num_classes = classifier.shape[0]
    if classnames is not None and len(classnames) != num_classes:
        raise ValueError(f"{len(classnames)} class names for a classifier of {num_classes} classes")
    if image_emb.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} embeddings but {labels.shape[0]} labels")
    if image_emb.shape[0] == 0:
        raise ValueError("no samples to score: the evaluation set is empty (check the data path and the skip counts)")
    tally = classification_counts(image_emb, classifier, labels, ks=ks, block_size=block_size)
    host = torch.cat([tally.count, tally.hits.flatten(), tally.bad_labels.view(1), tally.nonfinite.view(1)]).tolist()
    counts, hits = host[:num_classes], host[num_classes : num_classes * (len(ks) + 1)]
    bad_labels, nonfinite = host[-2:]
    if bad_labels:
        lo, hi = torch.stack([labels.min(), labels.max()]).tolist()
        raise ValueError(f"labels must lie in [0, {num_classes}) (one class per classifier row), got min {lo} max {hi}")
    if nonfinite:
        raise ValueError(_nonfinite_message(nonfinite))
    num_samples = int(image_emb.shape[0])
    hits_per_k = {k: hits[j * num_classes : (j + 1) * num_classes] for j, k in enumerate(ks)}  # k -> C hits
    result: dict = {f"top{k}": sum(h) / num_samples for k, h in hits_per_k.items()}
    per_class = []
    for c in range(num_classes):
        entry: dict = {"index": c, "name": classnames[c] if classnames else str(c), "count": counts[c]}
        for k, h in hits_per_k.items():
            entry[f"top{k}"] = h[c] / counts[c] if counts[c] else None
        per_class.append(entry)
    present = [e[f"top{ks[0]}"] for e in per_class if e["count"]]
    result["mean_per_class"] = sum(present) / len(present)
    result["num_samples"] = num_samples
    result["num_classes"] = int(num_classes)
    result["per_class"] = per_class
    return result


def retrieval_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK,
) -> RetrievalRanks:
    """The scoring of :func:`retrieval_metrics` as tensors on ``image_emb``'s device, without a host read.

    Args:
        image_emb: (N, D); text_emb: (M, D), on the same device; text_to_image: (M,) long, the image each caption
            belongs to (moved to ``image_emb``'s device).

    Images without a caption, captions pointing outside [0, N) and non-finite scores are counted, not raised;
    :func:`retrieval_metrics` checks the counts.
    """
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image {tuple(text_to_image.shape)} must be ({num_texts},), one image per caption")
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"retrieval needs images and captions, got {num_images} images and {num_texts} captions")
    device = image_emb.device
    owner = text_to_image.to(device)  # (M,)
    images = torch.arange(num_images, device=device)  # (N,)
    uncaptioned = torch.zeros((), dtype=torch.long, device=device)
    bad_owners = torch.zeros((), dtype=torch.long, device=device)
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    image_ranks, text_ranks = [], []
    for i in range(0, num_images, block_size):
        scores = image_emb[i : i + block_size] @ text_emb.T  # (b, M)
        own = owner.unsqueeze(0) == images[i : i + block_size].unsqueeze(1)  # (b, M) each image's captions
        image_ranks.append(_best_positive_rank(scores, own))
        uncaptioned += (~own.any(dim=1)).sum()
        nonfinite += _nonfinite_rows(scores)
    for i in range(0, num_texts, block_size):
        scores = text_emb[i : i + block_size] @ image_emb.T  # (b, N)
        own = _target_mask(owner[i : i + block_size], num_images, device)  # (b, N) each caption's image
        text_ranks.append(_best_positive_rank(scores, own))
        bad_owners += (~own.any(dim=1)).sum()
        nonfinite += _nonfinite_rows(scores)
    return RetrievalRanks(torch.cat(image_ranks), torch.cat(text_ranks), uncaptioned, bad_owners, nonfinite)


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
        text_emb: (M, D) one row per caption, on the device of ``image_emb``.
        text_to_image: (M,) long, the image each caption belongs to; every image needs at least one caption.

    An image query is correct at k when any of its captions is among the first k captions; a caption query when its
    image is among the first k images. Every query is scored (no subsampling), on ``image_emb``'s device
    (:func:`retrieval_ranks`); the counts come back to the host in one read.

    Returns:
        ``{"image_to_text_R@k", "text_to_image_R@k" for each k, "mean_recall", "num_images", "num_captions"}``,
        recalls as fractions in [0, 1]; ``mean_recall`` is the mean of all the recalls.
    """
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    ranks = retrieval_ranks(image_emb, text_emb, text_to_image, block_size=block_size)
    problems = torch.stack([ranks.bad_owners, ranks.uncaptioned, ranks.nonfinite])
    host = torch.cat([problems, hits_at_k(ranks.image_to_text, ks), hits_at_k(ranks.text_to_image, ks)]).tolist()
    bad_owners, uncaptioned, nonfinite = host[:3]
    if bad_owners:
        lo, hi = torch.stack([text_to_image.min(), text_to_image.max()]).tolist()
        raise ValueError(f"text_to_image must index the {num_images} images, got range [{lo}, {hi}]")
    if uncaptioned:
        captions_per_image = torch.bincount(text_to_image.cpu(), minlength=num_images)
        missing = int((captions_per_image == 0).nonzero()[0, 0])
        raise ValueError(f"image {missing} has no caption; every image needs at least one for image→text retrieval")
    if nonfinite:
        raise ValueError(_nonfinite_message(nonfinite))
    i2t = {int(k): h / num_images for k, h in zip(ks, host[3 : 3 + len(ks)], strict=True)}
    t2i = {int(k): h / num_texts for k, h in zip(ks, host[3 + len(ks) :], strict=True)}
    result: dict = {f"image_to_text_R@{k}": v for k, v in i2t.items()}
    result.update({f"text_to_image_R@{k}": v for k, v in t2i.items()})
    result["mean_recall"] = (sum(i2t.values()) + sum(t2i.values())) / (2 * len(ks))
    result["num_images"] = int(num_images)
    result["num_captions"] = int(num_texts)
    return result


def _best_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """:func:`best_positive_rank` without its checks: (Q, K) scores and positives → (Q,) long. A row without a
    positive gets a meaningless rank (callers count such rows)."""
    num_candidates = scores.shape[1]
    neg_inf = torch.finfo(scores.dtype).min
    best = scores.masked_fill(~positives, neg_inf).max(dim=1, keepdim=True).values  # (Q, 1) best positive score
    column = torch.arange(num_candidates, device=scores.device).expand_as(scores)  # (Q, K)
    # the lowest-index positive that reaches the best score is the best-placed positive under the tie rule
    first = torch.where(positives & (scores == best), column, num_candidates).min(dim=1, keepdim=True).values
    above = (scores > best).sum(dim=1)  # (Q,) strictly better candidates
    tied_before = ((scores == best) & (column < first)).sum(dim=1)  # (Q,) equal candidates with a lower index
    return above + tied_before


def _target_mask(targets: torch.Tensor, num_candidates: int, device: torch.device) -> torch.Tensor:
    """(Q,) candidate indices → (Q, K) bool one-hot rows on ``device``; a row is all False for an index outside
    [0, K) (a comparison, not an indexed write: an out-of-range index must not trip a device-side assert)."""
    return targets.to(device).unsqueeze(1) == torch.arange(num_candidates, device=device)


def _nonfinite_rows(scores: torch.Tensor) -> torch.Tensor:
    """() long: rows of ``scores`` with a NaN or an inf."""
    return (~torch.isfinite(scores)).any(dim=1).sum()


def _nonfinite_message(rows: int) -> str:
    return (
        f"{rows} query rows have non-finite (NaN/inf) scores: the model produced non-finite embeddings. "
        "Evaluate an earlier checkpoint, or check the run for a diverged loss"
    )


def _values_readable(*tensors: torch.Tensor) -> bool:
    """Whether input checks may read values back to the host: not while tracing (fake tensors under
    ``FakeTensorMode``, ``torch.compile``), where a read raises or breaks the graph, nor for meta tensors."""
    if torch.compiler.is_compiling():
        return False
    return not any(is_fake(t) or t.is_meta for t in tensors)
