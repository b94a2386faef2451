"""AdamW with CLIP's parameter groups, and the learning-rate schedule (linear warm-up, then cosine decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["build_lr_lambda", "build_optimizer", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and everything CLIP never decays (biases, norm/scale vectors, embeddings'
    1-d parameters, the logit scale). Any parameter of fewer than 2 dimensions is in the no-decay group."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or "logit_scale" in name or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    cpu_offload: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`. With ZeRO optimizer offload to the CPU, DeepSpeed's CPU Adam (AdamW mode)
    is used, as DeepSpeed requires; it is JIT-built the first time."""
    groups = param_groups(model, weight_decay)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def build_lr_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Multiplier of the peak lr at optimizer step ``s`` (0-based): (s+1)/warmup during warm-up, then a cosine
    from 1 to ``min_lr_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
