"""Dual-encoder model: timm vision tower + Hugging Face text tower + projections + logit scale.

The schema (:mod:`.config`) is imported at once; the torch-backed parts (the towers, the dual encoder) on first
use, so that the config package, which imports the schema from here, loads without torch (milliseconds, not a
second: ``train.py --help-config`` and configuration errors answer at once).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import ImageTowerConfig, LockConfig, ModelConfig, TextTowerConfig, architecture_only

if TYPE_CHECKING:
    import torch

    from .dual_encoder import DualEncoder
    from .towers import ImageTower, ModelConfigError, TextTower, build_tokenizer, resolve_text_path

# Public names of the torch-backed submodules, imported by __getattr__ on first use.
_LAZY_NAMES = {
    "DualEncoder": ".dual_encoder",
    "ImageTower": ".towers",
    "ModelConfigError": ".towers",
    "TextTower": ".towers",
    "build_tokenizer": ".towers",
    "resolve_text_path": ".towers",
}

__all__ = [
    "DualEncoder",
    "ImageTower",
    "ImageTowerConfig",
    "LockConfig",
    "ModelConfig",
    "ModelConfigError",
    "TextTower",
    "TextTowerConfig",
    "architecture_only",
    "build_model",
    "build_tokenizer",
    "resolve_text_path",
]


def __getattr__(name: str) -> Any:
    """``DualEncoder``, the towers and their helpers, imported from their submodule on first access."""
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    globals()[name] = value  # later accesses are plain attribute lookups
    return value


def build_model(cfg: ModelConfig, *, device: str | torch.device = "cpu") -> DualEncoder:
    """Build the dual encoder described by ``cfg`` on ``device``.

    On ``device="meta"`` nothing is allocated or loaded (parameter shapes only: the dry run of large recipes);
    pretrained weights are then skipped. Pretrained weights (a text hub id, timm's published weights) are read
    from the Hugging Face cache only: :func:`.hub.fetch_model_files` fills it (the trainer calls it on rank 0).
    With ``cfg.compile`` the towers are compiled in place (:meth:`DualEncoder.compile_towers`); compilation itself
    happens at the first forward. With ``cfg.init_from`` the config must be the one
    :func:`.clip_init.resolve_init_from` returned; the converted CLIP weights are then loaded strictly.
    """
    import torch

    from .dual_encoder import DualEncoder
    from .lock import apply_locks
    from .towers import ImageTower, TextTower

    on_meta = torch.device(device).type == "meta"
    if cfg.init_from:  # a whole CLIP checkpoint, converted by clip_init.resolve_init_from (refused if it was not)
        from .clip_init import converted_weights

        init_weights = converted_weights(cfg)
    with torch.device(device):
        image = ImageTower(
            cfg.image.name,
            cfg.image.image_size,
            weights=None if on_meta else cfg.image.weights,
            pretrained=cfg.image.pretrained and not on_meta,
            drop_path_rate=cfg.image.drop_path_rate,
            patch_dropout=cfg.image.patch_dropout,
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
    if cfg.init_from and not on_meta:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(init_weights), device=str(torch.device(device))), strict=True)
    apply_locks(model, cfg)  # model.image.lock / model.text.lock: frozen parameters, eval-mode frozen modules
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.compile:
        model.compile_towers()
    return model
