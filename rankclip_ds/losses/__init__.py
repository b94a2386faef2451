"""The RankCLIP loss family: CLIP InfoNCE + ListMLE ranking-consistency terms, exact and chunked across ranks.

Public API: :func:`rankclip_loss`, :func:`listmle`, :func:`memory_model`, :func:`epoch_rank_weight`,
:func:`step_rank_weight`.  Maths, tie-break, log base and measurements: ``docs/loss.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .chunked import chunked_rankclip_terms, default_chunk_size
from .exchange import COMMS
from .listmle import listmle
from .memory import memory_model
from .naive import LOGIT_SCALE_MAX, check_max_logit_scale, naive_rankclip_loss, normalise_inputs
from .schedule import epoch_rank_weight, step_rank_weight
from .topk import topk_rankclip_terms

__all__ = [
    "IMPLS",
    "LOGIT_SCALE_MAX",
    "default_chunk_size",
    "epoch_rank_weight",
    "listmle",
    "memory_model",
    "rankclip_loss",
    "step_rank_weight",
]

IMPLS = ("chunked", "naive", "top_k")


def rankclip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    rank_weight: float,
    lambda_cross: float = 1.0,
    lambda_in: float = 1.0,
    impl: str = "chunked",
    comm: str = "ring",
    chunk_size: int | None = None,
    top_k: int | None = None,
    position_weighting: str | None = None,
    group=None,
    max_logit_scale: float = 100.0,
    block_sizes: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """RankCLIP loss ``L = L_clip + w (lambda_cross L_cross + lambda_in L_in) / (32 N)`` of the global batch.

    Args:
        image_emb, text_emb: this rank's LOCAL embeddings ``(b, D)``, any float dtype, NOT normalised: they are cast
            to float32 and L2-normalised inside (``F.normalize``), and every computation runs in float32 (sums of
            row losses in float64), whatever the input dtype.  Gradients come back in the input dtype.
            Ranks may hold different ``b``; ``N`` is the sum over ranks.
        logit_scale: 0-d (or 1-element) tensor holding ``log s``, on the embeddings' device.  It is clamped to
            ``ln(max_logit_scale)`` in the forward with ``torch.clamp`` semantics: above the clamp its gradient is
            zero, at or below it passes unchanged.  It stays a device tensor: its value is never read by the host.
        rank_weight: ``w(t)``, a python float (see :func:`epoch_rank_weight`, :func:`step_rank_weight`).
        lambda_cross, lambda_in: weights of the cross-modal and in-modal ListMLE terms (either may be 0).
        impl: ``"chunked"`` (exact, O(c N) workspace; the default), ``"naive"`` (full N x N reference) or
            ``"top_k"`` (ListMLE over the first ``top_k`` positions of each target order, full denominators,
            streaming over column blocks).
        comm: ``"ring"`` (point-to-point ring, the default) or ``"allgather"``; ignored without a group.
        chunk_size: local rows per chunk (``None``: ``min(b, 2^19 // N)``); values above ``b`` are clipped to b.
        top_k: K for ``impl="top_k"`` (``1 <= K``; ``K >= N`` is the exact loss).  Must be None otherwise.
        position_weighting: None or ``"log"`` (``mu_k = 1/log2(k+1)``, base 2).
        group: the data-parallel process group, or None for a single process (``torch.distributed`` unused).
            Every tensor handed to it lives on the embeddings' device (for NCCL: the rank's GPU).
        max_logit_scale: the largest allowed scale ``s`` (not its log); the model's ``max_logit_scale``.
        block_sizes: every rank's local batch size, in group-rank order, when the caller knows them (the trainer:
            the micro-batch rows of each rank).  ``None`` agrees on them with one small ``all_reduce`` and one host
            read per call: the only host sync of the loss (``docs/loss.md``).  Ignored without a group, except that
            it must then be ``[b]``.

    Returns:
        Dict of 0-d float32 tensors, all GLOBAL values (identical on every rank): ``loss`` (the only
        differentiable entry), ``clip`` (``L_clip``), ``cross`` and ``inmodal`` (``L_cross`` and ``L_in``
        UNWEIGHTED, i.e. before ``w / (32 N)`` and the lambdas), and ``scale`` (the clamped ``s``).

    Gradient contract under a process group: each rank's gradient w.r.t. its local ``image_emb``/``text_emb`` equals
    the single-process gradient of the global loss for those rows; each rank's ``logit_scale`` gradient is that
    rank's share, the shares summing to the single-process gradient.  So a SUM all-reduce of parameter gradients
    reproduces single-process training exactly; with DeepSpeed's default MEAN all-reduce (gradients divided by the
    world size) multiply the loss by the world size before ``backward``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if comm not in COMMS:
        raise ValueError(f"comm must be one of {COMMS}, got {comm!r}")
    if impl != "top_k" and top_k is not None:
        raise ValueError(f"top_k={top_k!r} is only used by impl='top_k'; pass impl='top_k' or top_k=None")
    if impl == "top_k" and (top_k is None or isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"impl='top_k' needs a positive int top_k (positions kept per list), got {top_k!r}")
    if position_weighting not in (None, "log"):
        raise ValueError(f"position_weighting must be None or 'log', got {position_weighting!r}")
    for name, value in (("rank_weight", rank_weight), ("lambda_cross", lambda_cross), ("lambda_in", lambda_in)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a python float, got {type(value).__name__} ({value!r})")
    max_logit_scale = check_max_logit_scale(max_logit_scale)
    kwargs = {
        "max_logit_scale": max_logit_scale,
        "block_sizes": block_sizes,
        "rank_weight": rank_weight,
        "lambda_cross": lambda_cross,
        "lambda_in": lambda_in,
        "comm": comm,
        "chunk_size": chunk_size,
        "position_weighting": position_weighting,
        "group": group,
    }
    # autocast would run the products in bf16/fp16: the loss is float32 by contract, whatever the context
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        out = _dispatch(image_emb, text_emb, logit_scale, impl, top_k, **kwargs)
    out["scale"] = logit_scale.detach().reshape(()).float().clamp(max=math.log(max_logit_scale)).exp()
    return out


def _dispatch(image_emb, text_emb, logit_scale, impl, top_k, **kwargs):
    if impl == "naive":
        kwargs.pop("comm")
        kwargs.pop("chunk_size")
        return naive_rankclip_loss(image_emb, text_emb, logit_scale, **kwargs)
    img, txt, log_s = normalise_inputs(image_emb, text_emb, logit_scale, max_logit_scale=kwargs["max_logit_scale"])
    if impl == "chunked":
        return chunked_rankclip_terms(img, txt, log_s, backward="fused", **kwargs)
    kwargs.pop("max_logit_scale")  # top-K works in log space, valid for any scale
    return topk_rankclip_terms(img, txt, log_s, top_k=top_k, **kwargs)
