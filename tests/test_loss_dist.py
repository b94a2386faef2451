"""Distributed RankCLIP loss on gloo: ring = allgather = naive = the single-process reference, per rank."""

from __future__ import annotations

import math

import pytest
import torch
from _loss_dist import gaussian_inputs, grid_inputs, leaf, rel_err, run_distributed

from rankclip_ds.losses import rankclip_loss
from rankclip_ds.losses.naive import naive_rankclip_loss

TERMS = ("loss", "clip", "cross", "inmodal")


def _worker(rank, world, sizes, configs):
    import torch.distributed as dist

    n = sum(sizes)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    for cfg in configs:
        cfg = dict(cfg)
        data = cfg.pop("data")
        img, txt = grid_inputs(n, seed=n) if data == "grid" else gaussian_inputs(n, seed=n)
        log_s = torch.tensor(math.log(cfg.pop("scale")))
        kw = {"rank_weight": 1.7, "lambda_cross": 1.0, "lambda_in": 0.6, "position_weighting": cfg.pop("pw", None)}
        top_k = cfg.get("top_k")
        # single-process float64 reference on the concatenated global batch
        i, t, ls = leaf(img), leaf(txt), leaf(log_s, torch.float64)
        ref = naive_rankclip_loss(i, t, ls, dtype=torch.float64, top_k=top_k, **kw)
        ref_grads = torch.autograd.grad(ref["loss"], [i, t, ls])
        results = {}
        impls = ("chunked", "naive") if top_k is None else ("top_k",)
        for impl, comm in [(impl, comm) for impl in impls for comm in ("ring", "allgather")]:
            i, t, ls = leaf(img[lo:hi], torch.float32), leaf(txt[lo:hi], torch.float32), leaf(log_s)
            out = rankclip_loss(i, t, ls, impl=impl, comm=comm, group=dist.group.WORLD, **kw, **cfg)
            grads = torch.autograd.grad(out["loss"], [i, t, ls])
            results[(impl, comm)] = (out, grads)
            for k in TERMS:  # global values, identical on every rank
                got, want = float(out[k].detach()), float(ref[k].detach())
                assert abs(got - want) <= 1e-5 * abs(want) + 1e-6, (impl, comm, k, got, want)
                gathered = [torch.zeros(()) for _ in range(world)]
                dist.all_gather(gathered, out[k].detach())
                assert all(torch.equal(g, gathered[0]) for g in gathered), (impl, comm, k, gathered)
            # local embedding gradients = the reference gradient's rows for this rank
            assert rel_err(grads[0], ref_grads[0][lo:hi]) <= 1e-5, (impl, comm, "image", rank)
            assert rel_err(grads[1], ref_grads[1][lo:hi]) <= 1e-5, (impl, comm, "text", rank)
            # logit-scale gradients are shares that sum to the reference
            total = grads[2].detach().double().clone()
            dist.all_reduce(total)
            want = float(ref_grads[2])
            assert abs(float(total) - want) <= 1e-5 * abs(want) + 1e-6, (impl, comm, float(total), want)
        ring, gather = results[(impls[0], "ring")], results[(impls[0], "allgather")]
        assert torch.equal(ring[0]["loss"], gather[0]["loss"])
        for a, b in zip(ring[1], gather[1], strict=True):
            assert rel_err(a, b) <= 1e-6


CONFIGS = [
    {"data": "gaussian", "scale": 14.3, "chunk_size": 3},
    {"data": "grid", "scale": 100.0, "chunk_size": 1, "pw": "log"},
    {"data": "gaussian", "scale": 1.0, "chunk_size": 64},  # chunk_size > b
    {"data": "gaussian", "scale": 14.3, "chunk_size": 2, "top_k": 3},
    {"data": "grid", "scale": 30.0, "chunk_size": 5, "top_k": 100, "pw": "log"},  # K > N: exact
]


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "sizes",
    [pytest.param([6, 6], id="P2"), pytest.param([5, 1, 9], id="P3-unequal"), pytest.param([4, 4, 4, 4], id="P4")],
)
def test_ring_allgather_naive_equal_single_process(sizes):
    run_distributed(_worker, len(sizes), sizes, CONFIGS, timeout=200)


def _subgroup_worker(rank, world):
    """Two data-parallel groups {0, 1} and {2, 3}: the ring must address peers by global rank."""
    import torch.distributed as dist

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    n, half = 10, 5
    img, txt = gaussian_inputs(n, seed=100 + rank // 2)
    lo, hi = (rank % 2) * half, (rank % 2 + 1) * half
    i, t, ls = leaf(img), leaf(txt), leaf(torch.tensor(2.5, dtype=torch.float64))
    ref = naive_rankclip_loss(i, t, ls, rank_weight=2.0, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref["loss"], [i, t])
    for comm in ("ring", "allgather"):
        i, t, ls = leaf(img[lo:hi], torch.float32), leaf(txt[lo:hi], torch.float32), leaf(torch.tensor(2.5))
        out = rankclip_loss(i, t, ls, rank_weight=2.0, comm=comm, chunk_size=2, group=group)
        grads = torch.autograd.grad(out["loss"], [i, t])
        assert abs(float(out["loss"].detach()) - float(ref["loss"].detach())) <= 1e-5 * float(ref["loss"].detach())
        assert rel_err(grads[0], ref_grads[0][lo:hi]) <= 1e-5
        assert rel_err(grads[1], ref_grads[1][lo:hi]) <= 1e-5


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_ring_on_a_subgroup():
    run_distributed(_subgroup_worker, 4, timeout=200)


def _overlap_worker(rank, world, sizes):
    """The overlapped ring does the same arithmetic as the blocking one, only in another place relative to the
    waits: identical values and gradients, bit for bit; and both report the time they spent waiting."""
    import torch.distributed as dist

    from rankclip_ds.losses.chunked import chunked_rankclip_terms
    from rankclip_ds.losses.exchange import WaitClock
    from rankclip_ds.losses.naive import normalise_inputs

    n = sum(sizes)
    lo = sum(sizes[:rank])
    img, txt = gaussian_inputs(n, seed=7)
    results = []
    for overlap in (True, False):
        i, t, ls = (
            leaf(img[lo : lo + sizes[rank]], torch.float32),
            leaf(txt[lo : lo + sizes[rank]], torch.float32),
            leaf(torch.tensor(2.6)),
        )
        clock = WaitClock()
        ni, nt, nls = normalise_inputs(i, t, ls)
        out = chunked_rankclip_terms(
            ni, nt, nls, rank_weight=1.5, lambda_cross=1.0, lambda_in=1.0, comm="ring", chunk_size=2,
            position_weighting=None, group=dist.group.WORLD, backward="fused", block_sizes=sizes, overlap=overlap,
            clock=clock,
        )  # fmt: skip
        grads = torch.autograd.grad(out["loss"], [i, t, ls])
        # P - 1 hops forward (gather) and P - 1 back (reduce-scatter), each one wait
        assert clock.waits == 2 * (world - 1), clock.waits
        results.append((out["loss"].detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_overlapped_and_blocking_ring_agree_bitwise():
    run_distributed(_overlap_worker, 3, [5, 2, 4], timeout=100)
