"""The reference RankCLIP loss: full N x N matrices, plain autograd, easy to read.

Used by the tests and the benchmark as ground truth; it is O(N^2) in memory on every rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .exchange import BlockLayout, block_layout
from .listmle import listmle

__all__ = ["LOGIT_SCALE_MAX", "check_max_logit_scale", "naive_rankclip_loss", "normalise_inputs"]

LOGIT_SCALE_MAX = math.log(100.0)  # default clamp: s = exp(logit_scale) is at most 100 (CLIP's)


def check_max_logit_scale(max_logit_scale) -> float:
    """``max_logit_scale`` (the largest allowed s, not its log) as a float; errors name the value and the fix."""
    if isinstance(max_logit_scale, bool) or not isinstance(max_logit_scale, (int, float)) or not max_logit_scale > 0:
        raise ValueError(
            f"max_logit_scale must be a positive python float (the largest scale s = exp(logit_scale), e.g. 100.0), "
            f"got {max_logit_scale!r}"
        )
    return float(max_logit_scale)


def normalise_inputs(image_emb, text_emb, logit_scale, dtype=torch.float32, max_logit_scale: float = 100.0):
    """Cast to ``dtype``, L2-normalise the rows and clamp ``logit_scale`` to ``ln(max_logit_scale)`` (torch.clamp
    gradient: zero above the clamp, unchanged at or below it).

    Shared by every implementation so that they all see bit-identical normalised features.  The scale stays a 0-d
    tensor on the inputs' device: nothing is read back to the host.
    """
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb and text_emb must both be (b, D) with the same shape, got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    if image_emb.shape[0] == 0:
        raise ValueError("the local batch is empty (b = 0); every rank needs at least one sample")
    if not (image_emb.is_floating_point() and text_emb.is_floating_point()):
        raise TypeError(f"embeddings must be floating point, got {image_emb.dtype} and {text_emb.dtype}")
    if image_emb.device != text_emb.device:
        raise ValueError(
            f"image_emb is on {image_emb.device} but text_emb on {text_emb.device}; put both on one device"
        )
    if not torch.is_tensor(logit_scale) or logit_scale.numel() != 1:
        raise ValueError("logit_scale must be a 1-element tensor holding log(s) (e.g. an nn.Parameter of shape ())")
    if logit_scale.device != image_emb.device:
        raise ValueError(
            f"logit_scale is on {logit_scale.device} but the embeddings on {image_emb.device}; the model's "
            "logit_scale parameter belongs on the embeddings' device"
        )
    max_log = math.log(check_max_logit_scale(max_logit_scale))
    img = F.normalize(image_emb.to(dtype), dim=-1)  # (b, D)
    txt = F.normalize(text_emb.to(dtype), dim=-1)  # (b, D)
    ls = logit_scale.reshape(()).to(dtype).clamp(max=max_log)
    return img, txt, ls


def _gather_with_grad(x: torch.Tensor, layout: BlockLayout, group) -> torch.Tensor:
    """All-gather ``x`` (b_r, D) from every rank (sizes from ``layout``); the local block keeps its autograd history."""
    import torch.distributed as dist

    bmax = max(layout.sizes)
    padded = x.new_zeros(bmax, x.shape[1])
    padded[: x.shape[0]] = x.detach()
    bufs = [torch.empty_like(padded) for _ in range(layout.world)]
    dist.all_gather(bufs, padded, group=group)
    parts = [bufs[r][: layout.sizes[r]] for r in range(layout.world)]
    parts[layout.rank] = x  # gradient flows into the local rows only
    return torch.cat(parts, 0)


def naive_rankclip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    rank_weight: float,
    lambda_cross: float = 1.0,
    lambda_in: float = 1.0,
    position_weighting=None,
    group=None,
    top_k: int | None = None,
    dtype: torch.dtype = torch.float32,
    max_logit_scale: float = 100.0,
    block_sizes=None,
) -> dict[str, torch.Tensor]:
    """Reference implementation of :func:`rankclip_ds.losses.rankclip_loss` (same arguments and outputs).

    Builds the four N x N matrices on every rank.  ``dtype`` (float32 by default, float64 for tests) is the compute
    dtype.  Under a process group the features are all-gathered, the local block keeping its gradient, so each rank
    gets the full gradient of the global loss for its own rows; the logit-scale gradient is divided by the world
    size so that the ranks' shares sum to the single-process gradient (the contract of ``rankclip_loss``).
    """
    img, txt, ls = normalise_inputs(image_emb, text_emb, logit_scale, dtype, max_logit_scale)
    if group is not None:
        layout = block_layout(img.shape[0], group, sizes=block_sizes, device=img.device)
        world = layout.world
        img = _gather_with_grad(img, layout, group)
        txt = _gather_with_grad(txt, layout, group)
        ls = ls / world + (ls * (1.0 - 1.0 / world)).detach()  # same value, gradient share 1/world
    else:
        block_layout(img.shape[0], None, sizes=block_sizes)  # checks block_sizes
    n = img.shape[0]
    s = ls.exp()
    cos_it = img @ txt.T  # (N, N) image i . text j
    cos_ii = img @ img.T  # (N, N)
    cos_tt = txt @ txt.T  # (N, N)
    S, ST, A, B = s * cos_it, s * cos_it.T, s * cos_ii, s * cos_tt
    labels = torch.arange(n, device=img.device)
    clip = 0.5 * (F.cross_entropy(S, labels) + F.cross_entropy(ST, labels))
    # targets order the lists: the unscaled cosines order exactly like s*cos (s > 0), see listmle.py
    cos_it_d, cos_ii_d, cos_tt_d = cos_it.detach(), cos_ii.detach(), cos_tt.detach()
    pw = {"position_weighting": position_weighting, "top_k": top_k}
    cross = listmle(S, cos_it_d.T, **pw) + listmle(ST, cos_it_d, **pw)
    inmodal = listmle(A, cos_tt_d, **pw) + listmle(B, cos_ii_d, **pw)
    loss = clip + float(rank_weight) * (lambda_cross * cross + lambda_in * inmodal) / (32.0 * n)
    return {"loss": loss, "clip": clip.detach(), "cross": cross.detach(), "inmodal": inmodal.detach()}
