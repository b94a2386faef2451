"""Helpers for the loss tests: deterministic inputs, tolerance checks, and a gloo process launcher."""

from __future__ import annotations

import os
import socket
import traceback

import torch

GRID_D = 64  # sign vectors with entries +-1/8: exactly unit norm, cosines are exact multiples of 1/32 (many ties)


def gaussian_inputs(n: int, d: int = 32, seed: int = 0, dtype=torch.float64):
    """Unnormalised Gaussian embeddings (near-ties in the targets are improbable for small n)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=gen, dtype=torch.float64) * 1.7
    txt = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.6 + 0.3 * img
    return img.to(dtype), txt.to(dtype)


def grid_inputs(n: int, seed: int = 0, dtype=torch.float64):
    """Embeddings whose products are exact in float32 and float64: identical target orders, exact ties."""
    gen = torch.Generator().manual_seed(seed)
    img = (torch.randint(0, 2, (n, GRID_D), generator=gen) * 2 - 1).double() / 8 * 2  # norm 2, not normalised
    txt = (torch.randint(0, 2, (n, GRID_D), generator=gen) * 2 - 1).double() / 8 * 4
    if n > 2:
        txt[n // 2 :: 3] = txt[n // 2]  # duplicate captions: exactly tied targets
    return img.to(dtype), txt.to(dtype)


def leaf(x: torch.Tensor, dtype=None) -> torch.Tensor:
    return x.detach().to(dtype or x.dtype).clone().requires_grad_()


def rel_err(a: torch.Tensor, b: torch.Tensor, norm_floor: float = 1e-2) -> float:
    """Normwise relative error ``||a - b|| / max(||b||, norm_floor)``.

    The floor keeps the measure meaningful for references that are zero up to rounding (N = 1, where every gradient
    vanishes): there, ``rel_err <= 1e-5`` means an absolute error below 1e-7.
    """
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), norm_floor))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world, port, fn, args, errq):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
        dist.barrier()
    except Exception:
        errq.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Spawn ``world`` gloo processes running ``fn(rank, world, *args)``; re-raise the first failure."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, errq)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    errors = []
    while not errq.empty():
        errors.append(errq.get())
    if errors:
        raise AssertionError("\n".join(errors))
    if alive:
        raise AssertionError(f"{len(alive)} of {world} processes still running after {timeout} s (deadlock?)")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"worker exit codes {bad}")
