"""The chunked (fused-gradient) RankCLIP loss against the naive float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from _loss_dist import gaussian_inputs, grid_inputs, leaf, rel_err

from rankclip_ds.losses import rankclip_loss
from rankclip_ds.losses.chunked import chunked_rankclip_terms
from rankclip_ds.losses.naive import naive_rankclip_loss, normalise_inputs

TERMS = ("loss", "clip", "cross", "inmodal")


def reference(img, txt, log_s, **kw):
    """float64 naive loss and its gradients w.r.t. (img, txt, logit_scale)."""
    i, t, ls = leaf(img, torch.float64), leaf(txt, torch.float64), leaf(log_s, torch.float64)
    out = naive_rankclip_loss(i, t, ls, dtype=torch.float64, **kw)
    return out, torch.autograd.grad(out["loss"], [i, t, ls])


def run(img, txt, log_s, dtype=torch.float32, **kw):
    i, t, ls = leaf(img, dtype), leaf(txt, dtype), leaf(log_s, torch.float32)
    out = rankclip_loss(i, t, ls, **kw)
    return out, torch.autograd.grad(out["loss"], [i, t, ls])


def check(out, grads, ref, ref_grads, rtol_value=1e-5, rtol_grad=1e-5):
    for k in TERMS:
        assert out[k].dtype == torch.float32 and out[k].dim() == 0
        got, want = float(out[k].detach()), float(ref[k].detach())
        assert abs(got - want) <= rtol_value * abs(want) + 1e-6, (k, got, want)
    for name, g, r in zip(("image", "text"), grads[:2], ref_grads[:2], strict=True):
        assert rel_err(g, r) <= rtol_grad, (name, rel_err(g, r))
    assert abs(float(grads[2]) - float(ref_grads[2])) <= rtol_grad * abs(float(ref_grads[2])) + 1e-6


@pytest.mark.parametrize("n", [1, 7, 64, 300])
@pytest.mark.parametrize("chunk", [1, 16, "N"])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_chunked_equals_naive_float32(n, chunk, scale):
    img, txt = grid_inputs(n, seed=n) if n == 300 else gaussian_inputs(n, seed=n)
    log_s = torch.tensor(math.log(scale))
    kw = {"rank_weight": 1.5, "lambda_cross": 1.0, "lambda_in": 0.7}
    ref, ref_grads = reference(img, txt, log_s, **kw)
    out, grads = run(img, txt, log_s, impl="chunked", chunk_size=n if chunk == "N" else chunk, **kw)
    check(out, grads, ref, ref_grads)


@pytest.mark.parametrize("weighting", [None, "log"])
@pytest.mark.parametrize("n", [7, 64])
def test_chunked_position_weighting_and_lambdas(weighting, n):
    img, txt = grid_inputs(n, seed=3)
    for lc, li in ((1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0)):  # either lambda = 0 works
        kw = {"rank_weight": 2.0, "lambda_cross": lc, "lambda_in": li, "position_weighting": weighting}
        ref, ref_grads = reference(img, txt, torch.tensor(2.0), **kw)
        out, grads = run(img, txt, torch.tensor(2.0), impl="chunked", chunk_size=5, **kw)
        check(out, grads, ref, ref_grads)


@pytest.mark.parametrize("n", [1, 7, 64, 300])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_bf16_inputs(n, scale):
    """bf16 in: the maths runs in float32 from the same values (values at 1e-5); gradients come back in bf16."""
    img, txt = grid_inputs(n, seed=n) if n == 300 else gaussian_inputs(n, seed=5)
    img, txt = img.to(torch.bfloat16), txt.to(torch.bfloat16)
    log_s = torch.tensor(math.log(scale))
    kw = {"rank_weight": 2.0}
    ref, ref_grads = reference(img, txt, log_s, **kw)
    out, grads = run(img, txt, log_s, dtype=torch.bfloat16, impl="chunked", chunk_size=16, **kw)
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.bfloat16
    check(out, grads, ref, ref_grads, rtol_value=1e-5, rtol_grad=1e-2)  # bf16 rounding of the gradient: 2^-8


def test_recompute_backward_equals_fused():
    img, txt = grid_inputs(40, seed=2)
    outs = []
    for mode in ("fused", "recompute"):
        i, t, ls = leaf(img, torch.float32), leaf(txt, torch.float32), leaf(torch.tensor(3.0))
        ni, nt, nls = normalise_inputs(i, t, ls)
        out = chunked_rankclip_terms(
            ni, nt, nls, rank_weight=2.0, lambda_cross=1.0, lambda_in=1.0, comm="ring", chunk_size=7,
            position_weighting="log", group=None, backward=mode,
        )  # fmt: skip
        outs.append((out["loss"], torch.autograd.grad(out["loss"], [i, t, ls])))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert torch.equal(a, b)


def test_logit_scale_clamp_follows_torch_clamp():
    img, txt = gaussian_inputs(8, seed=1)
    out, grads = run(img, txt, torch.tensor(5.0), rank_weight=1.0)  # ln 100 = 4.605 < 5: clamped
    ref, _ = reference(img, txt, torch.tensor(math.log(100.0)), rank_weight=1.0)
    assert float(grads[2]) == 0.0
    want = float(ref["loss"].detach())
    assert abs(float(out["loss"].detach()) - want) < 1e-5 * want
    assert abs(float(out["scale"]) - 100.0) < 1e-4


def test_only_loss_is_differentiable():
    img, txt = gaussian_inputs(8, seed=1)
    out = rankclip_loss(leaf(img, torch.float32), leaf(txt, torch.float32), leaf(torch.tensor(1.0)), rank_weight=1.0)
    assert out["loss"].requires_grad
    assert not any(out[k].requires_grad for k in ("clip", "cross", "inmodal"))


def released_listmle(y_pred: torch.Tensor, y_true: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """The released code's ListMLE as DESIGN.md describes it: log(cumsum(exp(x - rowmax)) + eps), max not detached."""
    perm = torch.argsort(y_true, dim=-1, descending=True, stable=True)
    y = torch.gather(y_pred, -1, perm)
    y = y - y.max(dim=-1, keepdim=True).values
    cumsums = torch.cumsum(y.exp().flip(-1), dim=-1).flip(-1)
    return (torch.log(cumsums + eps) - y).sum(-1).mean()


def test_inmodal_at_scale_100_is_exact_and_epsilon_formula_is_not():
    """Regression test for the released code's epsilon defect: A's diagonal is the row maximum at s = 100."""
    n = 64
    img, txt = gaussian_inputs(n, seed=11)
    kw = {"rank_weight": 2.0, "lambda_cross": 0.0, "lambda_in": 1.0}
    log_s = torch.tensor(math.log(100.0)) - 1e-6  # just inside the clamp so logit_scale has a gradient
    ref, ref_grads = reference(img, txt, log_s, **kw)
    out, grads = run(img, txt, log_s, impl="chunked", chunk_size=16, **kw)
    assert all(torch.isfinite(out[k]) for k in TERMS)
    assert all(torch.isfinite(g).all() for g in grads)
    check(out, grads, ref, ref_grads)
    # the epsilon formula on the same in-modal lists, in float32 as the released code runs it
    i = leaf(img, torch.float32)
    t = txt.float()
    ni, nt = torch.nn.functional.normalize(i, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    a, b = 100.0 * ni @ ni.T, (100.0 * nt @ nt.T).detach()
    (g_eps,) = torch.autograd.grad(released_listmle(a, b), i, retain_graph=True)
    i64 = leaf(img, torch.float64)
    ni64, nt64 = torch.nn.functional.normalize(i64, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
    from rankclip_ds.losses import listmle

    (g_exact,) = torch.autograd.grad(listmle(100.0 * ni64 @ ni64.T, nt64 @ nt64.T), i64)
    assert rel_err(g_eps, g_exact) > 0.1  # tens of percent wrong: most suffix terms are floored by eps
    (g_ours,) = torch.autograd.grad(listmle(a, b), i)
    assert rel_err(g_ours, g_exact) < 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"impl": "fast"}, "impl"),
        ({"comm": "tree"}, "comm"),
        ({"impl": "top_k", "top_k": 0}, "top_k"),
        ({"top_k": 3}, "top_k"),
        ({"position_weighting": "ln"}, "position_weighting"),
    ],
)
def test_errors_name_the_bad_value(kwargs, match):
    img, txt = gaussian_inputs(4)
    with pytest.raises(ValueError, match=match):
        rankclip_loss(img.float(), txt.float(), torch.tensor(1.0), rank_weight=1.0, **kwargs)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        rankclip_loss(torch.randn(4, 8), torch.randn(5, 8), torch.tensor(1.0), rank_weight=1.0)


@pytest.mark.parametrize("impl", ["chunked", "naive", "top_k"])
def test_autocast_context_does_not_change_the_loss(impl):
    """Forward under bf16 autocast (backward outside it, as usual) gives the float32 results bit for bit."""
    img, txt = gaussian_inputs(16, seed=4)
    kw = {"rank_weight": 2.0, "impl": impl, "chunk_size": None if impl == "naive" else 4}
    if impl == "top_k":
        kw["top_k"] = 5
    out, grads = run(img, txt, torch.tensor(2.0), **kw)
    i, t, ls = leaf(img, torch.float32), leaf(txt, torch.float32), leaf(torch.tensor(2.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = rankclip_loss(i, t, ls, **kw)
    grads_ac = torch.autograd.grad(out_ac["loss"], [i, t, ls])
    assert torch.equal(out["loss"], out_ac["loss"])
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ac, strict=True))


@pytest.mark.parametrize("impl", ["naive", "chunked", "top_k"])
def test_max_logit_scale_is_the_clamp(impl):
    """``max_logit_scale`` (the model's) is the clamp: above it the loss is the loss at the bound, the reported
    scale is the bound and the scale gets no gradient; below it nothing changes."""
    img, txt = gaussian_inputs(12, seed=5)
    kw = {"rank_weight": 1.0, "top_k": 4} if impl == "top_k" else {"rank_weight": 1.0}
    chunk = None if impl == "naive" else 5
    out, grads = run(img, txt, torch.tensor(math.log(20.0)), impl=impl, chunk_size=chunk, max_logit_scale=14.3, **kw)
    ref, ref_grads = reference(img, txt, torch.tensor(math.log(14.3)), **kw)
    check(out, (grads[0], grads[1], ref_grads[2]), ref, ref_grads)  # the scale's gradient: checked next
    assert float(grads[2]) == 0.0
    assert float(out["scale"]) == pytest.approx(14.3, rel=1e-6)
    out, grads = run(img, txt, torch.tensor(math.log(10.0)), impl=impl, chunk_size=chunk, max_logit_scale=14.3, **kw)
    ref, ref_grads = reference(img, txt, torch.tensor(math.log(10.0)), **kw)
    check(out, grads, ref, ref_grads)
    assert float(grads[2]) != 0.0


@pytest.mark.parametrize("scale, max_scale", [(14.3, 100.0), (100.0, 100.0), (350.0, 400.0)])
def test_listmle_kernel_is_chosen_from_the_configured_bound(scale, max_scale):
    """The float64 linear-space kernel is exact while 2 s <= 600; the choice follows ``max_logit_scale`` (a python
    number) so that the scale itself is never read back; above 300 the log-space kernel is used."""
    from rankclip_ds.losses.chunked import linear_space_ok

    assert linear_space_ok(max_scale) == (max_scale <= 300.0)
    img, txt = grid_inputs(40, seed=9)
    kw = {"rank_weight": 2.0, "max_logit_scale": max_scale}
    ref, ref_grads = reference(img, txt, torch.tensor(math.log(scale)), rank_weight=2.0, max_logit_scale=max_scale)
    out, grads = run(img, txt, torch.tensor(math.log(scale)), impl="chunked", chunk_size=7, **kw)
    check(out, grads, ref, ref_grads)


def test_a_bad_max_logit_scale_is_named():
    img, txt = gaussian_inputs(4)
    with pytest.raises(ValueError, match=r"max_logit_scale must be a positive python float .* got 0"):
        rankclip_loss(img.float(), txt.float(), torch.tensor(1.0), rank_weight=1.0, max_logit_scale=0)
