"""AdamW with CLIP's parameter groups (per-part base learning rates, layer-wise lr decay, no weight decay for
biases, norms and the logit scale; frozen parameters left out), and the learning-rate schedule (linear warm-up,
then cosine decay, applied to every group's own rate)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, OptimConfig

__all__ = [
    "ParamRule",
    "build_lr_lambda",
    "build_optimizer",
    "param_group_table",
    "param_groups",
    "param_groups_from_config",
    "param_rules",
    "param_rules_from_config",
    "place_optimizer_steps",
    "resolve_fused",
]


PARTS = ("image", "text", "proj")
"""The parts of a dual encoder with their own base learning rate: the two towers, and the projections with the
logit scale (``proj``)."""


@dataclass(frozen=True)
class ParamRule:
    """Where one trainable parameter goes: its part, its layer id within the part's tower, its learning rate and
    weight decay."""

    name: str
    part: str
    layer: int
    depth: int
    lr: float
    weight_decay: float


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """CLIP never decays biases, norm/scale vectors, 1-d parameters or the logit scale."""
    return p.ndim < 2 or name.endswith(".bias") or "logit_scale" in name or "norm" in name.lower()


def param_rules(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    image_lr: float | None = None,
    text_lr: float | None = None,
    proj_lr: float | None = None,
    image_layer_decay: float = 1.0,
    text_layer_decay: float = 1.0,
) -> list[ParamRule]:
    """The learning rate and weight decay of every trainable parameter of ``model`` (frozen ones are left out:
    they get no optimizer state). A tower's parameter at layer ``l`` of ``depth`` blocks (0: the embeddings, 1..depth:
    the blocks, depth+1: what follows them; :func:`rankclip_ds.model.layers.tower_layers`) gets ``part_lr ×
    decay^(depth + 1 − l)``; the projections and the logit scale get ``proj_lr``; a part's lr falls back to ``lr``.
    A model without towers (a plain module) is one ``proj``-like part at ``lr``."""
    from ..model.layers import tower_layers

    given = {"image": image_lr, "text": text_lr, "proj": proj_lr}
    base = {part: lr if value is None else value for part, value in given.items()}
    decay = {"image": image_layer_decay, "text": text_layer_decay}
    towers = {part: getattr(model, f"{part}_tower", None) for part in ("image", "text")}
    layers = {part: tower_layers(t) for part, t in towers.items() if t is not None}
    for part, tl in layers.items():
        if decay[part] != 1.0 and tl.blocks is None:
            raise ConfigError(
                f"optim.{part}_layer_decay={decay[part]}: the {part} tower has no block list (no 'blocks' / "
                f"'layers' / 'layer' / 'stages' container or numbered stages), so its layers have no depth. Fix: set "
                f"optim.{part}_layer_decay=1.0 (one rate for the tower; optim.{part}_lr sets it)"
            )
    rules = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = next((t for t in layers if name.startswith(f"{t}_tower.")), "proj")
        layer, depth, factor = 0, 0, 1.0
        if part != "proj":
            tl = layers[part]
            layer, depth = tl.layer_of[name.removeprefix(f"{part}_tower.")], tl.depth
            factor = decay[part] ** (depth + 1 - layer)
        wd = 0.0 if _no_decay(name, p) else weight_decay
        rules.append(ParamRule(name, part, layer, depth, base[part] * factor, wd))
    return rules


def param_groups(model: nn.Module, weight_decay: float, *, lr: float | None = None, **part_settings) -> list[dict]:
    """AdamW parameter groups from :func:`param_rules` (``part_settings``: ``image_lr``, ``text_lr``, ``proj_lr``,
    ``image_layer_decay``, ``text_layer_decay``): one group per distinct (lr, weight decay), never an empty one.

    Groups are merged by their values, not kept per (part, layer): the optimizer needs only the values, DeepSpeed
    flattens and pads each group separately, and a run with one rate keeps the two groups ``decay`` / ``no_decay``
    (in that order) that checkpoints of such runs hold. Each group is labelled with its part/layer members
    (``members``: e.g. ``image:0-12 text:7``) for the dry run's report; ``lr`` is the group's own base rate, which the
    schedule scales (LambdaLR multiplies each group's initial lr)."""
    if lr is None and any(v not in (None, 1.0) for v in part_settings.values()):
        raise ValueError("param_groups: per-part learning rates or layer decay need the base lr")
    # Without lr every group takes the optimizer's default lr (all rates are then equal: 1.0 is a placeholder).
    rules = param_rules(model, lr=1.0 if lr is None else lr, weight_decay=weight_decay, **part_settings)
    params = dict(model.named_parameters())
    order = sorted({(r.lr, r.weight_decay) for r in rules}, key=lambda k: (-k[0], k[1] == 0.0))
    groups = []
    for value_lr, wd in order:
        members = [r for r in rules if (r.lr, r.weight_decay) == (value_lr, wd)]
        group = {
            "params": [params[r.name] for r in members],
            "weight_decay": wd,
            "name": "decay" if wd > 0 else "no_decay",
            "members": _members(members),
        }
        if lr is not None:
            group["lr"] = value_lr
        groups.append(group)
    if len({g["name"] for g in groups}) < len(groups):  # several rates: name each group by its members too
        for g in groups:
            g["name"] = f"{g['members']} {g['name']}"
    return groups


def _members(rules: list[ParamRule]) -> str:
    """``image:0-12 text:7 proj``: the parts and layer ranges of a group's parameters."""
    out = []
    for part in PARTS:
        layer_ids = sorted({r.layer for r in rules if r.part == part})
        if not layer_ids:
            continue
        if part == "proj":
            out.append(part)
            continue
        runs, start = [], layer_ids[0]
        for a, b in zip(layer_ids, [*layer_ids[1:], None], strict=True):
            if b != a + 1:
                runs.append(str(start) if start == a else f"{start}-{a}")
                start = b
        out.append(f"{part}:{','.join(runs)}")
    return " ".join(out)


def param_group_table(rules: list[ParamRule], counts: dict[str, int]) -> list[dict]:
    """Rows for a report: one per (part, lr, weight decay) with its layers and parameter count (``counts``: numel
    per parameter name), in part order and from the first layer up."""
    rows: dict[tuple, dict] = {}
    for r in rules:
        row = rows.setdefault(
            (r.part, r.lr, r.weight_decay),
            {"part": r.part, "lr": r.lr, "weight_decay": r.weight_decay, "rules": [], "params": 0},
        )
        row["rules"].append(r)
        row["params"] += counts[r.name]
    table = []
    for row in rows.values():
        rules_of = row.pop("rules")
        row["layers"] = _members(rules_of).partition(":")[2] or "-"
        row["depth"] = rules_of[0].depth
        row["first_layer"] = min(r.layer for r in rules_of)
        table.append(row)
    table.sort(key=lambda t: (PARTS.index(t["part"]), t["first_layer"], t["weight_decay"] == 0.0))
    return table


def _settings(optim: OptimConfig) -> dict:
    return {
        "image_lr": optim.image_lr,
        "text_lr": optim.text_lr,
        "proj_lr": optim.proj_lr,
        "image_layer_decay": optim.image_layer_decay,
        "text_layer_decay": optim.text_layer_decay,
    }


def param_groups_from_config(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """:func:`param_groups` for ``optim`` (the run config's ``optim`` section)."""
    return param_groups(model, optim.weight_decay, lr=optim.lr, **_settings(optim))


def param_rules_from_config(model: nn.Module, optim: OptimConfig) -> list[ParamRule]:
    """:func:`param_rules` for ``optim``."""
    return param_rules(model, lr=optim.lr, weight_decay=optim.weight_decay, **_settings(optim))


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
    groups: list[dict] | None = None,
) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (default: :func:`param_groups` at one rate; the trainer passes
    :func:`param_groups_from_config`, each group with its own ``lr``), fused per :func:`resolve_fused` for
    ``device`` (where training runs: under ZeRO the optimizer steps DeepSpeed's fp32 master partitions, which live
    there). With ZeRO optimizer offload
    to the CPU, DeepSpeed's CPU Adam (AdamW mode) is used, as DeepSpeed requires; it is JIT-built the first
    time, and ``fused=True`` is refused (its update is DeepSpeed's own vectorised CPU code)."""
    groups = param_groups(model, weight_decay) if groups is None else groups
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
