"""The dual encoder and the evaluation scoring on a simulated CUDA device (PyTorch's fake tensors), on a CPU machine.

Under ``FakeTensorMode`` a tensor made with ``device="cuda"`` is a fake CUDA tensor: an op mixing it with a CPU tensor
raises ``FakeTensorDeviceMismatchError`` and a read back to the host (``.item()``, ``bool(t)``, a data-dependent
shape) raises ``DataDependentOutputException``, as a real GPU would stall or fail. On top of that, :class:`CpuOps`
records every op whose output is *not* on CUDA: an op that a GPU accepts silently (indexing a CUDA tensor with a CPU
index tensor, a CPU 0-d accumulator) still means a host tensor and a host-to-device copy on the hot path.

The autograd engine cannot run a fake CUDA graph on a machine without a GPU, so the backward runs node by node in
Python (``_fake_cuda.backward``, shared with the loss tests), which also checks that each gradient lands on its
input's device; :func:`test_hand_backward_matches_the_engine` checks it against the engine on the dual encoder.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _fake_cuda import backward
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import TINY_MODEL
from rankclip_ds.config import load_config
from rankclip_ds.evaluate import (
    best_positive_rank,
    classification_counts,
    hits_at_k,
    rank_of_target,
    retrieval_ranks,
    zeroshot_classifier_from_embeddings,
)
from rankclip_ds.evaluate import features as eval_features
from rankclip_ds.evaluate.features import same_on_every_rank
from rankclip_ds.model import build_model

TINY = ["--model.image.name", "vit_tiny_patch16_224", *TINY_MODEL]


class CpuOps(TorchDispatchMode):
    """Records ``(op, device, shape)`` of every op output that is not on CUDA (enter it inside the fake mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "cuda":
                self.found.append((str(func), t.device.type, tuple(t.shape)))
        return out


def to_fake_cuda(module: nn.Module, fake_mode: FakeTensorMode) -> nn.Module:
    """Replace every parameter and buffer of a CPU-built ``module`` by a fake CUDA tensor of the same shape, in place.

    Building the model inside the fake mode does not work: timm's constructor reads values back (``.tolist()`` of
    the drop-path rates), which fake tensors refuse.
    """
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                fake = fake_mode.from_tensor(p.detach())
                with fake_mode:
                    sub._parameters[name] = nn.Parameter(fake.to("cuda"), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                fake = fake_mode.from_tensor(b)
                with fake_mode:
                    sub._buffers[name] = fake.to("cuda")
    return module


def _on_cuda(*tensors: torch.Tensor) -> bool:
    return all(isinstance(t, FakeTensor) and t.device.type == "cuda" for t in tensors)


@pytest.fixture(scope="module")
def cpu_model():
    torch.manual_seed(0)
    return build_model(load_config(None, TINY).model)


def test_hand_backward_matches_the_engine(cpu_model):
    """The node-by-node backward used below, on real CPU tensors: the engine's gradients for every parameter of
    the dual encoder (attention, layer norms, embeddings, pooling, projections, logit scale)."""
    model = copy.deepcopy(cpu_model).eval()  # no dropout: both passes see the same graph
    params = list(model.parameters())
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])

    def loss():
        img, txt, scale = model(images, ids, mask)
        return img.square().sum() + txt.square().sum() + scale.sum()

    by_hand = backward(loss(), params)
    by_engine = torch.autograd.grad(loss(), params)
    for p, a, b in zip(params, by_hand, by_engine, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, p=p: f"{tuple(p.shape)}: {m}")


@pytest.mark.parametrize("pooling", ["mean", "cls", "eos"])
def test_dual_encoder_forward_backward_on_fake_cuda(cpu_model, pooling):
    """Every output and every parameter gradient on CUDA; no op of the forward or backward makes a host tensor
    (catches e.g. a ``torch.arange`` without ``device=`` in the text tower's pooling, which indexing accepts)."""
    model = copy.deepcopy(cpu_model).train()
    model.text_tower.pooling = pooling
    fake_mode = FakeTensorMode()
    named = list(to_fake_cuda(model, fake_mode).named_parameters())
    with fake_mode:
        images = torch.randn(3, 3, 32, 32, device="cuda")
        ids = torch.randint(0, 1000, (3, 12), device="cuda")
        mask = torch.ones(3, 12, dtype=torch.long, device="cuda")
        cpu_ops = CpuOps()
        with cpu_ops:
            img, txt, scale = model(images, ids, mask)
            grads = backward(img.square().sum() + txt.square().sum() + scale.sum(), [p for _, p in named])
    assert cpu_ops.found == []
    assert _on_cuda(img, txt, scale)
    assert img.shape == (3, 16) and txt.shape == (3, 16) and scale.shape == (1,)
    for (name, p), g in zip(named, grads, strict=True):
        assert g is not None, f"{name} got no gradient"
        assert _on_cuda(g) and g.shape == p.shape, name


def test_classification_scoring_on_fake_cuda():
    """Zero-shot scoring from embeddings: ranks, per-class top-k counts and the input checks' counters stay on the
    device, with no host read (the data-dependent checks of the eager path are skipped on fake tensors)."""
    with FakeTensorMode():
        images = torch.randn(10, 8, device="cuda")
        prompts = torch.randn(4 * 3, 8, device="cuda")  # 4 classes × 3 templates, class-major
        labels = torch.randint(0, 4, (10,), device="cuda")
        cpu_ops = CpuOps()
        with cpu_ops:
            classifier = zeroshot_classifier_from_embeddings(prompts, 4)  # (C, D)
            tally = classification_counts(images, classifier, labels, ks=(1, 3), block_size=4)
            ranks = rank_of_target(images @ classifier.T, labels)
            hits = hits_at_k(ranks, (1, 3))
            best = best_positive_rank(images @ classifier.T, classifier.new_ones(10, 4, dtype=torch.bool))
    assert cpu_ops.found == []
    assert classifier.shape == (4, 8) and _on_cuda(classifier)
    assert tally.count.shape == (4,) and tally.hits.shape == (2, 4)
    assert _on_cuda(*tally, ranks, hits, best)


def test_retrieval_scoring_on_fake_cuda():
    with FakeTensorMode():
        images = torch.randn(5, 8, device="cuda")
        texts = torch.randn(9, 8, device="cuda")
        owner = torch.randint(0, 5, (9,), device="cuda")
        cpu_ops = CpuOps()
        with cpu_ops:
            ranks = retrieval_ranks(images, texts, owner, block_size=2)
            hits = hits_at_k(ranks.image_to_text, (1, 5))
    assert cpu_ops.found == []
    assert ranks.image_to_text.shape == (5,) and ranks.text_to_image.shape == (9,)
    assert _on_cuda(*ranks, hits)


def test_eager_checks_do_not_run_under_torch_compile():
    """The input checks read values back; under torch.compile they are skipped, so a full graph traces."""
    scores, targets = torch.randn(4, 6), torch.tensor([0, 5, 2, 2])
    compiled = torch.compile(rank_of_target, backend="eager", fullgraph=True)
    assert torch.equal(compiled(scores, targets), rank_of_target(scores, targets))


def test_collectives_use_the_data_device_under_nccl(monkeypatch):
    """NCCL takes CUDA tensors only: the evaluation's collective buffers go to the device the data is on (the
    rank's GPU), never the CPU, and not some other current device."""
    monkeypatch.setattr(eval_features.dist, "get_backend", lambda *a, **k: "nccl")
    assert eval_features._comm_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    seen = []
    monkeypatch.setattr(eval_features, "dist_rank_world", lambda: (0, 2))
    monkeypatch.setattr(eval_features.dist, "broadcast_object_list", lambda box, src, device: seen.append(device))
    assert same_on_every_rank({"top1": 0.5}, "cuda:1") == {"top1": 0.5}
    assert seen == [torch.device("cuda", 1)]
