"""RNG state of one process (Python, NumPy, torch, and the CUDA generator of the rank's own GPU), saved per rank with
every checkpoint."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """Python, NumPy, torch and, on a CUDA ``device``, that device's generator, in types that
    ``torch.load(weights_only=True)`` accepts.

    Only the rank's own GPU: the other GPUs of the node belong to other ranks, and a resume may see another number
    of visible devices (one per task under Slurm, all of them under torchrun), where a list of every device's
    state would not restore."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Restore what :func:`capture_rng_state` captured; the CUDA generator goes to ``device`` (this rank's GPU)."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    device = torch.device(device) if device is not None else None
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # checkpoints of earlier versions held every visible device's state
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def _as_tuple(x: Any) -> Any:
    # random.setstate needs tuples all the way down; serialisation may have produced lists.
    if isinstance(x, (list, tuple)):
        return tuple(_as_tuple(v) for v in x)
    return x
