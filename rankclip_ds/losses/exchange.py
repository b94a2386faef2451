"""Cross-rank exchange of feature blocks and of their gradients: a ring (point-to-point) or collectives.

Layout used by the chunked and top-K implementations: every rank ``r`` owns ``b_r`` rows (any ``b_r >= 1``; the
sizes may differ between ranks) starting at the global offset ``o_r = b_0 + ... + b_{r-1}``.  The "key" matrix is
``K_all = [T_all; I_all]`` of shape ``(2N, D)``, rows in global order, so every rank sees the same column indices
(and therefore the same tie-break) whatever the exchange.

* ``comm="ring"``: ``P - 1`` hops of ``dist.batch_isend_irecv`` pass each rank's ``(2 b_r, D)`` block to the right
  neighbour; a hop's transfer overlaps the copy-in of the block received before it.  Gradients go back by a ring
  reduce-scatter: ``P - 1`` hops, each sending a partial sum for one owner and adding the local contribution to
  the partial just received (the addition overlaps the next transfer).  No collective is used except one
  ``all_reduce`` of the block sizes.
* ``comm="allgather"``: ``all_gather`` of padded blocks, and ``all_reduce`` (SUM) of the full ``(2N, D)`` gradient
  followed by slicing (gloo has no ``reduce_scatter``).  Kept for comparison; same numbers as the ring up to the
  summation order of the gradient partial sums.
"""

from __future__ import annotations

import torch

__all__ = ["COMMS", "BlockLayout", "block_layout", "gather_blocks", "reduce_scatter_blocks"]

COMMS = ("ring", "allgather")


class BlockLayout:
    """Sizes and offsets of every rank's rows: ``sizes[r] = b_r``, ``offsets[r] = o_r``, ``n = sum(sizes)``."""

    def __init__(self, sizes: list[int], rank: int):
        self.sizes = sizes
        self.offsets = [sum(sizes[:r]) for r in range(len(sizes))]
        self.n = sum(sizes)
        self.rank = rank
        self.world = len(sizes)

    def rows(self, r: int) -> tuple[int, int]:
        return self.offsets[r], self.offsets[r] + self.sizes[r]


def block_layout(b: int, group) -> BlockLayout:
    """Agree on every rank's local batch size (one small all_reduce); ``group=None`` means a single process."""
    if group is None:
        return BlockLayout([b], 0)
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.int64)
    sizes[rank] = b
    dist.all_reduce(sizes, group=group)
    return BlockLayout([int(x) for x in sizes], rank)


def _peers(group) -> tuple[int, int]:
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # P2P peers are global ranks, the ring runs over group ranks
    return dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)


def _put(k_all: torch.Tensor, block: torch.Tensor, layout: BlockLayout, r: int) -> None:
    """Write rank r's ``(2 b_r, D)`` block ``[T_r; I_r]`` into ``K_all = [T_all; I_all]``."""
    lo, hi = layout.rows(r)
    b = layout.sizes[r]
    k_all[lo:hi] = block[:b]
    k_all[layout.n + lo : layout.n + hi] = block[b : 2 * b]


def _take(k_all: torch.Tensor, layout: BlockLayout, r: int) -> torch.Tensor:
    lo, hi = layout.rows(r)
    return torch.cat([k_all[lo:hi], k_all[layout.n + lo : layout.n + hi]], 0)  # (2 b_r, D)


def gather_blocks(local: torch.Tensor, layout: BlockLayout, group, comm: str) -> torch.Tensor:
    """Assemble ``K_all`` (2N, D) from every rank's local block ``local = [T_r; I_r]`` (2 b_r, D)."""
    if comm not in COMMS:
        raise ValueError(f"comm must be one of {COMMS}, got {comm!r}")
    d = local.shape[1]
    k_all = torch.empty(2 * layout.n, d, dtype=local.dtype, device=local.device)  # (2N, D)
    _put(k_all, local, layout, layout.rank)
    if layout.world == 1:
        return k_all
    import torch.distributed as dist

    if comm == "allgather":
        bmax = max(layout.sizes)
        padded = local.new_zeros(2 * bmax, d)
        padded[: local.shape[0]] = local
        bufs = [torch.empty_like(padded) for _ in range(layout.world)]
        dist.all_gather(bufs, padded, group=group)
        for r in range(layout.world):
            if r != layout.rank:
                _put(k_all, bufs[r], layout, r)
        return k_all
    right, left = _peers(group)
    rank, world = layout.rank, layout.world
    current = local.contiguous()
    pending = None  # (block, origin) received on the previous hop, copied while the next hop is in flight
    for hop in range(world - 1):
        origin_in = (rank - hop - 1) % world  # whose block arrives on this hop
        incoming = local.new_empty(2 * layout.sizes[origin_in], d)
        ops = [dist.P2POp(dist.isend, current, right, group), dist.P2POp(dist.irecv, incoming, left, group)]
        reqs = dist.batch_isend_irecv(ops)
        if pending is not None:
            _put(k_all, pending[0], layout, pending[1])
        for req in reqs:
            req.wait()
        pending = (incoming, origin_in)
        current = incoming
    _put(k_all, pending[0], layout, pending[1])
    return k_all


def reduce_scatter_blocks(dk_all: torch.Tensor, layout: BlockLayout, group, comm: str) -> torch.Tensor:
    """Sum every rank's ``(2N, D)`` gradient accumulator; return this rank's ``(2 b_r, D)`` block ``[dT_r; dI_r]``."""
    if layout.world == 1:
        return _take(dk_all, layout, 0)
    import torch.distributed as dist

    if comm == "allgather":
        dist.all_reduce(dk_all, group=group)
        return _take(dk_all, layout, layout.rank)
    right, left = _peers(group)
    rank, world = layout.rank, layout.world
    # the partial sum for owner q starts at rank q+1 and ends at q after P-1 hops
    partial = _take(dk_all, layout, (rank - 1) % world)
    for hop in range(world - 1):
        owner_in = (rank - hop - 2) % world
        incoming = dk_all.new_empty(2 * layout.sizes[owner_in], dk_all.shape[1])
        ops = [dist.P2POp(dist.isend, partial, right, group), dist.P2POp(dist.irecv, incoming, left, group)]
        reqs = dist.batch_isend_irecv(ops)
        own = _take(dk_all, layout, owner_in)  # overlaps the transfer
        for req in reqs:
            req.wait()
        partial = incoming.add_(own)
    return partial
