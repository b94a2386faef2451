"""Top-K RankCLIP loss: ListMLE over the first K positions of each target order, denominators over all N items.

``l_K(P | Q) = (1/N) sum_i sum_{k<=K} mu_k (lse_k - p_(k))`` with ``lse_k = logsumexp_{l>=k} p_(l)`` over the WHOLE
row (positions k..N).  K >= N is the exact loss.  Same ordering/tie-break conventions as listmle.py.

Streaming, per chunk of c local rows, over column blocks of w columns (memory O(c (K + w)), never c x N):

* pass 1 (statistics): for each block, merge the block's items into each list's running top-K by target with one
  stable sort of ``[current top-K, block]`` (the current top-K is sorted by (target desc, index asc) and every block
  index is larger, so the stable sort keeps the global tie-break); items that fall out of the top-K are folded into
  a running tail log-sum-exp.  The InfoNCE row log-sum-exps are accumulated online in the same loop.
  Then ``lse_k = logaddexp(tail_lse, suffix-LSE within the top-K)``: exact and stable, no subtraction.
* pass 2 (gradients, still in the forward): the block is recomputed; a tail item j gets
  ``exp(p_j) sum_{k<=K} mu_k exp(-lse_k)``, a top-K item its closed-form gradient (scatter-added as a
  correction), InfoNCE its softmax; two products turn them into feature gradients as in chunked.py.
"""

from __future__ import annotations

import torch

from .chunked import _remote_grads
from .exchange import block_layout, gather_blocks
from .listmle import position_weights

__all__ = ["topk_rankclip_terms"]

_BLOCK_COLUMNS = 2048


def _block(k_all, n, j0, j1):
    return torch.cat([k_all[j0:j1], k_all[n + j0 : n + j1]], 0)  # (2w, D) [T_blk; I_blk]


def _diagonal_in_block(c: int, row0: int, j0: int, j1: int) -> tuple[int, int]:
    """Chunk rows ``[h0, h1)`` whose positive (global column ``row0 + h``) lies in the column block ``[j0, j1)``:
    plain integer arithmetic, so no mask is read back from the device."""
    return max(0, j0 - row0), min(c, j1 - row0)


def _topk_chunk(rc, k_all, c, row0, s, k, mu, coef, block, dr_c, dk):
    """One chunk of c rows starting at global row ``row0``; returns float64 sums [CE, cross, in-modal] and d/dlog s
    (both 0-d/1-d device tensors); fills dr_c (2c, D), dk."""
    top_z, top_i, tail, ce_lse, ce_pos = _topk_statistics(rc, k_all, c, row0, s, k, block)
    row_loss, g_top, tail_c = _topk_position_terms(top_z, tail, mu, coef)
    sums = torch.stack(
        [
            (ce_lse - ce_pos).sum(),
            row_loss[0, :, 0].sum() + row_loss[1, :, 1].sum(),
            row_loss[0, :, 1].sum() + row_loss[1, :, 0].sum(),
        ]
    )
    dlog = _topk_gradients(
        rc, k_all, c, row0, s, coef, block, top_i=top_i, g_top=g_top, tail_c=tail_c, ce_lse=ce_lse, dr_c=dr_c, dk=dk
    )
    return sums, dlog


def _topk_statistics(rc, k_all, c, row0, s, k, block):
    """Pass 1 over the column blocks: each list's running top-K by target, the LSE of the scores that fell out of
    it, and the InfoNCE row LSE and positive score. Returns ``(top_z, top_i, tail, ce_lse, ce_pos)``: top-K scores
    and global column indices (2, c, 2, <=K) sorted by (target desc, index asc), tail LSE (2, c, 2) and InfoNCE
    LSE and positives (2, c), float64 except the top-K."""
    n = k_all.shape[0] // 2
    dev = rc.device
    lists = (2, c, 2)
    top_t = rc.new_empty(*lists, 0)  # (2, c, 2, <=K) targets of the running top-K, sorted desc
    top_z = rc.new_empty(*lists, 0)  # scores of the same items
    top_i = torch.empty(*lists, 0, dtype=torch.int64, device=dev)  # their global column indices
    tail = rc.new_full(lists, float("-inf"), dtype=torch.float64)  # (2, c, 2) LSE of scores outside the top-K
    ce_lse = rc.new_full((2, c), float("-inf"), dtype=torch.float64)  # InfoNCE row LSE for S and Sᵀ rows
    ce_pos = torch.zeros(2, c, dtype=torch.float64, device=dev)
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        m = (rc @ _block(k_all, n, j0, j1).T).view(2, c, 2, j1 - j0)  # (2, c, 2, w) cosines
        z = m * s
        ce = torch.stack([z[0, :, 0], z[1, :, 1]]).double()  # (2, c, w)
        ce_lse = torch.logaddexp(ce_lse, torch.logsumexp(ce, -1))
        h0, h1 = _diagonal_in_block(c, row0, j0, j1)
        if h0 < h1:
            hits = torch.arange(h0, h1, device=dev)
            ce_pos[:, h0:h1] = ce[:, hits, hits + (row0 - j0)]
        cand_t = torch.cat([top_t, m.flip(0, 2)], -1)  # targets: the partner rows
        cand_z = torch.cat([top_z, z], -1)
        cand_i = torch.cat([top_i, torch.arange(j0, j1, device=dev).expand(*lists, -1)], -1)
        order = torch.argsort(cand_t, dim=-1, descending=True, stable=True)
        keep, drop = order[..., :k], order[..., k:]
        if drop.shape[-1]:
            tail = torch.logaddexp(tail, torch.logsumexp(torch.gather(cand_z, -1, drop).double(), -1))
        top_t, top_z, top_i = (torch.gather(x, -1, keep) for x in (cand_t, cand_z, cand_i))
    return top_z, top_i, tail, ce_lse, ce_pos


def _topk_position_terms(top_z, tail, mu, coef):
    """From pass 1's top-K scores and tail LSE: ``lse_k`` over the whole row, the per-list loss (2, c, 2), the
    closed-form gradients of the top-K items (2, c, 2, K) float32, and the log multiplier of every tail item's
    gradient (2, c, 2, 1). Returns ``(row_loss, g_top, tail_c)``."""
    zt = top_z.double()
    lse = torch.logaddexp(tail.unsqueeze(-1), torch.logcumsumexp(zt.flip(-1), -1).flip(-1))  # (2, c, 2, K)
    mud = None if mu is None else mu[: zt.shape[-1]].double()  # K = min(top_k, N) positions
    terms = lse - zt if mud is None else (lse - zt) * mud
    row_loss = terms.sum(-1)  # (2, c, 2)
    log_c = torch.logcumsumexp(-lse if mud is None else mud.log() - lse, -1)  # (2, c, 2, K)
    g_top = torch.exp(zt + log_c) - (1.0 if mud is None else mud)  # (2, c, 2, K)
    g_top = (g_top * coef).float()  # (2, c, 2, K)
    tail_c = log_c[..., -1:]  # (2, c, 2, 1) log sum_{k<=K} mu_k exp(-lse_k)
    return row_loss, g_top, tail_c


def _topk_gradients(rc, k_all, c, row0, s, coef, block, *, top_i, g_top, tail_c, ce_lse, dr_c, dk):
    """Pass 2: recomputes each column block's scores, turns them into dL/dscore (tail formula, top-K closed form,
    InfoNCE softmax) and adds the feature gradients into dr_c (2c, D) and dk (2N, D). Returns d/dlog s (0-d
    float64)."""
    n = k_all.shape[0] // 2
    dev = rc.device
    dlog = torch.zeros((), dtype=torch.float64, device=dev)
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        w = j1 - j0
        kb = _block(k_all, n, j0, j1)
        m = (rc @ kb.T).view(2, c, 2, w)
        z = m * s  # bit-identical to pass 1
        # tail formula for every item; it is unbounded for top-K items, which are masked out, not corrected
        g = ((z.double() + tail_c).exp_() * coef).float()  # (2, c, 2, w)
        inside = (top_i >= j0) & (top_i < j1)  # (2, c, 2, K) top-K items that live in this block
        pos = (top_i - j0).clamp_(0, w - 1)
        is_top = torch.zeros_like(g).scatter_add_(-1, pos, inside.float()) > 0
        g.masked_fill_(is_top, 0.0).scatter_add_(-1, pos, torch.where(inside, g_top, 0.0))
        ce_g = (torch.stack([z[0, :, 0], z[1, :, 1]]).double() - ce_lse.unsqueeze(-1)).exp_()  # softmax
        h0, h1 = _diagonal_in_block(c, row0, j0, j1)
        if h0 < h1:
            hits = torch.arange(h0, h1, device=dev)
            ce_g[:, hits, hits + (row0 - j0)] -= 1.0
        ce_g = (ce_g * (0.5 / n)).float()
        g[0, :, 0] += ce_g[0]
        g[1, :, 1] += ce_g[1]
        dlog += s * torch.dot(g.view(-1), m.reshape(-1))
        g2 = g.view(2 * c, 2 * w).mul_(s)  # (2c, 2w) dL/dM
        dr_c += g2 @ kb
        dkb = g2.T @ rc  # (2w, D)
        dk[j0:j1] += dkb[:w]
        dk[n + j0 : n + j1] += dkb[w:]
    return dlog


class _TopKRankClip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, log_s, opts):
        layout = opts["layout"]
        n, b, d = layout.n, img.shape[0], img.shape[1]
        dev = img.device
        s = log_s.detach().exp()  # 0-d float32 on the device: never read back to the host
        w, lc, li = opts["rank_weight"], opts["lambda_cross"], opts["lambda_in"]
        alpha = w / (32.0 * n)
        coef = torch.tensor([[lc, li], [li, lc]], dtype=torch.float64, device=dev).view(2, 1, 2, 1) * (alpha / n)
        k = min(opts["top_k"], n)
        mu = position_weights(k, opts["position_weighting"], dtype=torch.float64, device=dev)
        with torch.no_grad():
            k_all = gather_blocks(torch.cat([txt, img], 0), layout, opts["group"], opts["comm"])  # (2N, D)
            offset = layout.offsets[layout.rank]
            dr = img.new_zeros(2, b, d)  # (2, b, D) [dI; dT]
            dk = torch.zeros_like(k_all)
            sums = torch.zeros(3, dtype=torch.float64, device=dev)
            dlog = torch.zeros((), dtype=torch.float64, device=dev)
            chunk, block = opts["chunk"], opts["block"]
            for i0 in range(0, b, chunk):
                i1 = min(i0 + chunk, b)
                c = i1 - i0
                rc = torch.cat([img[i0:i1], txt[i0:i1]], 0)  # (2c, D)
                dr_c = img.new_zeros(2 * c, d)
                part, dl = _topk_chunk(rc, k_all, c, offset + i0, s, k, mu, coef, block, dr_c, dk)
                sums += part
                dlog += dl
                dr[:, i0:i1] = dr_c.view(2, c, d)
            dr += _remote_grads(dk, layout, opts)
            if opts["group"] is not None and layout.world > 1:
                import torch.distributed as dist

                dist.all_reduce(sums, group=opts["group"])
        clip, cross, inmodal = sums[0] / (2 * n), sums[1] / n, sums[2] / n
        loss = clip + alpha * (lc * cross + li * inmodal)
        ctx.save_for_backward(dr, dlog)
        outs = tuple(t.float() for t in (loss, clip, cross, inmodal))
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        dr, dlog = ctx.saved_tensors
        g = grad_loss.float()
        return dr[0] * g, dr[1] * g, (dlog * g).float(), None


def topk_rankclip_terms(
    img,
    txt,
    log_s,
    *,
    top_k,
    rank_weight,
    lambda_cross,
    lambda_in,
    comm,
    chunk_size,
    position_weighting,
    group,
    block_sizes=None,
):
    """Top-K loss on normalised float32 ``img, txt`` (b, D) and clamped ``log_s``; returns the output dict."""
    layout = block_layout(img.shape[0], group, sizes=block_sizes, device=img.device)
    b = img.shape[0]
    block = min(_BLOCK_COLUMNS, layout.n)
    if chunk_size is None:
        chunk = max(1, min(b, (1 << 19) // (min(top_k, layout.n) + block)))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    else:
        chunk = min(chunk_size, b)
    opts = {
        "layout": layout,
        "rank_weight": float(rank_weight),
        "lambda_cross": float(lambda_cross),
        "lambda_in": float(lambda_in),
        "comm": comm,
        "chunk": chunk,
        "block": block,
        "top_k": top_k,
        "position_weighting": position_weighting,
        "group": group,
    }
    loss, clip, cross, inmodal = _TopKRankClip.apply(img, txt, log_s, opts)
    return {"loss": loss, "clip": clip, "cross": cross, "inmodal": inmodal}
