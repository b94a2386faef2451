"""Graded relevance and ranking consistency as tensor arithmetic: NDCG@k, mean average precision, Spearman and
Kendall rank correlation per query, and the geometry of the embedding space (modality gap, alignment, uniformity).

Every query row has candidate ``scores`` (the model's similarities) and a ``relevance`` row of the same length (the
ground-truth relatedness: any non-negative numbers, e.g. how many facts two items share). Conventions:

- **NDCG@k** uses the **linear gain** ``rel`` (not ``2^rel − 1``) and the discount ``1 / log2(position + 2)``
  (position 0 = first place): ``DCG@k = Σ_{i<k} rel_{π(i)} / log2(i + 2)``, ``NDCG@k = DCG@k / IDCG@k`` with IDCG the
  DCG of the relevance sorted descending. Linear because relevance here is a *count* (two shared facts are worth
  twice one) and a user's matrix may be on any scale, where ``2^rel`` would explode; it is also the gain of
  ``sklearn.metrics.ndcg_score``. ``k`` larger than the candidate list means the whole list.
- **Average precision** is over the whole list with **binary relevance ``rel > 0``**:
  ``AP = (1/R) Σ_{i : rel_{π(i)} > 0} precision@(i+1)``, R = number of relevant candidates.
- NDCG and AP order candidates by the tie rule of :mod:`.metrics`: by score, highest first, **equal scores by
  candidate index, lowest first** (a stable descending sort). A query with no relevant candidate (IDCG = 0, R = 0)
  has undefined NDCG and AP: NaN.
- **Spearman** is the Pearson correlation of the two rows' **average ranks** (tied values share the mean of the
  ranks they span), **Kendall** is **tau-b**: ``(n_c − n_d) / sqrt((n0 − n1)(n0 − n2))`` with ``n0 = K(K−1)/2``,
  ``n1``/``n2`` the pairs tied in scores/relevance. Here equal scores are *ties* (no index rule): the correlation
  compares two orders as orders. A query whose relevance row (or score row) is constant has no defined correlation:
  NaN. Kendall counts discordant pairs with a merge sort (``O(K log² K)`` per row), never all K² pairs.

**In-modal queries** (image→image, text→text) must not retrieve themselves: ``exclude_self=True`` drops the query's
own column (query q = candidate q) from both rows before scoring, so each row has K − 1 candidates.

**Tensors, then numbers.** :func:`ndcg_at_k`, :func:`average_precision`, :func:`spearman`, :func:`kendall_tau_b`
and :func:`relevance_ranking` return per-query tensors on their input's device, NaN where undefined, and never read
a value back to the host. :func:`relevance_metrics` means them over the defined queries with one read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .metrics import DEFAULT_BLOCK, _nonfinite_message, _nonfinite_rows

__all__ = [
    "RelevanceRanking",
    "alignment",
    "average_precision",
    "average_ranks",
    "drop_self",
    "kendall_tau_b",
    "modality_gap",
    "ndcg_at_k",
    "relevance_metrics",
    "relevance_ranking",
    "spearman",
    "uniformity",
]


class RelevanceRanking(NamedTuple):
    """Per-query scores of one retrieval direction, on the embeddings' device (see :func:`relevance_ranking`)."""

    ndcg: torch.Tensor
    """(len(ks), Q) float64: NDCG@k, NaN for a query without a relevant candidate."""
    ap: torch.Tensor
    """(Q,) float64: average precision (relevant = rel > 0), NaN for a query without a relevant candidate."""
    spearman: torch.Tensor
    """(Q,) float64, NaN where the relevance row or the score row is constant."""
    kendall: torch.Tensor
    """(Q,) float64 tau-b, NaN where the relevance row or the score row is constant."""
    nonfinite: torch.Tensor
    """() long: query rows with a non-finite score."""
    bad_relevance: torch.Tensor
    """() long: negative or non-finite relevance entries (the relevance is moved to the embeddings' device first)."""


def _descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Candidate order of each row under the module's tie rule (stable descending sort)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def ndcg_at_k(scores: torch.Tensor, relevance: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """NDCG@k (linear gain, see the module doc) of each row: (Q, K) scores and relevance → (len(ks), Q) float64."""
    _check_pair(scores, relevance)
    rel = relevance.double()
    num = rel.shape[1]
    discount = 1.0 / torch.log2(torch.arange(num, device=rel.device, dtype=torch.float64) + 2.0)  # (K,)
    dcg = torch.cumsum(rel.gather(1, _descending_order(scores)) * discount, dim=1)  # (Q, K) DCG@(i+1)
    idcg = torch.cumsum(torch.sort(rel, dim=1, descending=True).values * discount, dim=1)
    cut = [min(int(k), num) - 1 for k in ks]  # the last position counted by each k
    d, i = torch.stack([dcg[:, c] for c in cut]), torch.stack([idcg[:, c] for c in cut])  # (len(ks), Q)
    return torch.where(i > 0, d / i.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)


def average_precision(scores: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Average precision of each row over the whole list, relevant = ``relevance > 0`` → (Q,) float64."""
    _check_pair(scores, relevance)
    hits = (relevance > 0).gather(1, _descending_order(scores)).double()  # (Q, K) 1 where a relevant one sits
    position = torch.arange(1, hits.shape[1] + 1, device=hits.device, dtype=torch.float64)
    precision = torch.cumsum(hits, dim=1) / position  # (Q, K) precision@(i+1)
    total = hits.sum(dim=1)
    return torch.where(total > 0, (precision * hits).sum(dim=1) / total.clamp_min(1.0), torch.nan)


def _group_starts(sorted_rows: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """(Q, K) bool: True where a run of equal values (equal in every given row tensor) starts, rows sorted."""
    new = torch.ones_like(sorted_rows, dtype=torch.bool)
    differs = sorted_rows[:, 1:] != sorted_rows[:, :-1]
    for other in more:
        differs = differs | (other[:, 1:] != other[:, :-1])
    new[:, 1:] = differs
    return new


def _tied_pairs(starts: torch.Tensor) -> torch.Tensor:
    """Pairs within runs of equal values, per row, from the run starts of sorted rows: Σ_i (i − start(i)) → (Q,)."""
    position = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    start_of = torch.where(starts, position, 0).cummax(dim=1).values
    return (position - start_of).sum(dim=1)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ascending ranks of each row, tied values sharing the mean of the ranks they span → (Q, K) float64."""
    values, order = torch.sort(x, dim=1, stable=True)
    num = x.shape[1]
    position = torch.arange(num, device=x.device).expand_as(values)
    starts = _group_starts(values)
    first = torch.where(starts, position, 0).cummax(dim=1).values  # (Q, K) first position of each run
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    last = torch.where(ends, position, num).flip(1).cummin(dim=1).values.flip(1)  # last position of each run
    mean_rank = (first + last).double() / 2.0 + 1.0
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def _constant_rows(x: torch.Tensor) -> torch.Tensor:
    return (x == x[:, :1]).all(dim=1)


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rho of each row pair (average ranks for ties) → (Q,) float64, NaN where a row is constant."""
    _check_pair(x, y)
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(dim=1, keepdim=True), ry - ry.mean(dim=1, keepdim=True)
    denom = torch.sqrt((rx * rx).sum(dim=1) * (ry * ry).sum(dim=1))
    undefined = _constant_rows(x) | _constant_rows(y)
    return torch.where(undefined, torch.nan, (rx * ry).sum(dim=1) / denom.clamp_min(torch.finfo(torch.float64).tiny))


def _strict_inversions(y: torch.Tensor) -> torch.Tensor:
    """Pairs i < j with y_i > y_j in each row → (Q,) long, by a bottom-up merge sort over all rows at once: at each
    level, for every element b of a right block, the elements of its (sorted) left block above b are counted."""
    rows, num = y.shape
    size = 1 << max(0, (num - 1).bit_length())  # a power of two; padding +inf at the end adds no inversion
    values = torch.cat([y, y.new_full((rows, size - num), torch.inf)], dim=1)
    total = torch.zeros(rows, dtype=torch.long, device=y.device)
    width = 1
    while width < size:
        blocks = values.view(rows, size // (2 * width), 2, width)
        left, right = blocks[:, :, 0].contiguous(), blocks[:, :, 1].contiguous()  # each sorted ascending
        not_above = torch.searchsorted(left, right, right=True)  # (rows, blocks, width): left elements ≤ b
        total += (width - not_above).sum(dim=(1, 2))
        values = torch.sort(values.view(rows, size // (2 * width), 2 * width), dim=-1).values.view(rows, size)
        width *= 2
    return total


def kendall_tau_b(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b of each row pair → (Q,) float64, NaN where a row is constant (see the module doc).

    Knight's method: order each row by (x, y); discordant pairs are then the strict inversions of y, and
    ``n_c − n_d = n0 − n1 − n2 + n3 − 2 n_d`` with n3 the pairs tied in both.
    """
    _check_pair(x, y)
    xf, yf = x.double(), y.double()
    by_y = torch.sort(yf, dim=1, stable=True).indices
    order = by_y.gather(1, torch.sort(xf.gather(1, by_y), dim=1, stable=True).indices)  # lexicographic (x, y)
    xs, ys = xf.gather(1, order), yf.gather(1, order)
    n0 = x.shape[1] * (x.shape[1] - 1) // 2
    n1 = _tied_pairs(_group_starts(xs))
    n2 = _tied_pairs(_group_starts(torch.sort(yf, dim=1).values))
    n3 = _tied_pairs(_group_starts(xs, ys))
    concordant_minus_discordant = (n0 - n1 - n2 + n3 - 2 * _strict_inversions(ys)).double()
    denom = torch.sqrt((n0 - n1).double() * (n0 - n2).double())
    undefined = (n1 == n0) | (n2 == n0)  # every pair tied: a constant row
    return torch.where(undefined, torch.nan, concordant_minus_discordant / denom.clamp_min(1.0))


def drop_self(matrix: torch.Tensor, first_query: int = 0) -> torch.Tensor:
    """(b, K) rows of queries ``first_query … first_query + b − 1`` → (b, K − 1) without each query's own column
    (a gather: static shapes, no host read)."""
    rows, num = matrix.shape
    query = torch.arange(first_query, first_query + rows, device=matrix.device).unsqueeze(1)  # (b, 1)
    column = torch.arange(num - 1, device=matrix.device).unsqueeze(0)  # (1, K − 1)
    return matrix.gather(1, column + (column >= query).long())


def relevance_ranking(
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    relevance: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    block_size: int = DEFAULT_BLOCK,
) -> RelevanceRanking:
    """Per-query NDCG@k, AP, Spearman and Kendall of scores ``query_emb @ cand_emb.T`` against ``relevance``.

    Args:
        query_emb: (Q, D); cand_emb: (K, D), on the same device; relevance: (Q, K) (moved to that device).
        exclude_self: in-modal retrieval (the queries *are* the candidates, Q = K): drop each query's own column.
        block_size: queries scored at a time (no score matrix above ``block_size × K`` is held).
    """
    num_q, num_k = query_emb.shape[0], cand_emb.shape[0]
    if relevance.shape != (num_q, num_k):
        raise ValueError(f"relevance {tuple(relevance.shape)} must be ({num_q}, {num_k}): one row per query")
    if exclude_self and num_q != num_k:
        raise ValueError(f"exclude_self needs the queries to be the candidates, got {num_q} queries and {num_k}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={tuple(ks)}: give at least one k ≥ 1, e.g. (1, 5, 10)")
    if num_k - int(exclude_self) < 2:
        raise ValueError(f"ranking needs at least 2 candidates per query, got {num_k - int(exclude_self)}")
    relevance = relevance.to(query_emb.device)  # a CPU matrix (shared facts, a user's .npy) beside CUDA embeddings
    bad_relevance = (~torch.isfinite(relevance) | (relevance < 0)).sum()
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    nonfinite = torch.zeros((), dtype=torch.long, device=query_emb.device)
    for i in range(0, num_q, block_size):
        scores, rel = query_emb[i : i + block_size] @ cand_emb.T, relevance[i : i + block_size]  # (b, K)
        if exclude_self:
            scores, rel = drop_self(scores, i), drop_self(rel, i)
        nonfinite += _nonfinite_rows(scores)
        parts[0].append(ndcg_at_k(scores, rel, ks))
        parts[1].append(average_precision(scores, rel))
        parts[2].append(spearman(scores, rel))
        parts[3].append(kendall_tau_b(scores, rel))
    return RelevanceRanking(torch.cat(parts[0], dim=1), *(torch.cat(p) for p in parts[1:]), nonfinite, bad_relevance)


def relevance_metrics(
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    relevance: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    block_size: int = DEFAULT_BLOCK,
) -> dict:
    """Means over queries of :func:`relevance_ranking`, with one device-to-host read.

    Returns:
        ``{"ndcg@{k}", "map", "spearman", "kendall", "num_queries", "num_no_relevant", "num_constant"}``: NDCG and
        mAP are means over the queries with a relevant candidate (``num_no_relevant`` are left out), the
        correlations over the queries whose relevance and score rows are not constant (``num_constant`` left out).
        A mean over no query is ``None``. Relevance must be finite and ≥ 0 (a ``ValueError`` otherwise).
    """
    ranked = relevance_ranking(query_emb, cand_emb, relevance, ks=ks, exclude_self=exclude_self, block_size=block_size)
    per_query = torch.cat([ranked.ndcg, ranked.ap.unsqueeze(0), ranked.spearman.unsqueeze(0), ranked.kendall[None]])
    defined = ~torch.isnan(per_query)  # (len(ks) + 3, Q)
    sums = torch.where(defined, per_query, 0.0).sum(dim=1)
    counts = defined.sum(dim=1)
    head = torch.stack([ranked.bad_relevance, ranked.nonfinite]).double()
    host = torch.cat([head, sums, counts.double()]).tolist()  # one read
    if host[0]:
        raise ValueError(f"relevance holds {int(host[0])} negative or non-finite entries; give finite values ≥ 0")
    if host[1]:
        raise ValueError(_nonfinite_message(int(host[1])))
    n = len(ks) + 3
    means = [s / c if c else None for s, c in zip(host[2 : 2 + n], host[2 + n :], strict=True)]
    num_q = int(query_emb.shape[0])
    result: dict = {f"ndcg@{k}": means[j] for j, k in enumerate(ks)}
    result.update(map=means[len(ks)], spearman=means[len(ks) + 1], kendall=means[len(ks) + 2])
    result.update(num_queries=num_q, num_no_relevant=num_q - int(host[2 + n + len(ks)]))
    result["num_constant"] = num_q - int(host[2 + n + len(ks) + 1])
    return result


def modality_gap(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """‖mean(x̂) − mean(ŷ)‖₂ of the L2-normalised rows of two modalities (Liang et al. 2022) → () float, in [0, 2]."""
    return torch.linalg.vector_norm(F.normalize(image_emb, dim=-1).mean(0) - F.normalize(text_emb, dim=-1).mean(0))


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """E‖x̂ᵢ − ŷᵢ‖^α over positive pairs (row i of x with row i of y), rows L2-normalised (Wang & Isola 2020) → ()."""
    if x.shape != y.shape:
        raise ValueError(f"alignment pairs row i of x with row i of y: shapes {tuple(x.shape)} and {tuple(y.shape)}")
    return torch.linalg.vector_norm(F.normalize(x, dim=-1) - F.normalize(y, dim=-1), dim=-1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2.0, *, block_size: int = DEFAULT_BLOCK) -> torch.Tensor:
    """log E exp(−t‖x̂ᵢ − x̂ⱼ‖²) over the distinct pairs i ≠ j, rows L2-normalised (Wang & Isola 2020) → () float.

    Computed in blocks of rows with a log-sum-exp, so no N × N matrix is held and no exponential underflows.
    """
    num = x.shape[0]
    if num < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings, got {num}")
    unit = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
    parts = []
    for i in range(0, num, block_size):
        sq = torch.cdist(unit[i : i + block_size], unit).pow(2)  # (b, N)
        own = torch.arange(i, i + sq.shape[0], device=x.device).unsqueeze(1) == torch.arange(num, device=x.device)
        parts.append(torch.logsumexp((-t * sq).masked_fill(own, -torch.inf), dim=(0, 1)).view(1))
    return torch.logsumexp(torch.cat(parts), dim=0) - math.log(num * (num - 1))


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"scores {tuple(x.shape)} and relevance {tuple(y.shape)} must be equal (Q, K)")
