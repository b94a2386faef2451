"""Memory: no N x N allocation in the chunked loss (profiler), and the memory model against measurement."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from rankclip_ds.losses import memory_model, rankclip_loss


def largest_allocation_bytes(fn) -> int:
    """Largest memory allocated by a single op (self, profiler with profile_memory=True) while running ``fn``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("impl", ["chunked", "top_k"])
def test_no_n_by_n_allocation(impl):
    n, d, c = 512, 16, 8
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(n, d, generator=gen, requires_grad=True)
    txt = torch.randn(n, d, generator=gen, requires_grad=True)
    log_s = torch.tensor(2.0, requires_grad=True)
    extra = {"top_k": 16} if impl == "top_k" else {}

    def step(impl=impl, extra=extra, chunk=c):
        out = rankclip_loss(img, txt, log_s, rank_weight=2.0, impl=impl, chunk_size=chunk, **extra)
        out["loss"].backward()

    biggest = largest_allocation_bytes(step)
    # one op (the argsort: values + int64 indices of 4 lists) allocates ~12 float32-sized words per (row, column)
    assert biggest < 16 * c * n * 4, biggest
    naive = largest_allocation_bytes(lambda: step(impl="naive", extra={}, chunk=None))
    assert naive >= n * n * 4  # the measurement does see an N x N buffer when there is one


def test_memory_model_shape():
    base = memory_model(8192, 1, 256, 64)
    assert memory_model(8192, 1, 256, 128) > base  # grows with c
    assert memory_model(8192, 8, 256, 64) < base  # fewer local rows
    assert memory_model(8192, 1, 256, 64, dtype=torch.bfloat16) > base  # float32 copies of the inputs
    assert memory_model(8192, 1, 256, 10**9) == memory_model(8192, 1, 256, 8192)  # c is clipped to b
    assert memory_model(32768, 1, 64, 16) < 2 * 2**30  # the target: chunked fits in 2 GiB at N = 32k
    assert memory_model(32768, 1, 64, 32768, impl="naive") > 24 * 2**30  # naive does not fit in 24 GiB
    assert memory_model(1 << 20, 1024, 1024, 512, top_k=128, impl="top_k") < memory_model(1 << 20, 1024, 1024, 512)
    with pytest.raises(ValueError, match="chunk_size"):
        memory_model(8, 1, 4, 0)
    with pytest.raises(ValueError, match="impl"):
        memory_model(8, 1, 4, 1, impl="ring")
    with pytest.raises(ValueError, match="top_k"):
        memory_model(8, 1, 4, 1, impl="top_k")


def profiled_peak_bytes(fn) -> int:
    """Peak of live tensor bytes: the profiler's allocation/free records replayed in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    ("impl", "n", "chunk", "top_k"),
    [("chunked", 2048, 256, None), ("naive", 1024, None, None), ("top_k", 1024, 64, 64)],
)
def test_memory_model_matches_measurement(impl, n, chunk, top_k):
    """The measured peak (forward + backward) is within 25% of memory_model's prediction."""
    d = 128
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(n, d, generator=gen, requires_grad=True)
    txt = torch.randn(n, d, generator=gen, requires_grad=True)
    log_s = torch.tensor(2.6, requires_grad=True)

    def step():
        extra = {"top_k": top_k} if impl == "top_k" else {}
        out = rankclip_loss(img, txt, log_s, rank_weight=2.0, impl=impl, chunk_size=chunk, **extra)
        out["loss"].backward()

    measured = profiled_peak_bytes(step)
    predicted = memory_model(n, 1, d, chunk or n, top_k=top_k, impl=impl)
    assert abs(measured - predicted) <= 0.25 * predicted, (measured, predicted)
