"""ListMLE (Plackett–Luce negative log-likelihood) and its closed-form gradient on target-sorted rows.

Conventions shared by every implementation in this package (naive, chunked, top-K, ring, all-gather):

* **Order.**  A row's target order is a *stable* sort of the targets, descending; equal targets keep ascending
  column index (the global column index in the distributed implementations).  In the RankCLIP loss the sort key is
  the unscaled cosine similarity, which orders exactly like the target matrix ``Q = s * cos`` for any ``s > 0`` but
  cannot create ties by rounding the product ``s * cos``.
* **Position weights.**  ``position_weighting=None``: ``mu_k = 1``.  ``"log"``: ``mu_k = 1 / log2(k + 1)`` for the
  1-based position ``k`` (base 2, so ``mu_1 = 1``, the DCG convention).
* **Row loss.**  ``sum_k mu_k (lse_k - p_(k))`` with ``lse_k = logsumexp_{l >= k} p_(l)``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "POSITION_WEIGHTINGS",
    "listmle",
    "position_weights",
    "sorted_rows_loss_grad",
    "target_order",
]

POSITION_WEIGHTINGS = (None, "log")


def _check_position_weighting(position_weighting) -> None:
    if position_weighting not in POSITION_WEIGHTINGS:
        raise ValueError(
            f"position_weighting must be None or 'log', got {position_weighting!r}; "
            "'log' applies mu_k = 1/log2(k+1) to position k"
        )


def position_weights(n: int, position_weighting, *, dtype=torch.float32, device=None) -> torch.Tensor | None:
    """Per-position weights ``mu_k`` for ``k = 1..n`` (shape ``(n,)``), or None for uniform weights."""
    _check_position_weighting(position_weighting)
    if position_weighting is None:
        return None
    k = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    return (math.log(2.0) / torch.log(k + 1.0)).to(dtype)  # 1 / log2(k + 1)


def target_order(targets: torch.Tensor) -> torch.Tensor:
    """Permutation that sorts ``targets`` descending along the last dim; ties keep ascending index (stable)."""
    return torch.argsort(targets, dim=-1, descending=True, stable=True)


def listmle(
    scores: torch.Tensor, targets: torch.Tensor, *, position_weighting=None, top_k: int | None = None
) -> torch.Tensor:
    """Plackett–Luce negative log-likelihood of ``scores`` under the order given by ``targets``.

    Args:
        scores: ``(n,)`` or ``(rows, n)`` scores; receives gradient.
        targets: same shape; only its order is used (never differentiated).  Ties are broken by ascending index.
        position_weighting: None or ``"log"`` (``mu_k = 1/log2(k+1)``).
        top_k: if given, only the first ``top_k`` positions of the order contribute (their denominators still
            cover every item after them); ``top_k >= n`` is the full loss.

    Returns:
        A 0-d tensor: the per-row NLL ``sum_k mu_k (logsumexp_{l>=k} p_(l) - p_(k))``, averaged over rows.
        Computed in float32 (float64 if the input is float64) with ``logcumsumexp`` over the reversed sorted row,
        exact and free of any epsilon.
    """
    if scores.shape != targets.shape:
        raise ValueError(
            f"scores and targets must have the same shape, got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    if scores.dim() not in (1, 2) or scores.shape[-1] == 0:
        raise ValueError(f"scores must be (n,) or (rows, n) with n >= 1, got shape {tuple(scores.shape)}")
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    p = scores.to(dtype)
    rows = p if p.dim() == 2 else p.unsqueeze(0)  # (rows, n)
    perm = target_order(targets.detach().reshape(rows.shape))
    z = torch.gather(rows, -1, perm)  # (rows, n) scores in target order
    lse = torch.logcumsumexp(z.flip(-1), dim=-1).flip(-1)  # (rows, n) suffix log-sum-exp
    terms = lse - z
    mu = position_weights(z.shape[-1], position_weighting, dtype=dtype, device=z.device)
    if mu is not None:
        terms = terms * mu
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        terms = terms[..., :top_k]
    return terms.sum(-1).mean()


def sorted_rows_loss_grad(
    z: torch.Tensor, mu: torch.Tensor | None, *, shift: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses and their closed-form gradient for scores already sorted by target order.

    ``d loss / d p_(j) = exp(p_(j)) * sum_{k<=j} mu_k exp(-lse_k) - mu_j``.

    Args:
        z: ``(..., n)`` scores in target order (float32, or float64 to avoid one more rounding).
        mu: ``(n,)`` position weights or None.
        shift: if given (a python float or a 0-d tensor on ``z``'s device: it is never read back to the host), an
            upper bound on every score with ``max - min <= 600`` (the RankCLIP scores obey ``|p| <= s``, and the
            caller passes ``s`` when ``2 s_max <= 600``): the suffix sums are then taken in float64 *linear* space,
            ``S_k = sum_{l>=k} exp(p_(l) - shift)``, whose terms cannot underflow (``exp(-600) > 1e-261``) and
            are all positive, so the cumulative sums are exact to ~n * 1e-16 relative.  It is 5-10x cheaper
            than ``logcumsumexp`` on the CPU.  ``None`` selects the log-space path (``logcumsumexp``), valid for
            any finite scores.

    Returns:
        ``(row_loss, grad)``: ``row_loss`` ``(...)`` float64, ``grad`` ``(..., n)`` float32 in target order.
    """
    n = z.shape[-1]
    if shift is None:  # log space, any finite scores
        zf = z.double()
        lse = torch.logcumsumexp(zf.flip(-1), dim=-1).flip(-1)  # (..., n)
        terms = lse - zf
        neg = -lse if mu is None else torch.log(mu.double()) - lse
        log_c = torch.logcumsumexp(neg, dim=-1)  # (..., n) log sum_{k<=j} mu_k exp(-lse_k)
        grad = torch.exp(zf + log_c)
        del log_c, neg, lse
        if mu is None:
            return terms.sum(-1), grad.sub_(1.0).float()
        mud = mu.double()
        return (terms * mud).sum(-1), grad.sub_(mud).float()
    else:  # float64 linear space
        z = z.double()  # no-op for float64 scores; the subtraction must not round in float32
        u = (z - shift).exp_()  # (..., n) exp(p - shift) in (e^-600, ~1]
        suffix = u.flip(-1).cumsum_(-1).flip(-1)  # (..., n) S_k = exp(lse_k - shift) = sum_{l>=k} u_l
        # row loss = sum_k mu_k (log S_k + shift - p_(k)); each sum is O(n s), far from float64 cancellation
        log_suffix = suffix.log()
        if mu is None:
            row_loss = log_suffix.sum(-1) + n * shift - z.sum(-1)
            inv = suffix.reciprocal_()
        else:
            mud = mu.double()
            row_loss = log_suffix @ mud + mud.sum() * shift - z @ mud
            inv = suffix.reciprocal_().mul_(mud)
        del log_suffix
        grad = inv.cumsum_(-1).mul_(u).sub_(1.0 if mu is None else mud)  # exp(p_j - shift) sum_{k<=j} mu_k/S_k - mu_j
        del u, inv, suffix
        return row_loss, grad.float()
