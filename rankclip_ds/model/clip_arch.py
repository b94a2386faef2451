"""The architecture of a CLIP model in each format: our model section ↔ Hugging Face ``CLIPConfig`` and open_clip
model configs.

Deriving (a source's config → the fields of our model section) and the reverse (our CLIP-type model section → an
open_clip model config dict, a Hugging Face ``CLIPConfig``) are pure functions of configs. The image tower is a timm
ViT of the CLIP family (``vit_*_clip[_quickgelu]_*``: a pre-norm ViT with a class token, LayerNorm eps 1e-5, CLS
pooling after the final norm), sized by ``model_kwargs`` where it differs from the named model; the text tower is
Hugging Face's ``CLIPTextModel`` (config ``model_type: clip_text_model``) pooled at the end-of-text token.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..problems import ConfigError
from .config import ModelConfig

__all__ = [
    "ClipArch",
    "VisionArch",
    "arch_from_hf_config",
    "arch_from_open_clip_config",
    "hf_clip_config",
    "is_clip_type",
    "open_clip_model_config",
    "vision_arch",
    "vit_name_and_kwargs",
]

# timm CLIP ViTs we name: stem → (patch_size, embed_dim, depth, num_heads, mlp_ratio). Each has a QuickGELU twin
# (``<stem>_quickgelu_224``); other sizes use the ViT-B/16 stem with model_kwargs.
_CLIP_VITS = {
    "vit_base_patch32_clip": (32, 768, 12, 12, 4.0),
    "vit_base_patch16_clip": (16, 768, 12, 12, 4.0),
    "vit_large_patch14_clip": (14, 1024, 24, 16, 4.0),
    "vit_huge_patch14_clip": (14, 1280, 32, 16, 4.0),
}
_FALLBACK_STEM = "vit_base_patch16_clip"
_KWARG_NAMES = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
_CLIP_VIT_NAME = re.compile(r"^vit_\w+_clip_(quickgelu_)?\d+$")
_ACTS = {"quick_gelu": True, "gelu": False}  # hidden_act → QuickGELU?
OPENAI_BOS, OPENAI_EOS, OPENAI_VOCAB = 49406, 49407, 49408


@dataclass(frozen=True)
class ClipArch:
    """What our model section takes from a CLIP source."""

    image_name: str
    model_kwargs: dict[str, Any]
    image_size: int
    text_config: dict[str, Any] = field(repr=False)
    """Keyword arguments of ``transformers.CLIPTextConfig``."""
    embed_dim: int
    init_logit_scale: float

    @property
    def context_length(self) -> int:
        return int(self.text_config["max_position_embeddings"])


def _mlp_ratio(width: int, mlp_dim: int) -> float:
    """The ratio timm and open_clip turn back into ``int(width × ratio) == mlp_dim``."""
    ratio = mlp_dim / width
    return ratio if int(width * ratio) == mlp_dim else (mlp_dim + 0.5) / width


def vit_name_and_kwargs(
    *, patch_size: int, width: int, depth: int, heads: int, mlp_dim: int, quick_gelu: bool
) -> tuple[str, dict[str, Any]]:
    """The timm CLIP ViT name and the ``model_kwargs`` that size it (only the values that differ from the name's)."""
    wanted = (patch_size, width, depth, heads, _mlp_ratio(width, mlp_dim))
    stem = next((s for s, dims in _CLIP_VITS.items() if dims == wanted), _FALLBACK_STEM)
    name = f"{stem}{'_quickgelu' if quick_gelu else ''}_224"
    kwargs = {k: v for k, v, base in zip(_KWARG_NAMES, wanted, _CLIP_VITS[stem], strict=True) if v != base}
    return name, kwargs


def _quick_gelu(act: str, where: str) -> bool:
    if act not in _ACTS:
        raise ConfigError(f"{where}={act!r}: only gelu and quick_gelu CLIP towers convert to timm/CLIPTextModel")
    return _ACTS[act]


# ------------------------------------------------------------------------------------------------ from a source
def arch_from_hf_config(config: Any) -> ClipArch:
    """Our model's architecture from a Hugging Face ``CLIPConfig`` (the object, defaults filled in)."""
    vision, text = config.vision_config, config.text_config
    for sub, name in ((vision, "vision_config"), (text, "text_config")):
        if not math.isclose(sub.layer_norm_eps, 1e-5):
            raise ConfigError(
                f"{name}.layer_norm_eps={sub.layer_norm_eps}: our CLIP towers use LayerNorm eps 1e-5 (timm's CLIP "
                "ViTs); this checkpoint cannot be converted exactly"
            )
    name, kwargs = vit_name_and_kwargs(
        patch_size=vision.patch_size,
        width=vision.hidden_size,
        depth=vision.num_hidden_layers,
        heads=vision.num_attention_heads,
        mlp_dim=vision.intermediate_size,
        quick_gelu=_quick_gelu(vision.hidden_act, "vision_config.hidden_act"),
    )
    _quick_gelu(text.hidden_act, "text_config.hidden_act")
    text_config = text.to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "id2label", "label2id"):
        text_config.pop(key, None)
    return ClipArch(
        image_name=name,
        model_kwargs=kwargs,
        image_size=int(vision.image_size),
        text_config=text_config,
        embed_dim=int(config.projection_dim),
        init_logit_scale=float(config.logit_scale_init_value),
    )


# open_clip settings our towers reproduce exactly; any other non-default value is refused.
_OPEN_CLIP_VISION_KEYS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "pool_type"}
_OPEN_CLIP_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pool_type",
                        "pad_id", "eos_id", "hf_tokenizer_name", "tokenizer_kwargs"}  # fmt: skip
_OPEN_CLIP_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "custom_text",
                       "nonscalar_logit_scale"}  # fmt: skip


def _non_default(cfg: Any, allowed: set[str]) -> list[str]:
    """Fields of an open_clip config dataclass that differ from the default and are not in ``allowed``."""
    import dataclasses

    defaults = type(cfg)()
    names = [f.name for f in dataclasses.fields(cfg) if f.name not in allowed]
    return [name for name in names if getattr(cfg, name) != getattr(defaults, name)]


def _open_clip_towers(model_cfg: dict[str, Any], where: str) -> tuple[Any, Any]:
    """open_clip's vision and text config dataclasses for ``model_cfg`` (defaults filled in), refusing every
    setting our towers do not reproduce."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    try:
        vision, text = CLIPVisionCfg(**model_cfg["vision_cfg"]), CLIPTextCfg(**model_cfg["text_cfg"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: not an open_clip CLIP model config ({exc})") from exc
    unsupported = sorted(set(model_cfg) - _OPEN_CLIP_TOP_KEYS)
    unsupported += [f"vision_cfg.{k}" for k in _non_default(vision, _OPEN_CLIP_VISION_KEYS)]
    unsupported += [f"text_cfg.{k}" for k in _non_default(text, _OPEN_CLIP_TEXT_KEYS)]
    if vision.pool_type != "tok" or text.pool_type not in ("argmax", "eos") or not isinstance(vision.layers, int):
        unsupported.append("pooling (vision 'tok', text 'argmax'/'eos') or a ResNet image tower")
    if text.pool_type == "eos" and text.eos_id != OPENAI_EOS:
        unsupported.append(f"text_cfg.eos_id={text.eos_id} (OpenAI's end-of-text id is {OPENAI_EOS})")
    if text.vocab_size != OPENAI_VOCAB or text.hf_tokenizer_name or text.tokenizer_kwargs:
        unsupported.append("a tokenizer other than OpenAI's 49408-token BPE")
    if unsupported:
        raise ConfigError(
            f"{where}: settings our CLIP-type towers (timm CLIP ViT + CLIPTextModel) do not reproduce: {unsupported}. "
            "Fix: use a plain ViT CLIP model (ViT-B-16, ViT-L-14, ...), or start from its weights per tower"
        )
    return vision, text


def arch_from_open_clip_config(model_cfg: dict[str, Any], name: str) -> ClipArch:
    """Our model's architecture from an open_clip model config (``{"embed_dim", "vision_cfg", "text_cfg", ...}``).

    Needs open_clip (its config dataclasses supply the defaults). Refuses what our towers cannot reproduce: a
    timm or ResNet image tower, a Hugging Face text tower, attentional pooling, layer scale, a logit bias, ..."""
    where = f"model.open_clip_name={name!r}"
    vision, text = _open_clip_towers(model_cfg, where)
    size = vision.image_size
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"{where}: vision_cfg.image_size={size} is not square; our image tower is")
        size = size[0]
    quick = bool(model_cfg.get("quick_gelu", False))
    image_name, kwargs = vit_name_and_kwargs(
        patch_size=vision.patch_size,
        width=vision.width,
        depth=vision.layers,
        heads=vision.width // vision.head_width,
        mlp_dim=int(vision.width * vision.mlp_ratio),
        quick_gelu=quick,
    )
    text_config = {
        "vocab_size": text.vocab_size,
        "hidden_size": text.width,
        "intermediate_size": int(text.width * text.mlp_ratio),
        "num_hidden_layers": text.layers,
        "num_attention_heads": text.heads,
        "max_position_embeddings": text.context_length,
        "hidden_act": "quick_gelu" if quick else "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": int(model_cfg["embed_dim"]),
        "bos_token_id": OPENAI_BOS,
        "eos_token_id": OPENAI_EOS,
        "pad_token_id": OPENAI_EOS,  # our tokenizer pads with <|endoftext|> (the causal mask makes pads inert)
    }
    return ClipArch(
        image_name=image_name,
        model_kwargs=kwargs,
        image_size=int(size),
        text_config=text_config,
        embed_dim=int(model_cfg["embed_dim"]),
        init_logit_scale=float(model_cfg.get("init_logit_scale", math.log(1 / 0.07))),
    )


# ------------------------------------------------------------------------------------------------ our model
@dataclass(frozen=True)
class VisionArch:
    """The sizes of our CLIP-type image tower, read from the timm model itself."""

    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    quick_gelu: bool
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


def vision_arch(model_cfg: ModelConfig) -> VisionArch:
    """Build our image tower's timm model on the meta device (no memory, no weights) and read its sizes; a timm
    model that is not a plain CLIP ViT is a :class:`ConfigError`."""
    import timm
    import timm.data
    import torch
    from timm.layers.activations import QuickGELU

    image = model_cfg.image
    with torch.device("meta"):
        trunk = timm.create_model(
            image.name, pretrained=False, num_classes=0, img_size=image.image_size, **image.model_kwargs
        )
    block = trunk.blocks[0]
    act = type(block.mlp.act)
    plain = (
        getattr(trunk, "global_pool", None) == "token"
        and trunk.num_prefix_tokens == 1
        and isinstance(trunk.norm_pre, torch.nn.LayerNorm)
        and isinstance(trunk.fc_norm, torch.nn.Identity)
        and isinstance(block.ls1, torch.nn.Identity)
        and trunk.patch_embed.proj.bias is None
        and math.isclose(trunk.norm.eps, 1e-5)
        and act in (QuickGELU, torch.nn.GELU)
    )
    if not plain:
        raise ConfigError(
            f"model.image.name={image.name!r} (model_kwargs={image.model_kwargs}) is not a plain CLIP ViT "
            "(pre-norm, class token, LayerNorm eps 1e-5, GELU/QuickGELU); it has no open_clip / Hugging Face CLIP form"
        )
    data = timm.data.resolve_data_config({}, model=trunk)
    return VisionArch(
        patch_size=int(trunk.patch_embed.patch_size[0]),
        width=int(trunk.embed_dim),
        depth=len(trunk.blocks),
        heads=int(block.attn.num_heads),
        mlp_dim=int(block.mlp.fc1.out_features),
        quick_gelu=act is QuickGELU,
        image_size=image.image_size,
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=str(data["interpolation"]),
    )


def is_clip_type(model_cfg: ModelConfig) -> bool:
    """Whether the model has a CLIP form: the image tower a timm CLIP ViT (by name), the text tower a
    ``clip_text_model`` (read from its local config.json) pooled at the end-of-text token."""
    from .towers import ModelConfigError, resolve_text_path

    arch = model_cfg.image.name.partition(".")[0]
    if not _CLIP_VIT_NAME.match(arch) or model_cfg.text.pooling != "eos":
        return False
    try:
        return text_config_dict(resolve_text_path(model_cfg.text.name_or_path)).get("model_type") == "clip_text_model"
    except (ModelConfigError, OSError, ValueError):
        return False


def text_config_dict(folder: str) -> dict[str, Any]:
    """The text tower's ``config.json`` as a dict."""
    import json
    from pathlib import Path

    return json.loads((Path(folder) / "config.json").read_text())


def open_clip_model_config(
    model_cfg: ModelConfig, vision: VisionArch, text: dict[str, Any], eos_id: int
) -> dict[str, Any]:
    """An open_clip ``CLIP`` model config for our CLIP-type model (``text``: its CLIPTextConfig as a dict, with
    ``model.text.overrides`` applied; ``eos_id``: the tokenizer's end-of-text id, since OpenAI's own config says
    ``eos_token_id: 2``, a legacy value transformers reads as "pool at the largest id"). Text pooling: at the first
    end-of-text token (open_clip's ``pool_type: eos``), which is our end-of-text pooling for any vocabulary
    (``argmax`` would be so only where end-of-text is the largest id)."""
    text_quick = _quick_gelu(text.get("hidden_act", "quick_gelu"), "model.text hidden_act")
    if text_quick != vision.quick_gelu or not math.isclose(text.get("layer_norm_eps", 1e-5), 1e-5):
        raise ConfigError(
            "open_clip has one activation for both towers and LayerNorm eps 1e-5: the image tower uses "
            f"{'QuickGELU' if vision.quick_gelu else 'GELU'}, the text tower {text.get('hidden_act')!r} with eps "
            f"{text.get('layer_norm_eps')}"
        )
    width = int(text["hidden_size"])
    return {
        "embed_dim": model_cfg.embed_dim,
        "quick_gelu": vision.quick_gelu,
        "vision_cfg": {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "width": vision.width,
            "layers": vision.depth,
            "head_width": vision.width // vision.heads,
            "mlp_ratio": _mlp_ratio(vision.width, vision.mlp_dim),
        },
        "text_cfg": {
            "context_length": int(text["max_position_embeddings"]),
            "vocab_size": int(text["vocab_size"]),
            "width": width,
            "heads": int(text["num_attention_heads"]),
            "layers": int(text["num_hidden_layers"]),
            "mlp_ratio": _mlp_ratio(width, int(text["intermediate_size"])),
            "pool_type": "eos",
            "eos_id": int(eos_id),
            "pad_id": 0,  # open_clip's tokenizer pads with 0; unread under the causal mask (no padding mask)
        },
    }


def hf_clip_config(model_cfg: ModelConfig, vision: VisionArch, text: dict[str, Any], logit_scale: float) -> Any:
    """A Hugging Face ``CLIPConfig`` for our CLIP-type model."""
    from transformers import CLIPConfig

    vision_config = {
        "hidden_size": vision.width,
        "intermediate_size": vision.mlp_dim,
        "num_hidden_layers": vision.depth,
        "num_attention_heads": vision.heads,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "hidden_act": "quick_gelu" if vision.quick_gelu else "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": model_cfg.embed_dim,
    }
    text_config = {k: v for k, v in text.items() if k not in ("model_type", "transformers_version", "architectures")}
    text_config["projection_dim"] = model_cfg.embed_dim
    return CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=model_cfg.embed_dim,
        logit_scale_init_value=logit_scale,
    )
