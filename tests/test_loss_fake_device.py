"""The loss on a simulated CUDA device: every buffer on the inputs' device, every collective on the group's device,
no host read on the hot path (fake tensors raise on both mistakes), and traceable by ``torch.compile``."""

from __future__ import annotations

import math

import pytest
import torch
from _fake_cuda import CollectiveRecorder, backward, fake_cuda, fake_process_group
from torch._subclasses.fake_tensor import DataDependentOutputException

from rankclip_ds.losses import rankclip_loss

N, D = 10, 8
IMPLS = [
    pytest.param("naive", {}, id="naive"),
    pytest.param("chunked", {"chunk_size": 3}, id="chunked-c3"),
    pytest.param("chunked", {"chunk_size": 3, "position_weighting": "log", "max_logit_scale": 400.0}, id="chunked-log"),
    pytest.param("top_k", {"top_k": 4, "chunk_size": 3}, id="top_k-K4-c3"),
]


def _cuda_inputs(b: int, dtype=torch.float32):
    img = torch.randn(b, D, device="cuda", dtype=dtype, requires_grad=True)
    txt = torch.randn(b, D, device="cuda", dtype=dtype, requires_grad=True)
    log_s = torch.tensor(math.log(14.3), device="cuda").requires_grad_()
    return img, txt, log_s


def _check_on_cuda(out, grads, b, dtype=torch.float32):
    for key, value in out.items():
        assert value.device.type == "cuda", (key, value.device)
        assert value.shape == (), (key, value.shape)
    g_img, g_txt, g_scale = grads
    assert g_img is not None and g_txt is not None and g_scale is not None
    for g in grads:
        assert g.device.type == "cuda", g.device
    assert g_img.shape == (b, D) and g_txt.shape == (b, D) and g_scale.shape == ()
    assert g_img.dtype == dtype and g_txt.dtype == dtype


@pytest.mark.parametrize("impl, kwargs", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_backward_on_a_fake_cuda_device(impl, kwargs, dtype):
    with fake_cuda():
        img, txt, log_s = _cuda_inputs(N, dtype)
        out = rankclip_loss(img, txt, log_s, rank_weight=1.3, impl=impl, **kwargs)
        grads = backward(out["loss"], [img, txt, log_s])
        _check_on_cuda(out, grads, N, dtype)


@pytest.mark.parametrize("impl, kwargs", IMPLS)
@pytest.mark.parametrize("comm", ["ring", "allgather"])
@pytest.mark.parametrize("rank", [0, 2])
def test_every_collective_gets_tensors_on_the_groups_device(monkeypatch, impl, kwargs, comm, rank):
    """A fake 4-rank group (unequal local batches) whose collectives refuse non-CUDA tensors, as NCCL does."""
    sizes = [3, 5, 2, 4]
    with fake_process_group(4, rank) as group:
        recorder = CollectiveRecorder(monkeypatch, "cuda")
        with fake_cuda():
            img, txt, log_s = _cuda_inputs(sizes[rank])
            out = rankclip_loss(
                img, txt, log_s, rank_weight=1.3, impl=impl, comm=comm, group=group, block_sizes=sizes, **kwargs
            )
            grads = backward(out["loss"], [img, txt, log_s])
            _check_on_cuda(out, grads, sizes[rank])
    names = {name for name, _ in recorder.calls}
    assert names, "the loss exchanged nothing across the group"
    if impl != "naive":
        assert ("batch_isend_irecv" in names) == (comm == "ring"), names
    assert all(d.startswith("cuda") for _, devices in recorder.calls for d in devices)


def test_the_recorder_refuses_a_cpu_tensor(monkeypatch):
    """The check above can fail: a CPU tensor handed to a collective of the 'CUDA' group is refused."""
    import torch.distributed as dist

    with fake_process_group(2, 0):
        CollectiveRecorder(monkeypatch, "cuda")
        with pytest.raises(RuntimeError, match="must be cuda tensors"):
            dist.all_reduce(torch.zeros(2))


def test_unknown_block_sizes_are_the_one_host_read(monkeypatch):
    """Without ``block_sizes`` the ranks agree on them: one all_reduce on the device, then one host read (the only
    sync of the loss, documented in docs/loss.md). Everything after it is covered by the tests above."""
    with fake_process_group(4, 1) as group:
        recorder = CollectiveRecorder(monkeypatch, "cuda")
        with fake_cuda():
            img, txt, log_s = _cuda_inputs(3)
            with pytest.raises(DataDependentOutputException) as info:
                rankclip_loss(img, txt, log_s, rank_weight=1.0, group=group)
    assert recorder.calls == [("all_reduce", ["cuda:0"])]
    frames = [f.name for f in info.traceback]
    assert "block_layout" in frames, frames


@pytest.mark.parametrize(
    "sizes, match",
    [([3, 3], "must list the local batch of each of the 4 ranks"), ([3, 4, 3, 3], "entry 1"), ([3, 3, 0, 3], ">= 1")],
)
def test_block_sizes_are_checked(sizes, match):
    with fake_process_group(4, 1) as group, pytest.raises(ValueError, match=match):
        rankclip_loss(torch.randn(3, D), torch.randn(3, D), torch.tensor(2.0), rank_weight=1.0, group=group,
                      block_sizes=sizes)  # fmt: skip


def test_embeddings_and_scale_on_different_devices_are_refused():
    with fake_cuda():
        img, txt, _ = _cuda_inputs(4)
        with pytest.raises(ValueError, match="logit_scale is on cpu but the embeddings on cuda"):
            rankclip_loss(img, txt, torch.tensor(2.0), rank_weight=1.0)


@pytest.mark.parametrize("impl, kwargs", IMPLS)
def test_compiles_as_one_graph(impl, kwargs):
    """``fullgraph=True`` fails on any graph break, which is what a host read (``float(t)``, ``.item()``) causes."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)

    def loss_and_grads(i, t, ls):
        i, t, ls = (x.detach().requires_grad_() for x in (i, t, ls))
        out = rankclip_loss(i, t, ls, rank_weight=1.3, impl=impl, **kwargs)["loss"]
        return out, torch.autograd.grad(out, [i, t, ls])

    def loss(i, t, ls):
        return rankclip_loss(i, t, ls, rank_weight=1.3, impl=impl, **kwargs)["loss"]

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    log_s = torch.tensor(math.log(14.3))
    want, want_grads = loss_and_grads(img, txt, log_s)
    i, t, ls = (x.clone().requires_grad_() for x in (img, txt, log_s))
    got = compiled(i, t, ls)
    got_grads = torch.autograd.grad(got, [i, t, ls])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("comm", ["ring", "allgather"])
def test_under_a_group_the_graph_breaks_only_at_the_collectives(comm):
    """Dynamo does not trace point-to-point ops, asynchronous collectives or their ``Work.wait``; every other op
    compiles (a host read would add a break of another kind)."""
    torch._dynamo.reset()
    with fake_process_group(4, 1) as group:

        def loss(i, t, ls):
            return rankclip_loss(i, t, ls, rank_weight=1.0, comm=comm, chunk_size=2, group=group,
                                 block_sizes=[3, 3, 3, 3])["loss"]  # fmt: skip

        explained = torch._dynamo.explain(loss)(torch.randn(3, D), torch.randn(3, D), torch.tensor(2.0))
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert reasons, "expected breaks at the collectives"
    collective = ("P2P", "async_op", "distributed", "Work")
    assert all(any(word in r for word in collective) for r in reasons), reasons
