"""Golden RankCLIP loss, written from the paper's formula independently of ``rankclip_ds`` (DESIGN.md §1;
docs/loss.md §1, §2 for the tie-break and the log base, §5 for top-K).

Every other loss test compares an implementation with ``naive``, which shares the normalisation, the position
weights, the ``w/(32N)`` factor and the pairing of score and target lists with the code under test: a mistake in
any of those would pass them all. Here the reference is plain Python loops over rows and positions on float64
scalars (N = 5), using nothing from ``rankclip_ds`` but the function under test; its gradients come from autograd
through those loops, and the loops' own gradient is checked by finite differences.

Tolerances (DESIGN.md §6): float32 implementations within ``1e-5 |b| + 1e-6`` (values) and ``1e-5`` normwise
(embedding gradients), the logit-scale gradient within ``1e-5 |b| + 1e-6 + 1e-8 s²`` (see ``float32_scale_atol``);
the float64 naive reference within ``1e-12``. Ties are exact duplicates of captions and images whose products are
exact in float32 (see ``inputs``).
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch

import rankclip_ds.losses.topk as topk_module
from rankclip_ds.losses import rankclip_loss
from rankclip_ds.losses.naive import naive_rankclip_loss

N, D = 5, 4
TERMS = ("loss", "clip", "cross", "inmodal")
WEIGHTS = {"rank_weight": 1.5, "lambda_cross": 0.8, "lambda_in": 1.3}  # all distinct: a swapped lambda shows
MAX_SCALE = 100.0


# ------------------------------------------------------------------------------------------------ the golden loss
def unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt(sum(x * x for x in v))


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(a[d] * b[d] for d in range(len(a)))


def log_sum_exp(values: list[torch.Tensor]) -> torch.Tensor:
    # Direct form: every score lies in [-100, 100] and e^100 ~ 3e43 is far from the float64 range's end.
    return torch.log(sum(torch.exp(v) for v in values))


def order_by_target(q_row: list[torch.Tensor], ties: str = "ascending") -> list[int]:
    """Column indices by descending target; equal targets by ascending index (docs/loss.md §2)."""
    sign = 1 if ties == "ascending" else -1
    return sorted(range(len(q_row)), key=lambda j: (-float(q_row[j].detach()), sign * j))


def listmle(P, Q, mu: list[float], top_k: int, ties: str) -> torch.Tensor:
    """(1/N) Σᵢ Σ_{k ≤ K} μₖ [ log Σ_{l ≥ k} exp P[i][πᵢ(l)] − P[i][πᵢ(k)] ], πᵢ the order of Q[i]: the
    denominators run over every remaining item, also when K < N."""
    n = len(P)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        pi = order_by_target(Q[i], ties)
        for k in range(min(top_k, n)):  # k = 0 is position 1
            total = total + mu[k] * (log_sum_exp([P[i][pi[l]] for l in range(k, n)]) - P[i][pi[k]])
    return total / n


def golden(img, txt, log_s, *, weighting=None, top_k=None, ties="ascending", **weights) -> dict[str, torch.Tensor]:
    """The RankCLIP loss of DESIGN.md §1 on float64 tensors ``img``, ``txt`` (N, D) and ``log_s`` (0-d)."""
    n = img.shape[0]
    image = [unit(img[i]) for i in range(n)]
    text = [unit(txt[i]) for i in range(n)]
    if float(log_s.detach()) > math.log(MAX_SCALE):  # clamped: s = 100, no gradient to log s
        log_s = torch.tensor(math.log(MAX_SCALE), dtype=torch.float64)
    s = torch.exp(log_s)
    S = [[s * dot(image[i], text[j]) for j in range(n)] for i in range(n)]  # image i vs text j
    St = [[s * dot(text[i], image[j]) for j in range(n)] for i in range(n)]  # text i vs image j
    A = [[s * dot(image[i], image[j]) for j in range(n)] for i in range(n)]
    B = [[s * dot(text[i], text[j]) for j in range(n)] for i in range(n)]

    def cross_entropy(M) -> torch.Tensor:  # positives on the diagonal, mean over rows
        return sum(log_sum_exp(M[i]) - M[i][i] for i in range(n)) / n

    clip = (cross_entropy(S) + cross_entropy(St)) / 2
    mu = [1 / math.log2(k + 1) if weighting == "log" else 1.0 for k in range(1, n + 1)]
    K = n if top_k is None else top_k
    cross = listmle(S, St, mu, K, ties) + listmle(St, S, mu, K, ties)
    inmodal = listmle(A, B, mu, K, ties) + listmle(B, A, mu, K, ties)
    w, lc, li = weights["rank_weight"], weights["lambda_cross"], weights["lambda_in"]
    loss = clip + w * (lc * cross + li * inmodal) / (32 * n)
    return {"loss": loss, "clip": clip, "cross": cross, "inmodal": inmodal}


# ------------------------------------------------------------------------------------------------ inputs
def inputs(data: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 embeddings (N, D), not normalised, that float32 represents exactly: the implementations see the
    same numbers.

    ``gaussian``: D = 4, no ties. ``ties``: sign vectors (D = 16, entries ±1/2 for images, ±1 for texts), with
    caption 3 = caption 1 and image 4 = image 0. Their norms are powers of two and every product of normalised rows
    is a multiple of 1/16, exact in float32 whatever the summation order, so the targets tie exactly in every
    implementation (cosines 1 ulp apart would be near-ties, which float32 may order either way: DESIGN.md §6)."""
    g = torch.Generator().manual_seed(7)
    if data == "gaussian":
        img = (torch.randn(N, D, generator=g) * 1.7).double()
        txt = ((torch.randn(N, D, generator=g) * 0.6).double() + 0.5 * img).float().double()
        return img, txt
    signs = torch.randint(0, 2, (2, N, 16), generator=g).double() * 2 - 1
    img, txt = signs[0] / 2, signs[1].clone()
    txt[3] = txt[1]
    img[4] = img[0]
    return img, txt


def as_float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


# log s, rounded to float32 (what the implementations get). The largest scale stays off the clamp's boundary,
# where rounding would decide whether log s gets a gradient.
SCALES = {
    "s=1": 0.0,
    "s=14.3": as_float32(math.log(14.3)),
    "s=99": as_float32(math.log(99.0)),
    "above the clamp": as_float32(math.log(MAX_SCALE) + 0.5),
}


@cache
def golden_case(data: str, scale: str, weighting: str | None, top_k: int | None):
    img, txt = inputs(data)
    leaves = [img.clone(), txt.clone(), torch.tensor(SCALES[scale], dtype=torch.float64)]
    for leaf in leaves:
        leaf.requires_grad_()
    out = golden(*leaves, weighting=weighting, top_k=top_k, **WEIGHTS)
    grads = torch.autograd.grad(out["loss"], leaves, allow_unused=True)  # log s is unused above the clamp
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves, strict=True)]
    return {k: float(v.detach()) for k, v in out.items()}, grads


def normwise(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-2))


def check(out: dict, grads, want: dict, want_grads, *, rtol: float, atol: float, grad_tol: float, scale_atol=0.0):
    """Values within ``rtol |b| + atol``, embedding gradients within ``grad_tol`` normwise, the logit-scale gradient
    within ``grad_tol |b| + atol + scale_atol``."""
    for k in TERMS:
        got = float(out[k].detach())
        assert abs(got - want[k]) <= rtol * abs(want[k]) + atol, (k, got, want[k])
    for name, g, r in zip(("image", "text"), grads[:2], want_grads[:2], strict=True):
        assert normwise(g, r) <= grad_tol, (name, normwise(g, r))
    got, ref = float(grads[2]), float(want_grads[2])
    assert abs(got - ref) <= grad_tol * abs(ref) + atol + scale_atol, ("logit_scale", got, ref)


def float32_scale_atol(scale: str) -> float:
    """Extra absolute tolerance of the logit-scale gradient of a float32 implementation: ``1e-8 s²``.

    A float32 cosine is rounded by up to 2⁻²⁴ (6e-8) relative, which moves its score ``s·cos`` by ~6e-8·s and that
    score's softmax weight by as much, and ``dL/d log s = Σ score · dL/dscore`` adds up such weights times scores of
    size up to s. Measured worst case over every implementation and case here: 4e-8 at s = 1, 9.3e-7 at s = 14.3,
    3.3e-5 at s = 99 (the tolerance: 1e-8, 2e-6 and 9.8e-5)."""
    return 1e-8 * math.exp(SCALES[scale]) ** 2


# ------------------------------------------------------------------------------------------------ the golden itself
def test_golden_on_orthonormal_pairs_has_the_closed_form():
    """Two orthonormal pairs: S = Sᵀ = A = B = s·Id, so every row is (s, 0) in target order and each of CE, ℓ(·|·)
    is log(1 + e^-s) (the second position's term is log e^0 − 0 = 0, whatever μ₂)."""
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    log_s = torch.tensor(math.log(14.3), dtype=torch.float64)
    term = math.log1p(math.exp(-14.3))
    for weighting in (None, "log"):
        out = golden(img, img * 3, log_s, weighting=weighting, **WEIGHTS)
        assert float(out["clip"]) == pytest.approx(term, rel=1e-12)
        assert float(out["cross"]) == pytest.approx(2 * term, rel=1e-12)
        assert float(out["inmodal"]) == pytest.approx(2 * term, rel=1e-12)
        want = term * (1 + 1.5 * (0.8 * 2 + 1.3 * 2) / (32 * 2))
        assert float(out["loss"]) == pytest.approx(want, rel=1e-12)


def test_golden_gradients_match_finite_differences():
    """On untied data (with ties a perturbation reorders the lists: the loss is not differentiable there)."""
    img, txt = inputs("gaussian")
    log_s = torch.tensor(SCALES["s=14.3"], dtype=torch.float64)
    for weighting, top_k in ((None, None), ("log", 3)):

        def loss(i, t, ls, weighting=weighting, top_k=top_k):
            return golden(i, t, ls, weighting=weighting, top_k=top_k, **WEIGHTS)["loss"]

        leaves = (img.clone().requires_grad_(), txt.clone().requires_grad_(), log_s.clone().requires_grad_())
        assert torch.autograd.gradcheck(loss, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("weighting", [None, "log"])
def test_the_tie_case_depends_on_the_tie_break(weighting):
    """Breaking the ties the other way changes every ListMLE term by far more than the tolerances below, so the
    ``ties`` cases really check the documented tie-break."""
    img, txt = inputs("ties")
    log_s = torch.tensor(SCALES["s=14.3"], dtype=torch.float64)
    up = golden(img, txt, log_s, weighting=weighting, **WEIGHTS)
    down = golden(img, txt, log_s, weighting=weighting, ties="descending", **WEIGHTS)
    for k in ("cross", "inmodal"):
        assert abs(float(up[k]) - float(down[k])) > 1e-2 * abs(float(up[k])), k


# ------------------------------------------------------------------------------------------------ the implementations
IMPLS = {
    "naive": {"impl": "naive"},
    "chunked_c1": {"impl": "chunked", "chunk_size": 1},
    "chunked_c2": {"impl": "chunked", "chunk_size": 2},
    "chunked_default": {"impl": "chunked"},
    "top_k_N": {"impl": "top_k", "top_k": N, "chunk_size": 2},
    "top_k_N+3": {"impl": "top_k", "top_k": N + 3, "chunk_size": 2},
    "top_k_3": {"impl": "top_k", "top_k": 3, "chunk_size": 2},
    "top_k_1": {"impl": "top_k", "top_k": 1, "chunk_size": 3},
    # Column blocks of 2: the top-K mode streams over three blocks of the 5 columns (default: one block).
    "top_k_N_block2": {"impl": "top_k", "top_k": N, "chunk_size": 2, "block": 2},
    "top_k_3_block2": {"impl": "top_k", "top_k": 3, "chunk_size": 2, "block": 2},
    "top_k_1_block2": {"impl": "top_k", "top_k": 1, "chunk_size": 1, "block": 2},
}


@pytest.mark.parametrize("scale", ["s=1", "s=14.3", "s=99"])
@pytest.mark.parametrize("data", ["gaussian", "ties"])
@pytest.mark.parametrize("weighting", [None, "log"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_rankclip_loss_equals_the_golden_loss(impl, weighting, data, scale, monkeypatch):
    kw = dict(IMPLS[impl])
    if "block" in kw:
        monkeypatch.setattr(topk_module, "_BLOCK_COLUMNS", kw.pop("block"))
    top_k = kw.get("top_k")
    want, want_grads = golden_case(data, scale, weighting, top_k if top_k is not None and top_k < N else None)
    img, txt = inputs(data)
    leaves = [img.float().requires_grad_(), txt.float().requires_grad_(), torch.tensor(SCALES[scale])]
    leaves[2].requires_grad_()
    out = rankclip_loss(*leaves, position_weighting=weighting, max_logit_scale=MAX_SCALE, **kw, **WEIGHTS)
    grads = torch.autograd.grad(out["loss"], leaves)
    assert all(g.dtype == torch.float32 for g in grads)
    assert float(out["scale"]) == pytest.approx(min(math.exp(SCALES[scale]), MAX_SCALE), rel=1e-6)
    check(out, grads, want, want_grads, rtol=1e-5, atol=1e-6, grad_tol=1e-5, scale_atol=float32_scale_atol(scale))


@pytest.mark.parametrize("impl", ["chunked", "naive", "top_k"])
def test_above_the_clamp(impl):
    """log s past ln(100): the loss uses s = 100 and log s gets no gradient."""
    scale = "above the clamp"
    top_k = {"top_k": 2} if impl == "top_k" else {}
    want, want_grads = golden_case("ties", scale, "log", top_k.get("top_k"))
    img, txt = inputs("ties")
    leaves = [img.float().requires_grad_(), txt.float().requires_grad_(), torch.tensor(SCALES[scale])]
    leaves[2].requires_grad_()
    out = rankclip_loss(*leaves, impl=impl, position_weighting="log", **top_k, **WEIGHTS)
    grads = torch.autograd.grad(out["loss"], leaves)
    assert float(out["scale"]) == pytest.approx(MAX_SCALE, rel=1e-6)
    assert float(want_grads[2]) == 0.0 and float(grads[2]) == 0.0
    check(out, grads, want, want_grads, rtol=1e-5, atol=1e-6, grad_tol=1e-5)


@pytest.mark.parametrize("scale", ["s=14.3", "s=99"])
@pytest.mark.parametrize("top_k", [None, 1, 3])
@pytest.mark.parametrize("data", ["gaussian", "ties"])
@pytest.mark.parametrize("weighting", [None, "log"])
def test_naive_reference_in_float64_equals_the_golden_loss(weighting, data, top_k, scale):
    """The reference every other loss test trusts, computed in float64, to float64 rounding."""
    want, want_grads = golden_case(data, scale, weighting, top_k)
    img, txt = inputs(data)
    leaves = [img.clone(), txt.clone(), torch.tensor(SCALES[scale], dtype=torch.float64)]
    for leaf in leaves:
        leaf.requires_grad_()
    out = naive_rankclip_loss(*leaves, position_weighting=weighting, top_k=top_k, dtype=torch.float64, **WEIGHTS)
    grads = torch.autograd.grad(out["loss"], leaves)
    check(out, grads, want, want_grads, rtol=1e-12, atol=1e-12, grad_tol=1e-12)
