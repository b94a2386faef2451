"""Top-K streaming mode: K >= N is the exact loss; K < N equals the truncated float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from _loss_dist import gaussian_inputs, grid_inputs
from test_loss_chunked import check, reference, run

import rankclip_ds.losses.topk as topk_module


@pytest.fixture(params=[5, 2048], ids=["block5", "block2048"])
def block_columns(request, monkeypatch):
    """Small column blocks exercise the streaming merge; the default exercises a single block."""
    monkeypatch.setattr(topk_module, "_BLOCK_COLUMNS", request.param)
    return request.param


@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_top_k_equal_n_is_exact(n, scale, block_columns):
    img, txt = gaussian_inputs(n, seed=n + 1)
    log_s = torch.tensor(math.log(scale))
    kw = {"rank_weight": 1.5, "lambda_in": 0.7, "position_weighting": "log" if n == 7 else None}
    ref, ref_grads = reference(img, txt, log_s, **kw)
    for k in (n, n + 3):
        out, grads = run(img, txt, log_s, impl="top_k", top_k=k, chunk_size=3, **kw)
        check(out, grads, ref, ref_grads)


@pytest.mark.parametrize("n, k", [(7, 1), (7, 3), (64, 5), (64, 40), (100, 8)])
@pytest.mark.parametrize("weighting", [None, "log"])
def test_top_k_below_n_matches_truncated_reference(n, k, weighting, block_columns):
    img, txt = grid_inputs(n, seed=k) if n == 100 else gaussian_inputs(n, seed=k)
    log_s = torch.tensor(math.log(14.3))
    kw = {"rank_weight": 2.0, "lambda_cross": 0.8, "lambda_in": 1.1, "position_weighting": weighting}
    ref, ref_grads = reference(img, txt, log_s, top_k=k, **kw)
    out, grads = run(img, txt, log_s, impl="top_k", top_k=k, chunk_size=4, **kw)
    check(out, grads, ref, ref_grads)
