"""A simulated CUDA device for tests on a machine without one, and a recorder of what reaches ``torch.distributed``.

``FakeTensorMode`` (PyTorch's fake tensors) makes ``device="cuda"`` tensors that carry shapes, dtypes and devices but
no data: mixing one with a CPU tensor raises ``FakeTensorDeviceMismatchError`` and reading a value back to the host
(``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, a shape computed from data) raises
``DataDependentOutputException``, exactly the two mistakes a real GPU punishes (a crash, a stall of the stream).

Backward: PyTorch's autograd engine refuses graphs on a CUDA device that the machine does not have (it stashes the
streams of every device in the graph, ``GraphTask::stash_current_streams``, which checks the device index against
the real device count).  :func:`backward` therefore runs the graph itself: the same derivative formulas (each
node of the autograd graph is called as the engine would call it), in topological order, in Python.  Only the
scheduling differs; every gradient kernel runs on the fake device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["CollectiveRecorder", "backward", "fake_cuda", "fake_process_group"]


@contextlib.contextmanager
def fake_cuda() -> Iterator[object]:
    """Fake-tensor mode: tensors made with ``device="cuda"`` inside it live on a simulated CUDA device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        yield mode


def _num_inputs(node) -> int:
    return len(node._input_metadata)


def _topological(root) -> list:
    """Nodes reachable from ``root``, each after every node that feeds it a gradient (root first)."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                stack.append((child, False))
    return order[::-1]


def backward(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """``torch.autograd.grad(output, inputs)`` for leaf ``inputs``, evaluated node by node (see the module doc)."""
    if output.grad_fn is None:
        raise ValueError("output does not require grad")
    grads: dict[object, list] = {output.grad_fn: [None] * _num_inputs(output.grad_fn)}
    grads[output.grad_fn][output.output_nr] = torch.ones_like(output)
    leaf_grads: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for node in _topological(output.grad_fn):
            incoming = grads.pop(node, None)
            if incoming is None:
                continue
            if type(node).__name__ == "AccumulateGrad":
                key = id(node.variable)
                g = incoming[0]
                leaf_grads[key] = g if key not in leaf_grads else leaf_grads[key] + g
                continue
            call = node.apply if hasattr(node, "apply") else node  # python Functions' nodes have .apply
            try:
                outs = call(*incoming)
            except Exception as exc:
                shapes = [None if g is None else tuple(g.shape) for g in incoming]
                raise RuntimeError(f"{node.name()} with gradients {shapes}: {exc}") from exc
            outs = outs if isinstance(outs, tuple) else (outs,)
            for (child, slot), g in zip(node.next_functions, outs, strict=False):
                if child is None or g is None:
                    continue
                g = _validated(g, child._input_metadata[slot])
                pending = grads.setdefault(child, [None] * _num_inputs(child))
                pending[slot] = g if pending[slot] is None else pending[slot] + g
    return [leaf_grads.get(id(x)) for x in inputs]


def _validated(grad: torch.Tensor, meta) -> torch.Tensor:
    """What the engine's ``validate_outputs`` does: a gradient of a broadcast input is summed to the input's shape,
    and cast to its dtype.  A gradient on another device than its input is an error, as in the engine."""
    if grad.device != meta.device:
        raise RuntimeError(f"gradient on {grad.device} for an input on {meta.device}")
    shape = torch.Size(meta.shape)
    if grad.shape != shape:
        grad = grad.sum_to_size(shape)
    return grad if grad.dtype == meta.dtype else grad.to(meta.dtype)


class CollectiveRecorder:
    """Replaces the ``torch.distributed`` calls the library makes with checked ones: each call is recorded with the
    devices of its tensors and, like NCCL, refused when a tensor is not on ``device_type``; then the real call (on a
    fake process group) runs."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter", "batch_isend_irecv")

    def __init__(self, monkeypatch, device_type: str = "cuda") -> None:
        import torch.distributed as dist

        self.device_type = device_type
        self.calls: list[tuple[str, list[str]]] = []
        for name in self.NAMES:
            monkeypatch.setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, real):
        def checked(*args, **kwargs):
            tensors = list(_tensors(args)) + list(_tensors(kwargs.values()))
            devices = [str(t.device) for t in tensors]
            self.calls.append((name, devices))
            bad = [d for d in devices if not d.startswith(self.device_type)]
            if bad:
                raise RuntimeError(f"{name}: tensors must be {self.device_type} tensors for this group, got {bad}")
            return real(*args, **kwargs)

        return checked


def _tensors(values) -> Iterator[torch.Tensor]:
    import torch.distributed as dist

    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, dist.P2POp):
            yield v.tensor
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int) -> Iterator[object]:
    """PyTorch's fake process group (every collective returns at once, data untouched) as the default group."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
