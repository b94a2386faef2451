"""ListMLE against a brute-force Plackett–Luce likelihood, and the rank-weight schedules."""

from __future__ import annotations

import math

import pytest
import torch

from rankclip_ds.losses import epoch_rank_weight, listmle, step_rank_weight
from rankclip_ds.losses.listmle import sorted_rows_loss_grad, target_order


def brute_force_pl_nll(scores: list[float], targets: list[float], weights=None, top_k=None) -> float:
    """Explicit product over positions: -log prod_k exp(p_(k)) / sum_{l>=k} exp(p_(l)), float64 python maths."""
    order = sorted(range(len(targets)), key=lambda j: (-targets[j], j))  # desc target, ties by ascending index
    z = [scores[j] for j in order]
    nll = 0.0
    for k in range(len(z) if top_k is None else min(top_k, len(z))):
        denom = sum(math.exp(v) for v in z[k:])
        mu = 1.0 if weights is None else 1.0 / math.log2(k + 2)
        nll += mu * -math.log(math.exp(z[k]) / denom)
    return nll


@pytest.mark.parametrize("n", [1, 2, 3, 10, 33])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("weighting", [None, "log"])
def test_listmle_matches_brute_force(n, ties, weighting):
    gen = torch.Generator().manual_seed(n * 7 + ties)
    rows = 4
    scores = torch.randn(rows, n, generator=gen, dtype=torch.float64) * 3
    targets = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    if ties:
        targets = torch.randint(0, 3, (rows, n), generator=gen).double()  # many equal targets
    got = listmle(scores, targets, position_weighting=weighting)
    want = sum(brute_force_pl_nll(scores[r].tolist(), targets[r].tolist(), weighting) for r in range(rows)) / rows
    assert abs(float(got) - want) <= 1e-10 * max(1.0, abs(want))
    got32 = listmle(scores.float(), targets.float(), position_weighting=weighting)
    assert got32.dtype == torch.float32
    assert abs(float(got32) - want) <= 1e-5 * max(1.0, abs(want))


@pytest.mark.parametrize("top_k", [1, 2, 5, 50])
def test_listmle_top_k_matches_truncated_brute_force(top_k):
    gen = torch.Generator().manual_seed(top_k)
    scores = torch.randn(3, 9, generator=gen, dtype=torch.float64) * 4
    targets = torch.randint(0, 4, (3, 9), generator=gen).double()
    for weighting in (None, "log"):
        got = listmle(scores, targets, position_weighting=weighting, top_k=top_k)
        want = sum(brute_force_pl_nll(scores[r].tolist(), targets[r].tolist(), weighting, top_k) for r in range(3)) / 3
        assert abs(float(got) - want) <= 1e-10 * max(1.0, abs(want))


def test_listmle_one_dimensional_and_lengths_one_two():
    assert float(listmle(torch.tensor([3.0]), torch.tensor([1.0]))) == 0.0
    s, t = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])  # tie: index 0 first
    want = brute_force_pl_nll([1.0, 2.0], [0.5, 0.5])
    assert abs(float(listmle(s, t)) - want) < 1e-6
    assert abs(want - (math.log(math.exp(1) + math.exp(2)) - 1.0)) < 1e-12


def test_tie_break_is_stable_ascending_index():
    t = torch.tensor([[1.0, 2.0, 1.0, 2.0, 0.0, 2.0]])
    assert target_order(t).tolist() == [[1, 3, 5, 0, 2, 4]]


def test_listmle_errors_name_the_problem():
    with pytest.raises(ValueError, match="same shape"):
        listmle(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="position_weighting"):
        listmle(torch.zeros(3), torch.zeros(3), position_weighting="ln")


@pytest.mark.parametrize("shift", [None, 100.0])
@pytest.mark.parametrize("weighting", [None, "log"])
def test_closed_form_gradient_matches_autograd(shift, weighting):
    """The fused kernel's gradient (linear float64 space or log space) equals autograd through listmle."""
    gen = torch.Generator().manual_seed(3)
    z = (torch.rand(5, 40, generator=gen, dtype=torch.float64) * 2 - 1) * 100  # scores in [-s, s], s = 100
    zz = z.clone().requires_grad_()
    ref = listmle(zz, -torch.arange(40.0).expand(5, 40), position_weighting=weighting) * 5  # already sorted
    (g_ref,) = torch.autograd.grad(ref, zz)
    from rankclip_ds.losses.listmle import position_weights

    mu = position_weights(40, weighting)
    row_loss, grad = sorted_rows_loss_grad(z.float(), mu, shift=shift)
    assert torch.allclose(row_loss.sum(), ref.detach(), rtol=1e-6)
    assert float((grad.double() - g_ref).norm() / g_ref.norm()) < 1e-6
    assert torch.isfinite(grad).all()


def test_epoch_rank_weight_is_the_released_ramp():
    assert epoch_rank_weight(1, 10) == 0.0
    assert epoch_rank_weight(2, 10) == pytest.approx(1 / 3)
    assert epoch_rank_weight(7, 10) == 2.0
    assert epoch_rank_weight(10, 10) == 2.0
    assert epoch_rank_weight(1, 1) == 2.0  # one epoch: defined, no division by zero
    assert epoch_rank_weight(1, 1, w_max=0.5) == 0.5
    assert epoch_rank_weight(0, 5) == 0.0
    with pytest.raises(ValueError, match="epochs"):
        epoch_rank_weight(1, 0)


def test_step_rank_weight():
    assert step_rank_weight(0, 300) == 0.0
    assert step_rank_weight(100, 300) == pytest.approx(1.0)
    assert step_rank_weight(200, 300) == pytest.approx(2.0)
    assert step_rank_weight(299, 300) == 2.0
    assert step_rank_weight(400, 300) == 2.0
    assert step_rank_weight(5, 10, hold_from=0.0) == 2.0
    assert step_rank_weight(-1, 10) == 0.0
    with pytest.raises(ValueError, match="hold_from"):
        step_rank_weight(1, 10, hold_from=1.5)
    with pytest.raises(ValueError, match="total_steps"):
        step_rank_weight(1, 0)
