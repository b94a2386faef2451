"""Chunked RankCLIP loss: local rows only, c rows at a time, gradient formed in the forward pass.

Per chunk of ``c`` local rows the four score rows of every sample come out of ONE matrix product::

    R_c   = [I_c; T_c]                    (2c, D)      local rows
    K_all = [T_all; I_all]                (2N, D)      every rank's rows, global order
    M     = R_c K_allᵀ  viewed (2, c, 2, N):  M[0,:,0] = I_c T_allᵀ  (S rows)     M[0,:,1] = I_c I_allᵀ (A rows)
                                             M[1,:,0] = T_c T_allᵀ  (B rows)     M[1,:,1] = T_c I_allᵀ (Sᵀ rows)

The target of score row ``M[a, i, b]`` is its partner ``M[1-a, i, 1-b]`` (S is ordered by Sᵀ, A by B, ...), so one
stable argsort of M's 4c rows, flipped on axes 0 and 2, orders all four lists.  The ListMLE gradient of every
sorted row comes from the closed form (see ``listmle.sorted_rows_loss_grad``), InfoNCE's from the softmax of the
full row; both are scattered into ``G`` (2c, 2N) and turned into feature gradients by two more products::

    dR_c   = s G K_all        (2c, D)   local rows
    dK_all += s Gᵀ R_c        (2N, D)   every rank's rows, sent back to their owners after the loop

``backward`` then only multiplies the saved ``(b, D)`` gradients by the incoming scalar: one pass, no recompute, no
second sort, and no b x N tensor is alive across chunks (nothing of size N x N anywhere).  ``backward="recompute"``
runs the loop twice instead (values only in forward, the same loop again in backward), the flash-attention /
Inf-CL pattern; it exists to be measured against the fused default (docs/loss.md).
"""

from __future__ import annotations

import torch

from .exchange import BlockLayout, block_layout, gather_blocks, reduce_scatter_blocks
from .listmle import position_weights, sorted_rows_loss_grad

__all__ = ["chunked_rankclip_terms", "default_chunk_size"]

_WORKSPACE_ELEMENTS = 1 << 19  # default c: c * N <= 2^19, ~100 MB of per-chunk workspace (see memory.py)


def default_chunk_size(n: int, b: int) -> int:
    """Default rows per chunk: ``clamp(2^19 // N, 1, b)``: the per-chunk workspace stays ~100 MB for any N."""
    return max(1, min(b, _WORKSPACE_ELEMENTS // max(n, 1)))


def _check_chunk_size(chunk_size, n: int, b: int) -> int:
    if chunk_size is None:
        return default_chunk_size(n, b)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    return min(chunk_size, b)


def _chunk_loop(r_local, k_all, offset, s, coef, mu, chunk, need_grad):
    """Run the chunk loop over the local rows.

    Args:
        r_local: ``(2, b, D)`` normalised ``[I_r; T_r]``.  k_all: ``(2N, D)`` ``[T_all; I_all]``.
        offset: global index of the first local row.  s: python float scale.
        coef: ``(2, 1, 2, 1)`` float32 weight of each list's per-row gradient (already divided by N).
        mu: position weights ``(N,)`` or None.  chunk: rows per chunk.  need_grad: form the gradients too.

    Returns:
        ``sums`` float64 ``[sum CE, sum cross rows, sum in-modal rows]``, and if ``need_grad``: ``dr`` ``(2, b, D)``,
        ``dk`` ``(2N, D)``, ``dlog`` (python float, gradient w.r.t. log s).
    """
    _, b, d = r_local.shape
    n = k_all.shape[0] // 2
    sums = torch.zeros(3, dtype=torch.float64)
    dr = torch.zeros_like(r_local) if need_grad else None  # (2, b, D)
    dk = torch.zeros_like(k_all) if need_grad else None  # (2N, D)
    dlog = 0.0
    shift = s if 2.0 * s <= 600.0 else None  # |cos| <= 1, so scores lie in [-s, s]: linear space is exact
    for i0 in range(0, b, chunk):
        i1 = min(i0 + chunk, b)
        c = i1 - i0
        rc = r_local[:, i0:i1].reshape(2 * c, d)  # (2c, D) [I_c; T_c]
        m = (rc @ k_all.T).view(2, c, 2, n)  # (2, c, 2, N) unscaled cosines
        # ---- InfoNCE rows: S rows are m[0,:,0], Sᵀ rows are m[1,:,1]; positives on the global diagonal
        diag = torch.arange(offset + i0, offset + i1)
        ce_rows = torch.stack([m[0, :, 0], m[1, :, 1]]).mul_(s)  # (2, c, N) scores
        lse = torch.logsumexp(ce_rows, dim=-1, keepdim=True)  # (2, c, 1)
        pos = ce_rows[:, torch.arange(c), diag]  # (2, c)
        sums[0] += (lse.squeeze(-1) - pos).double().sum()
        # ---- ListMLE: the target of score row m[a,i,b] is m[1-a,i,1-b]; one stable argsort orders all four lists
        idx = torch.argsort(m.flip(0, 2), dim=-1, descending=True, stable=True)  # (2, c, 2, N)
        z = torch.gather(m, -1, idx).double().mul_(s)  # (2, c, 2, N) scores in target order, float64
        row_loss, g_sorted = sorted_rows_loss_grad(z, mu, shift=shift)  # (2, c, 2), (2, c, 2, N)
        del z
        sums[1] += row_loss[0, :, 0].sum() + row_loss[1, :, 1].sum()  # S|Sᵀ and Sᵀ|S
        sums[2] += row_loss[0, :, 1].sum() + row_loss[1, :, 0].sum()  # A|B and B|A
        if not need_grad:
            continue
        # dL/dM = s * dL/dscore: the factor s is folded into coef and the InfoNCE weight
        g = torch.empty_like(m).scatter_(-1, idx, g_sorted.mul_(coef * s))  # (2, c, 2, N) original order
        del idx, g_sorted
        ce_grad = ce_rows.sub_(lse).exp_().mul_(0.5 * s / n)  # (2, c, N) s * softmax / 2N
        ce_grad[:, torch.arange(c), diag] -= 0.5 * s / n
        g[0, :, 0] += ce_grad[0]
        g[1, :, 1] += ce_grad[1]
        del ce_grad, ce_rows
        dlog += float(torch.dot(g.view(-1), m.view(-1)))  # d/d log s = sum_score score * dL/dscore = sum M dL/dM
        g2 = g.view(2 * c, 2 * n)  # (2c, 2N) dL/dM
        del m
        dr[:, i0:i1] = (g2 @ k_all).view(2, c, d)
        dk.addmm_(g2.T, rc)
        del g, g2
    return sums, dr, dk, dlog


class _ChunkedRankClip(torch.autograd.Function):
    """Inputs: normalised float32 ``img, txt`` (b, D) and the clamped 0-d ``log s``; outputs four 0-d terms."""

    @staticmethod
    def forward(ctx, img, txt, log_s, opts):
        layout: BlockLayout = opts["layout"]
        n = layout.n
        s = float(log_s.exp())
        w, lc, li = opts["rank_weight"], opts["lambda_cross"], opts["lambda_in"]
        alpha = w / (32.0 * n)
        # per-row ListMLE gradient weight (d L / d row_loss = alpha * lambda / N) for lists S, A, B, Sᵀ
        coef = torch.tensor([[lc, li], [li, lc]], dtype=torch.float32).view(2, 1, 2, 1) * (alpha / n)
        mu = position_weights(n, opts["position_weighting"])
        with torch.no_grad():
            r_local = torch.stack([img, txt])  # (2, b, D)
            k_all = gather_blocks(torch.cat([txt, img], 0), layout, opts["group"], opts["comm"])  # (2N, D)
            offset = layout.offsets[layout.rank]
            fused = opts["backward"] == "fused"
            sums, dr, dk, dlog = _chunk_loop(r_local, k_all, offset, s, coef, mu, opts["chunk"], fused)
            if fused:
                dr += _remote_grads(dk, layout, opts)
            if opts["group"] is not None and layout.world > 1:
                import torch.distributed as dist

                dist.all_reduce(sums, group=opts["group"])
        clip = sums[0] / (2 * n)
        cross, inmodal = sums[1] / n, sums[2] / n
        loss = clip + alpha * (lc * cross + li * inmodal)
        if fused:
            ctx.save_for_backward(dr, torch.tensor(dlog, dtype=torch.float64))
        else:
            ctx.save_for_backward(r_local, k_all)
        ctx.opts = dict(opts, s=s, coef=coef, mu=mu)
        outs = tuple(t.float() for t in (loss, clip, cross, inmodal))
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        opts = ctx.opts
        if opts["backward"] == "fused":
            dr, dlog = ctx.saved_tensors
        else:
            r_local, k_all = ctx.saved_tensors
            layout = opts["layout"]
            with torch.no_grad():
                offset = layout.offsets[layout.rank]
                _, dr, dk, dlog = _chunk_loop(
                    r_local, k_all, offset, opts["s"], opts["coef"], opts["mu"], opts["chunk"], True
                )
                dr += _remote_grads(dk, layout, opts)
                dlog = torch.tensor(dlog, dtype=torch.float64)
        g = grad_loss.float()
        return dr[0] * g, dr[1] * g, (dlog * g).float(), None


def _remote_grads(dk: torch.Tensor, layout: BlockLayout, opts) -> torch.Tensor:
    """Sum the ``[dT; dI]`` accumulators of every rank for this rank's rows; return them as ``(2, b, D)`` [dI; dT]."""
    mine = reduce_scatter_blocks(dk, layout, opts["group"], opts["comm"])  # (2b, D) [dT_r; dI_r]
    b = mine.shape[0] // 2
    return torch.stack([mine[b:], mine[:b]])


def chunked_rankclip_terms(
    img, txt, log_s, *, rank_weight, lambda_cross, lambda_in, comm, chunk_size, position_weighting, group, backward
):
    """Chunked loss on normalised float32 ``img, txt`` (b, D) and clamped ``log_s``; returns the output dict."""
    layout = block_layout(img.shape[0], group)
    opts = {
        "layout": layout,
        "rank_weight": float(rank_weight),
        "lambda_cross": float(lambda_cross),
        "lambda_in": float(lambda_in),
        "comm": comm,
        "chunk": _check_chunk_size(chunk_size, layout.n, img.shape[0]),
        "position_weighting": position_weighting,
        "group": group,
        "backward": backward,
    }
    loss, clip, cross, inmodal = _ChunkedRankClip.apply(img, txt, log_s, opts)
    return {"loss": loss, "clip": clip, "cross": cross, "inmodal": inmodal}
