"""The RankCLIP dual encoder: two towers, two linear projections, one learnable logit scale."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .towers import ImageTower, TextTower

__all__ = ["DualEncoder"]


class DualEncoder(nn.Module):
    """Image and text towers projected to a shared ``embed_dim``.

    ``encode_image``/``encode_text`` return *unnormalised* projections (the loss normalises in float32, and
    evaluation normalises itself). ``logit_scale`` holds log(s); ``scale()`` returns exp of it clamped to
    ``max_logit_scale``, and the trainer clamps the parameter itself after each step (as CLIP does).
    """

    def __init__(
        self,
        image_tower: ImageTower,
        text_tower: TextTower,
        *,
        embed_dim: int,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_proj = nn.Linear(image_tower.num_features, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_tower.num_features, embed_dim, bias=False)
        # Shape (1,), not 0-d: DeepSpeed's parameter broadcast views every parameter as bytes, which fails on 0-d.
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        self.max_logit_scale = float(max_logit_scale)
        self.embed_dim = embed_dim
        # Submodules (dotted names) of locked towers that run in eval mode during training (model/lock.py).
        self.eval_when_training: tuple[str, ...] = ()
        self._init_projections()

    def _init_projections(self) -> None:
        # CLIP initialises projections with std = width^-0.5.
        for proj in (self.image_proj, self.text_proj):
            if not proj.weight.is_meta:
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)

    def set_eval_when_training(self, names: list[str]) -> None:
        """Submodules (frozen parts of locked towers) that :meth:`train` puts back in eval mode: no dropout, no
        BatchNorm statistics updates. Set by :func:`rankclip_ds.model.lock.apply_locks`."""
        for name in names:
            self.get_submodule(name)  # fails now, not at the first train()
        self.eval_when_training = tuple(names)

    def train(self, mode: bool = True) -> DualEncoder:
        """``nn.Module.train``, then the frozen parts of locked towers back in eval mode (timm's ``PatchDropout``
        modules in them keep the requested mode: patch dropout is an option of its own). ``eval()`` puts
        everything in eval mode."""
        super().train(mode)
        if mode:
            for name in self.eval_when_training:
                frozen = self.get_submodule(name)
                frozen.train(False)
                for module in frozen.modules():
                    if type(module).__name__.startswith("PatchDropout"):  # timm: PatchDropout, ...WithIndices
                        module.train(True)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image_tower.set_grad_checkpointing(enable)
        self.text_tower.set_grad_checkpointing(enable)

    def compile_towers(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` each tower in place (``nn.Module.compile``): the module keeps its class, parameters
        and names, so ``state_dict`` keys gain no ``_orig_mod.`` prefix and checkpoints, DeepSpeed's ZeRO
        partitioning and the export see the same model. The projections, the logit scale and the loss stay eager.
        Compilation happens at the first forward (and again for a new mode or shape: eval, no-grad passes)."""
        self.image_tower.compile(**compile_kwargs)
        self.text_tower.compile(**compile_kwargs)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.image_tower(images))  # (B, embed_dim)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text_tower(input_ids, attention_mask))  # (B, embed_dim)

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(image_emb, text_emb, logit_scale)``, the last the raw log scale, shape (1,).

        The logit scale is returned as a copy made inside ``forward``: under ZeRO-3 a parameter's storage is only
        materialised during its module's forward, and the copy keeps the autograd path to it."""
        return self.encode_image(images), self.encode_text(input_ids, attention_mask), self.logit_scale.clone()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter to [0, ln(max_logit_scale)] in place (call after the optimizer step)."""
        self.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))

    def param_counts(self) -> dict[str, int]:
        """Parameters per part, the total, and how many of them are trainable (``trainable``: not frozen by a
        lock; works on the meta device)."""

        def count(m: nn.Module | nn.Parameter, trainable_only: bool = False) -> int:
            # Under ZeRO-3 a partitioned parameter's numel() is 0; DeepSpeed keeps the real size in ds_numel.
            params = [m] if isinstance(m, nn.Parameter) else list(m.parameters())
            return sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad or not trainable_only)

        counts: dict[str, Any] = {
            "image_tower": count(self.image_tower),
            "text_tower": count(self.text_tower),
            "projections": count(self.image_proj) + count(self.text_proj),
            "logit_scale": count(self.logit_scale),
        }
        counts["total"] = sum(counts.values())
        counts["trainable"] = count(self, trainable_only=True)
        counts["image_tower_trainable"] = count(self.image_tower, trainable_only=True)
        counts["text_tower_trainable"] = count(self.text_tower, trainable_only=True)
        return counts
