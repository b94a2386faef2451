"""Model FLOPs of one training sample, counted with PyTorch's ``FlopCounterMode`` on fake tensors (no memory, no
arithmetic: a ViT-B/16 + CLIP-text-size dual encoder is counted on a laptop CPU in about a second).

"Model FLOPs" as in PaLM's MFU: the forward and backward matrix multiplications and convolutions of one sample
through the image tower, the text tower and the projections, at the configured image size and text length, with
nothing counted twice: activation checkpointing's recomputed forward and gradient caching's extra embedding pass
are excluded (they cost time, so they lower MFU, as they should). Elementwise work (norms, softmax, GELU) is not
counted, as is usual; the RankCLIP loss is not part of the model and is not counted either (its matmuls are
O(N·D) per sample: about 1 % of a ViT-B/16 sample at N = 64k, D = 512).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = ["count_train_flops", "train_flops_per_sample"]


def count_train_flops(model: nn.Module, *, image_size: int, text_length: int) -> int:
    """FLOPs of one sample's forward and backward (gradients of every trainable parameter) through ``model``, a
    module called as ``model(images (1, 3, S, S), input_ids (1, L), attention_mask (1, L))`` that returns a tuple of
    tensors (:class:`~rankclip_ds.model.DualEncoder`). Build it on the meta device; it must not be compiled or
    checkpointed (recomputation would be counted).

    Parameters and inputs become fake tensors (shapes only). Attention runs through the math decomposition of
    ``scaled_dot_product_attention``, so its QKᵀ and AV products are counted as the matmuls they are whatever
    kernel the GPU will pick (``FlopCounterMode`` has no formula for some fused CPU kernels; flash kernels'
    backward recomputation would otherwise count as model FLOPs). A text mask of all ones: the towers run at the
    padded length ``L`` whatever the caption, so that is the work done.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    # Fake tensors carry shapes, not data: Hugging Face's mask code checks ``mask.all()`` on real (and meta)
    # tensors, but recognises fake ones as traced and skips the data-dependent shortcut.
    with FakeTensorMode() as mode:
        params = {name: mode.from_tensor(p) for name, p in model.named_parameters()}
        buffers = {name: mode.from_tensor(b) for name, b in model.named_buffers()}
        images = torch.zeros(1, 3, image_size, image_size, device=device)
        input_ids = torch.zeros(1, text_length, dtype=torch.long, device=device)
        attention_mask = torch.ones(1, text_length, dtype=torch.long, device=device)
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            outputs = functional_call(model, {**params, **buffers}, (images, input_ids, attention_mask))
            total = sum(out.float().sum() for out in outputs if out.requires_grad)
            trainable = [p for p in params.values() if p.requires_grad]
            torch.autograd.grad(total, trainable, allow_unused=True)
    return int(counter.get_total_flops())


def train_flops_per_sample(cfg: ModelConfig) -> int:
    """Model FLOPs of one training sample of the dual encoder ``cfg`` describes (see the module doc), counted on
    a copy built on the meta device without activation checkpointing and without compilation."""
    from . import build_model

    counted = dataclasses.replace(cfg, grad_checkpointing=False, compile=False)
    model = build_model(counted, device="meta")
    return count_train_flops(model, image_size=cfg.image.image_size, text_length=cfg.text.max_length)
