"""Predicted peak memory of the RankCLIP loss per rank, in bytes (forward + backward).

What is counted: every buffer the loss itself allocates, at its peak, on one rank: the normalised local features,
the exchanged ``K_all = [T_all; I_all]`` and its gradient accumulator, the local gradients, and the per-chunk
workspace.  Not counted: the caller's input embeddings and parameters, the encoders, the CUDA/CPU runtime.

The per-element constants are counted from the code and checked by measurement (``tools/bench_loss.py``,
``tests/test_loss_memory.py``):

* chunked, per chunk of c rows: ``4 c N`` list entries (4 lists x c rows x N columns), each holding ~46 bytes at
  the peak of the closed-form kernel: the float32 cosines (4), the int64 sort order (8), the float64 sorted scores
  (8), float64 exp / suffix sums / their log (3 x 8, the flip temporary reuses a freed buffer) and the InfoNCE
  rows (2).  Features: ``K_all`` and its gradient (``2 x 2N x D`` float32) plus ~6 ``b x D`` float32 local buffers
  alive at once (normalised features, the stacked local rows, their gradients).
* top_k: per chunk ``4 c (K + w)`` candidate entries (w = 2048 block columns) at ~40 bytes (targets, scores,
  int64 indices and sort order), plus ``4 c w`` block entries at ~24 bytes; same feature buffers.
* naive: ~142 bytes per N x N entry (3 cosine and 4 score matrices, 2 log-softmax, and per ListMLE list the int64
  order, the sorted row, its flip, the logcumsumexp output and the terms, kept by autograd), plus features.
"""

from __future__ import annotations

import torch

__all__ = ["memory_model"]

_CHUNK_BYTES_PER_ENTRY = 46
_TOPK_BYTES_PER_CANDIDATE = 40
_TOPK_BYTES_PER_BLOCK_ENTRY = 24
_NAIVE_BYTES_PER_ENTRY = 142
_LOCAL_FEATURE_BUFFERS = 6
_TOPK_BLOCK_COLUMNS = 2048


def memory_model(
    N: int,
    P: int,
    D: int,
    chunk_size: int,
    top_k: int | None = None,
    dtype: torch.dtype = torch.float32,
    impl: str = "chunked",
) -> int:
    """Predicted peak bytes allocated by the loss on one rank (forward + backward), see the module docstring.

    Args:
        N: global batch; P: number of ranks (local batch ``b = ceil(N / P)``); D: embedding dim.
        chunk_size: rows per chunk c (clipped to b).  top_k: K for ``impl="top_k"``.
        dtype: the input embeddings' dtype (the compute is float32 whatever it is; a non-float32 input adds its
            float32 copies).  impl: ``"chunked"``, ``"top_k"`` or ``"naive"``.
    """
    for name, value in (("N", N), ("P", P), ("D", D), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if impl not in ("chunked", "top_k", "naive"):
        raise ValueError(f"impl must be 'chunked', 'top_k' or 'naive', got {impl!r}")
    b = -(-N // P)
    c = min(chunk_size, b)
    f32 = 4
    local = _LOCAL_FEATURE_BUFFERS * b * D * f32
    if dtype != torch.float32:
        local += 2 * b * D * f32  # float32 copies of the inputs
    if impl == "naive":
        return int(_NAIVE_BYTES_PER_ENTRY * N * N + 4 * N * D * f32 + local)
    exchanged = 2 * (2 * N * D * f32)  # K_all and its gradient accumulator, (2N, D) each
    if impl == "chunked":
        return int(exchanged + local + _CHUNK_BYTES_PER_ENTRY * 4 * c * N)
    if top_k is None or top_k <= 0:
        raise ValueError(f"impl='top_k' needs a positive top_k, got {top_k!r}")
    k = min(top_k, N)
    w = min(_TOPK_BLOCK_COLUMNS, N)
    work = _TOPK_BYTES_PER_CANDIDATE * 4 * c * (k + w) + _TOPK_BYTES_PER_BLOCK_ENTRY * 4 * c * w
    return int(exchanged + local + work)
