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

Overlap with the exchange: the first chunk's ``M`` is assembled block by block while the ring delivers ``K_all``,
and the last chunk's ``dK_all`` contribution is formed per owner inside the reduce-scatter, while its hops are in
flight (exchange.py).  On the device: the scale stays a 0-d tensor and nothing is read back to the host in the
loop; the only host read of a call is the agreement on the block sizes when the caller does not pass them.
"""

from __future__ import annotations

import torch

from .exchange import BlockLayout, WaitClock, block_layout, gather_blocks, reduce_scatter_blocks
from .listmle import position_weights, sorted_rows_loss_grad

__all__ = ["chunked_rankclip_terms", "default_chunk_size", "linear_space_ok"]

_WORKSPACE_ELEMENTS = 1 << 19  # default c: c * N <= 2^19, ~100 MB of per-chunk workspace (see memory.py)
_LINEAR_SPACE_SPAN = 600.0  # float64 exp(-600) > 1e-261: no underflow when every score lies within 600 of the shift


def default_chunk_size(n: int, b: int) -> int:
    """Default rows per chunk: ``clamp(2^19 // N, 1, b)``: the per-chunk workspace stays ~100 MB for any N."""
    return max(1, min(b, _WORKSPACE_ELEMENTS // max(n, 1)))


def linear_space_ok(max_logit_scale: float) -> bool:
    """Whether ListMLE's float64 linear-space kernel is exact for every scale up to ``max_logit_scale``.

    Scores lie in ``[-s, s]``, so shifting by ``s`` keeps every ``exp`` above ``exp(-2 s)``; the kernel is chosen from
    the configured maximum (a python float), never from the scale's current value, which stays on the device."""
    return 2.0 * max_logit_scale <= _LINEAR_SPACE_SPAN


def _check_chunk_size(chunk_size, n: int, b: int) -> int:
    if chunk_size is None:
        return default_chunk_size(n, b)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    return min(chunk_size, b)


def _chunk_bounds(b: int, chunk: int) -> list[tuple[int, int]]:
    return [(i0, min(i0 + chunk, b)) for i0 in range(0, b, chunk)]


def _chunk(rc, m, k_all, row0, s, coef, mu, shift, need_grad):
    """Values (and gradients) of one chunk of ``c`` local rows.

    Args:
        rc: ``(2c, D)`` ``[I_c; T_c]``.  m: ``(2c, 2N)`` ``rc @ K_allᵀ`` if already computed (the first chunk's
            products are formed while the ring delivers the blocks), else None.  k_all: ``(2N, D)``.
        row0: global index of the chunk's first row.  s: 0-d float32 scale (a device tensor, never read back).
        coef: ``(2, 1, 2, 1)`` weight of each list's per-row gradient (already divided by N).  mu: ``(N,)`` or None.
        shift: the linear-space shift (``s``) or None for the log-space kernel.

    Returns:
        ``sums`` float64 ``(3,)`` [sum CE, sum cross rows, sum in-modal rows] and, if ``need_grad``, ``g2`` (2c, 2N)
        dL/dM and ``dlog`` (0-d float64, this chunk's part of dL/d log s); else ``None, None``.
    """
    c, n = rc.shape[0] // 2, k_all.shape[0] // 2
    if m is None:
        m = rc @ k_all.T  # (2c, 2N)
    m = m.view(2, c, 2, n)  # unscaled cosines
    rows = torch.arange(c, device=rc.device)
    diag = rows + row0  # (c,) global column of each row's positive
    # ---- InfoNCE rows: S rows are m[0,:,0], Sᵀ rows are m[1,:,1]; positives on the global diagonal
    ce_rows = torch.stack([m[0, :, 0], m[1, :, 1]]).mul_(s)  # (2, c, N) scores
    lse = torch.logsumexp(ce_rows, dim=-1, keepdim=True)  # (2, c, 1)
    ce_sum = (lse.squeeze(-1) - ce_rows[:, rows, diag]).double().sum()  # sum of the InfoNCE row losses
    # ---- ListMLE: the target of score row m[a,i,b] is m[1-a,i,1-b]; one stable argsort orders all four lists
    idx = torch.argsort(m.flip(0, 2), dim=-1, descending=True, stable=True)  # (2, c, 2, N)
    z = torch.gather(m, -1, idx).double().mul_(s)  # (2, c, 2, N) scores in target order, float64
    row_loss, g_sorted = sorted_rows_loss_grad(z, mu, shift=shift)  # (2, c, 2), (2, c, 2, N)
    del z
    cross = row_loss[0, :, 0].sum() + row_loss[1, :, 1].sum()  # S|Sᵀ and Sᵀ|S
    inmodal = row_loss[0, :, 1].sum() + row_loss[1, :, 0].sum()  # A|B and B|A
    sums = torch.stack([ce_sum, cross, inmodal])  # (3,) float64
    if not need_grad:
        return sums, None, None
    # dL/dM = s * dL/dscore: the factor s is folded into coef and the InfoNCE weight
    g = torch.empty_like(m).scatter_(-1, idx, g_sorted.mul_(coef * s))  # (2, c, 2, N) original order
    del idx, g_sorted
    half = s * (0.5 / n)  # 0-d: InfoNCE weight s / 2N
    ce_grad = ce_rows.sub_(lse).exp_().mul_(half)  # (2, c, N) s * softmax / 2N
    ce_grad[:, rows, diag] -= half
    g[0, :, 0] += ce_grad[0]
    g[1, :, 1] += ce_grad[1]
    del ce_grad, ce_rows
    dlog = torch.dot(g.view(-1), m.reshape(-1)).double()  # d/d log s = sum_score score * dL/dscore = sum M dL/dM
    return sums, g.view(2 * c, 2 * n), dlog


def _chunk_loop(r_local, k_all, offset, s, coef, mu, shift, chunk, need_grad, first_m=None, defer_last=False):
    """Run the chunk loop over the local rows.

    Args:
        r_local: ``(2, b, D)`` normalised ``[I_r; T_r]``.  k_all: ``(2N, D)`` ``[T_all; I_all]``.
        offset: global index of the first local row.  s, coef, mu, shift: see :func:`_chunk`.
        chunk: rows per chunk.  need_grad: form the gradients too.
        first_m: a list holding the first chunk's ``(2c, 2N)`` products if already formed (popped when used, so
            that they are freed with the chunk).
        defer_last: leave the last chunk's ``dK`` contribution out of ``dk`` and return ``(g2, rc)`` instead, so
            that the reduce-scatter can form it per owner while its hops are in flight.

    Returns:
        ``sums`` float64 ``[sum CE, sum cross rows, sum in-modal rows]``, and if ``need_grad``: ``dr`` ``(2, b, D)``,
        ``dk`` ``(2N, D)``, ``dlog`` (0-d float64 tensor, gradient w.r.t. log s) and the deferred ``(g2, rc)`` or None.
    """
    _, b, d = r_local.shape
    sums = torch.zeros(3, dtype=torch.float64, device=r_local.device)
    dr = torch.zeros_like(r_local) if need_grad else None  # (2, b, D)
    dk = torch.zeros_like(k_all) if need_grad else None  # (2N, D)
    dlog = torch.zeros((), dtype=torch.float64, device=r_local.device) if need_grad else None
    deferred = None
    bounds = _chunk_bounds(b, chunk)
    for j, (i0, i1) in enumerate(bounds):
        c = i1 - i0
        rc = r_local[:, i0:i1].reshape(2 * c, d)  # (2c, D) [I_c; T_c]
        m = first_m.pop() if j == 0 and first_m else None
        part, g2, dl = _chunk(rc, m, k_all, offset + i0, s, coef, mu, shift, need_grad)
        del m
        sums += part
        if not need_grad:
            continue
        dlog += dl
        dr[:, i0:i1] = (g2 @ k_all).view(2, c, d)
        if defer_last and j == len(bounds) - 1:
            deferred = (g2, rc)
        else:
            dk.addmm_(g2.T, rc)
        del g2
    return sums, dr, dk, dlog, deferred


class _ChunkedRankClip(torch.autograd.Function):
    """Inputs: normalised float32 ``img, txt`` (b, D) and the clamped 0-d ``log s``; outputs four 0-d terms."""

    @staticmethod
    def forward(ctx, img, txt, log_s, opts):
        layout: BlockLayout = opts["layout"]
        n, b, d = layout.n, img.shape[0], img.shape[1]
        s = log_s.detach().exp()  # 0-d float32 on the device: never read back to the host
        shift = s if opts["linear_space"] else None
        w, lc, li = opts["rank_weight"], opts["lambda_cross"], opts["lambda_in"]
        alpha = w / (32.0 * n)
        # per-row ListMLE gradient weight (d L / d row_loss = alpha * lambda / N) for lists S, A, B, Sᵀ
        coef = torch.tensor([[lc, li], [li, lc]], dtype=torch.float32, device=img.device).view(2, 1, 2, 1) * (alpha / n)
        mu = position_weights(n, opts["position_weighting"], device=img.device)
        fused = opts["backward"] == "fused"
        chunk = opts["chunk"]
        with torch.no_grad():
            r_local = torch.stack([img, txt])  # (2, b, D)
            # The first chunk's products are formed block by block while the ring delivers the blocks.
            c0 = min(chunk, b)
            rc0 = r_local[:, :c0].reshape(2 * c0, d)  # (2c0, D)
            first_m = [rc0.new_empty(2 * c0, 2 * n)]  # (2c0, 2N) = rc0 @ K_allᵀ, freed by the loop once used

            def first_chunk_products(r: int, block: torch.Tensor) -> None:  # block (2 b_r, D) = [T_r; I_r]
                lo, hi = layout.rows(r)
                prod = rc0 @ block.T  # (2c0, 2 b_r)
                first_m[0][:, lo:hi] = prod[:, : hi - lo]
                first_m[0][:, n + lo : n + hi] = prod[:, hi - lo :]

            k_all = gather_blocks(
                torch.cat([txt, img], 0),
                layout,
                opts["group"],
                opts["comm"],
                on_block=first_chunk_products,
                overlap=opts["overlap"],
                clock=opts["clock"],
            )  # (2N, D)
            offset = layout.offsets[layout.rank]
            sums, dr, dk, dlog, deferred = _chunk_loop(
                r_local, k_all, offset, s, coef, mu, shift, chunk, fused, first_m=first_m, defer_last=fused
            )
            if fused:
                dr += _remote_grads(dk, layout, opts, deferred)
            if opts["group"] is not None and layout.world > 1:
                import torch.distributed as dist

                dist.all_reduce(sums, group=opts["group"])
        clip = sums[0] / (2 * n)
        cross, inmodal = sums[1] / n, sums[2] / n
        loss = clip + alpha * (lc * cross + li * inmodal)
        if fused:
            ctx.save_for_backward(dr, dlog)
        else:
            ctx.save_for_backward(r_local, k_all, s)
        ctx.opts = dict(opts, coef=coef, mu=mu)
        outs = tuple(t.float() for t in (loss, clip, cross, inmodal))
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        opts = ctx.opts
        if opts["backward"] == "fused":
            dr, dlog = ctx.saved_tensors
        else:
            r_local, k_all, s = ctx.saved_tensors
            layout = opts["layout"]
            shift = s if opts["linear_space"] else None
            with torch.no_grad():
                offset = layout.offsets[layout.rank]
                _, dr, dk, dlog, deferred = _chunk_loop(
                    r_local, k_all, offset, s, opts["coef"], opts["mu"], shift, opts["chunk"], True, defer_last=True
                )
                dr += _remote_grads(dk, layout, opts, deferred)
        g = grad_loss.float()
        return dr[0] * g, dr[1] * g, (dlog * g).float(), None


def _remote_grads(dk: torch.Tensor, layout: BlockLayout, opts, deferred=None) -> torch.Tensor:
    """Sum the ``[dT; dI]`` accumulators of every rank for this rank's rows; return them as ``(2, b, D)`` [dI; dT].

    ``deferred = (g2, rc)``: the last chunk's ``dL/dM`` (2c, 2N) and rows (2c, D), whose contribution to each owner's
    rows (``g2[:, owner columns]ᵀ rc``) is formed inside the reduce-scatter, while its hops are in flight."""
    contribution = None
    if deferred is not None:
        g2, rc = deferred
        n = layout.n

        def contribution(r: int) -> torch.Tensor:
            lo, hi = layout.rows(r)
            return torch.cat([g2[:, lo:hi], g2[:, n + lo : n + hi]], 1).T @ rc  # (2 b_r, D) [dT_r; dI_r]

    mine = reduce_scatter_blocks(
        dk,
        layout,
        opts["group"],
        opts["comm"],
        contribution=contribution,
        overlap=opts.get("overlap", True),
        clock=opts.get("clock"),
    )  # (2b, D) [dT_r; dI_r]
    b = mine.shape[0] // 2
    return torch.stack([mine[b:], mine[:b]])


def chunked_rankclip_terms(
    img,
    txt,
    log_s,
    *,
    rank_weight,
    lambda_cross,
    lambda_in,
    comm,
    chunk_size,
    position_weighting,
    group,
    backward,
    max_logit_scale: float = 100.0,
    block_sizes=None,
    overlap: bool = True,
    clock: WaitClock | None = None,
):
    """Chunked loss on normalised float32 ``img, txt`` (b, D) and clamped ``log_s``; returns the output dict.

    ``overlap=False`` (the blocking ring) and ``clock`` (seconds spent waiting on the ring) exist for the benchmark."""
    layout = block_layout(img.shape[0], group, sizes=block_sizes, device=img.device)
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
        "linear_space": linear_space_ok(max_logit_scale),
        "overlap": overlap,
        "clock": clock,
    }
    loss, clip, cross, inmodal = _ChunkedRankClip.apply(img, txt, log_s, opts)
    return {"loss": loss, "clip": clip, "cross": cross, "inmodal": inmodal}
