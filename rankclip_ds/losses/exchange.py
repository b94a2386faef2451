"""Cross-rank exchange of feature blocks and of their gradients: a ring (point-to-point) or collectives.

Layout used by the chunked and top-K implementations: every rank ``r`` owns ``b_r`` rows (any ``b_r >= 1``; the
sizes may differ between ranks) starting at the global offset ``o_r = b_0 + ... + b_{r-1}``.  The "key" matrix is
``K_all = [T_all; I_all]`` of shape ``(2N, D)``, rows in global order, so every rank sees the same column indices
(and therefore the same tie-break) whatever the exchange.

* ``comm="ring"``: ``P - 1`` hops of ``dist.batch_isend_irecv`` pass each rank's ``(2 b_r, D)`` block to the right
  neighbour.  Overlapped (the default): each hop is POSTED before the work on the block that arrived on the
  previous hop (its copy into ``K_all`` and the caller's ``on_block`` compute, e.g. the first chunk's products
  against it), and waited for only after that work.  Gradients go back by a ring reduce-scatter: ``P - 1`` hops,
  each sending a partial sum for one owner; while it is in flight the local contribution for the next owner is
  formed (a slice of the accumulator plus the caller's ``contribution``, e.g. the last chunk's products for that
  owner's columns) and added to the partial just received.  ``overlap=False`` is the blocking ring (the same work
  done before each hop is posted, then the wait), kept to measure the difference.
* ``comm="allgather"``: ``all_gather`` of padded blocks, and ``all_reduce`` (SUM) of the full ``(2N, D)`` gradient
  followed by slicing (gloo has no ``reduce_scatter``).  Kept for comparison; same numbers as the ring up to the
  summation order of the gradient partial sums.

Devices and host syncs: every tensor handed to ``torch.distributed`` lives on the device of the features (on a GPU
run, the NCCL group's device), and nothing here reads a tensor back to the host, with one exception: agreeing on
the block sizes when the caller does not know them (:func:`block_layout` without ``sizes``): one ``all_reduce`` of
``P`` integers and one host read per call.  Callers that know the sizes (the trainer: every rank holds its micro-batch
rows) pass them and the exchange runs without any host sync.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["COMMS", "BlockLayout", "WaitClock", "block_layout", "gather_blocks", "reduce_scatter_blocks"]

COMMS = ("ring", "allgather")


class BlockLayout:
    """Sizes and offsets of every rank's rows: ``sizes[r] = b_r``, ``offsets[r] = o_r``, ``n = sum(sizes)``."""

    def __init__(self, sizes: Sequence[int], rank: int):
        self.sizes = [int(s) for s in sizes]
        self.offsets = [sum(self.sizes[:r]) for r in range(len(self.sizes))]
        self.n = sum(self.sizes)
        self.rank = rank
        self.world = len(self.sizes)

    def rows(self, r: int) -> tuple[int, int]:
        return self.offsets[r], self.offsets[r] + self.sizes[r]


class WaitClock:
    """Seconds the host spent blocked in ``Work.wait()`` of the ring (the exposed communication time on gloo).

    On NCCL ``wait()`` only makes the compute stream wait and returns at once, so this measures nothing there; it
    exists for the CPU benchmark of the overlapped against the blocking ring."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.waits = 0
        self.by_phase: dict[str, float] = {}  # "gather" (features out), "reduce_scatter" (gradients back)

    def wait(self, reqs, phase: str) -> None:
        t0 = time.perf_counter()
        for req in reqs:
            req.wait()
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.by_phase[phase] = self.by_phase.get(phase, 0.0) + seconds
        self.waits += 1


def _wait(reqs, clock: WaitClock | None, phase: str) -> None:
    if clock is not None:
        clock.wait(reqs, phase)
        return
    for req in reqs:
        req.wait()


def block_layout(b: int, group, *, sizes: Sequence[int] | None = None, device=None) -> BlockLayout:
    """Every rank's local batch size: ``sizes`` when the caller knows them (no communication), else agreed with one
    small ``all_reduce`` on ``device`` (the features' device, which is the process group's) and one host read.

    ``group=None`` means a single process."""
    if group is None:
        if sizes is not None and list(sizes) != [b]:
            raise ValueError(f"block_sizes={list(sizes)!r} without a process group must be [{b}] (the local batch)")
        return BlockLayout([b], 0)
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if sizes is not None:
        sizes = list(sizes)
        if len(sizes) != world or sizes[rank] != b or any(isinstance(s, bool) or int(s) < 1 for s in sizes):
            raise ValueError(
                f"block_sizes={sizes!r} must list the local batch of each of the {world} ranks (>= 1 each), and "
                f"entry {rank} (this rank) must be its local batch {b}; pass block_sizes=None to exchange them"
            )
        return BlockLayout(sizes, rank)
    agreed = torch.zeros(world, dtype=torch.int64, device=device)
    agreed[rank] = b
    dist.all_reduce(agreed, group=group)
    return BlockLayout(agreed.tolist(), rank)  # the one host read: the sizes decide buffer shapes and slices


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


OnBlock = Callable[[int, torch.Tensor], None]
Contribution = Callable[[int], torch.Tensor]


def gather_blocks(
    local: torch.Tensor,
    layout: BlockLayout,
    group,
    comm: str,
    *,
    on_block: OnBlock | None = None,
    overlap: bool = True,
    clock: WaitClock | None = None,
) -> torch.Tensor:
    """Assemble ``K_all`` (2N, D) from every rank's local block ``local = [T_r; I_r]`` (2 b_r, D).

    ``on_block(r, block)`` is called once for every rank's block (this rank's first, then in arrival order), after
    it is in ``K_all``; on the overlapped ring it runs while the next hop is in flight."""
    if comm not in COMMS:
        raise ValueError(f"comm must be one of {COMMS}, got {comm!r}")
    d = local.shape[1]
    k_all = local.new_empty(2 * layout.n, d)  # (2N, D)
    _put(k_all, local, layout, layout.rank)
    if layout.world == 1:
        if on_block is not None:
            on_block(layout.rank, local)
        return k_all
    import torch.distributed as dist

    if comm == "allgather":
        bmax = max(layout.sizes)
        padded = local.new_zeros(2 * bmax, d)
        padded[: local.shape[0]] = local
        bufs = [torch.empty_like(padded) for _ in range(layout.world)]
        work = dist.all_gather(bufs, padded, group=group, async_op=True)
        if on_block is not None and overlap:
            on_block(layout.rank, local)  # the own block needs nothing from the others
        _wait([work], clock, "gather")
        if on_block is not None and not overlap:
            on_block(layout.rank, local)
        for r in range(layout.world):
            if r != layout.rank:
                block = bufs[r][: 2 * layout.sizes[r]]  # [T_r; I_r], then padding
                _put(k_all, block, layout, r)
                if on_block is not None:
                    on_block(r, block)
        return k_all
    right, left = _peers(group)
    rank, world = layout.rank, layout.world
    current, origin = local.contiguous(), rank  # the block sent on this hop, received on the previous one
    for hop in range(world - 1):
        origin_in = (rank - hop - 1) % world  # whose block arrives on this hop
        incoming = local.new_empty(2 * layout.sizes[origin_in], d)
        if not overlap:
            _process(k_all, current, origin, layout, on_block, copy=hop > 0)
        ops = [dist.P2POp(dist.isend, current, right, group), dist.P2POp(dist.irecv, incoming, left, group)]
        reqs = dist.batch_isend_irecv(ops)
        if overlap:
            _process(k_all, current, origin, layout, on_block, copy=hop > 0)  # runs while the hop is in flight
        _wait(reqs, clock, "gather")
        current, origin = incoming, origin_in
    _process(k_all, current, origin, layout, on_block, copy=True)
    return k_all


def _process(k_all, block, r, layout, on_block, *, copy: bool) -> None:
    if copy:
        _put(k_all, block, layout, r)
    if on_block is not None:
        on_block(r, block)


def reduce_scatter_blocks(
    dk_all: torch.Tensor,
    layout: BlockLayout,
    group,
    comm: str,
    *,
    contribution: Contribution | None = None,
    overlap: bool = True,
    clock: WaitClock | None = None,
) -> torch.Tensor:
    """Sum every rank's ``(2N, D)`` gradient accumulator; return this rank's ``(2 b_r, D)`` block ``[dT_r; dI_r]``.

    ``contribution(r)`` (optional) is a ``(2 b_r, D)`` gradient for owner ``r``'s rows that is not yet in
    ``dk_all``; it is added exactly once per owner, on the overlapped ring while a hop is in flight."""

    def own(r: int) -> torch.Tensor:
        part = _take(dk_all, layout, r)
        return part if contribution is None else part.add_(contribution(r))

    if layout.world == 1:
        return own(0)
    import torch.distributed as dist

    if comm == "allgather":
        if contribution is not None:
            for r in range(layout.world):
                lo, hi = layout.rows(r)
                extra = contribution(r)
                dk_all[lo:hi] += extra[: layout.sizes[r]]
                dk_all[layout.n + lo : layout.n + hi] += extra[layout.sizes[r] :]
        _wait([dist.all_reduce(dk_all, group=group, async_op=True)], clock, "reduce_scatter")
        return _take(dk_all, layout, layout.rank)
    right, left = _peers(group)
    rank, world = layout.rank, layout.world
    # the partial sum for owner q starts at rank q+1 and ends at q after P-1 hops
    partial = own((rank - 1) % world)
    for hop in range(world - 1):
        owner_in = (rank - hop - 2) % world
        incoming = dk_all.new_empty(2 * layout.sizes[owner_in], dk_all.shape[1])
        mine = None if overlap else own(owner_in)
        ops = [dist.P2POp(dist.isend, partial, right, group), dist.P2POp(dist.irecv, incoming, left, group)]
        reqs = dist.batch_isend_irecv(ops)
        if overlap:
            mine = own(owner_in)  # runs while the hop is in flight
        _wait(reqs, clock, "reduce_scatter")
        partial = incoming.add_(mine)
    return partial
