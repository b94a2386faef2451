"""AdamW with CLIP's parameter groups, and the learning-rate schedule (linear warm-up, then cosine decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ConfigError

__all__ = [
    "build_lr_lambda",
    "build_optimizer",
    "param_groups",
    "place_optimizer_steps",
    "resolve_fused",
]


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


def resolve_fused(setting: str | bool, device: torch.device | str) -> bool:
    """``optim.fused`` for the device the optimizer's states live on: ``auto`` is fused on CUDA only; ``true`` is
    fused wherever PyTorch has a fused AdamW kernel (CUDA, and the CPU since PyTorch 2.4), an error elsewhere."""
    device = torch.device(device)
    if setting == "auto":
        return device.type == "cuda"
    if setting is True:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = _get_fused_kernels_supported_devices()
        if device.type not in supported:
            raise ConfigError(
                f"optim.fused=True: PyTorch {torch.__version__} has no fused AdamW kernel for device "
                f"{device.type!r} (it has one for {', '.join(supported)}). Fix: set optim.fused to auto or false"
            )
        return True
    return False


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    cpu_offload: bool = False,
    fused: str | bool = "auto",
    device: torch.device | str = "cpu",
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`, fused per :func:`resolve_fused` for ``device`` (where training runs: under
    ZeRO the optimizer steps DeepSpeed's fp32 master partitions, which live there). With ZeRO optimizer offload
    to the CPU, DeepSpeed's CPU Adam (AdamW mode) is used, as DeepSpeed requires; it is JIT-built the first
    time, and ``fused=True`` is refused (its update is DeepSpeed's own vectorised CPU code)."""
    groups = param_groups(model, weight_decay)
    if cpu_offload:
        if fused is True:
            raise ConfigError(
                "optim.fused=True: with ZeRO optimizer offload to the CPU DeepSpeed steps its own CPU Adam, not "
                "torch.optim.AdamW. Fix: set optim.fused to auto or false, or remove offload_optimizer from the "
                "DeepSpeed JSON"
            )
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)
    # Not fused: None, never False. AdamW(fused=False) also turns off PyTorch's default for-each implementation
    # (both flags user-given), leaving the slow per-tensor loop.
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=resolve_fused(fused, device) or None
    )


def place_optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Put each fused AdamW state's ``step`` on its parameter's device as float32, as PyTorch's own
    ``load_state_dict`` does for fused optimizers; returns how many were moved. DeepSpeed's universal-checkpoint
    load (a resume on another world size) assigns ``step`` directly, as the CPU tensor its conversion saved; the
    fused CUDA kernel reads every step on the device."""
    moved = 0
    for group in optimizer.param_groups:
        if not group.get("fused"):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            step = state.get("step")
            if step is None:
                continue
            if not torch.is_tensor(step) or step.device != p.device or step.dtype != torch.float32:
                state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
                moved += 1
    return moved


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
