"""Dual-encoder model: timm vision tower + Hugging Face text tower + projections + logit scale."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .dual_encoder import DualEncoder
from .towers import ImageTower, ModelConfigError, TextTower, build_tokenizer, resolve_text_path

if TYPE_CHECKING:
    from ..config import ModelConfig

__all__ = [
    "DualEncoder",
    "ImageTower",
    "ModelConfigError",
    "TextTower",
    "build_model",
    "build_tokenizer",
    "resolve_text_path",
]


def build_model(cfg: ModelConfig, *, device: str | torch.device = "cpu") -> DualEncoder:
    """Build the dual encoder described by ``cfg`` on ``device``.

    On ``device="meta"`` nothing is allocated or loaded (parameter shapes only: the dry run of large recipes);
    pretrained weights are then skipped. With ``cfg.compile`` the towers are compiled in place
    (:meth:`DualEncoder.compile_towers`); compilation itself happens at the first forward.
    """
    on_meta = torch.device(device).type == "meta"
    with torch.device(device):
        image = ImageTower(
            cfg.image.name,
            cfg.image.image_size,
            weights=None if on_meta else cfg.image.weights,
            drop_path_rate=cfg.image.drop_path_rate,
            model_kwargs=cfg.image.model_kwargs,
            fused_attn=cfg.image.fused_attn,
        )
        text = TextTower(
            cfg.text.name_or_path,
            pretrained=cfg.text.pretrained and not on_meta,
            overrides=cfg.text.overrides,
            pooling=cfg.text.pooling,
            attn_implementation=cfg.text.attn_implementation,
        )
        model = DualEncoder(
            image,
            text,
            embed_dim=cfg.embed_dim,
            init_logit_scale=cfg.init_logit_scale,
            max_logit_scale=cfg.max_logit_scale,
        )
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.compile:
        model.compile_towers()
    return model
