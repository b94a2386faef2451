"""``model.init_from``: start from a whole CLIP checkpoint (a Hugging Face ``CLIPModel`` folder or hub id, or an
open_clip checkpoint file with ``model.open_clip_name``).

:func:`resolve_init_from` locates the source, derives our model section from its config (a timm CLIP ViT, the
CLIP text transformer pooled at the end-of-text token, the projections' size, the logit scale), converts the
weights to our keys once into a cache folder, and returns the model section with the derived fields filled in;
:func:`rankclip_ds.model.build_model` then loads the converted weights strictly. The cache folder,
``$HF_HOME/rankclip_ds/init_from/<digest>/`` (the digest covers the source's path, size, mtime and config), holds
``text/`` (the ``CLIPTextConfig`` and the tokenizer: the source's own, or OpenAI's BPE as a ``CLIPTokenizer`` for
open_clip), ``model.safetensors`` (the whole dual encoder in our keys) and ``rankclip_init_from.json`` (what it
was made from). It is written under a temporary name and renamed, so a crashed or concurrent writer never leaves a
half folder; a present folder is reused without any conversion work (every rank calls this; rank 0 first, with
downloads allowed).

:func:`check_init_from` is the pre-flight's view: the same derivation without writing anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ..problems import ConfigError, Problem, format_problems, problem_message
from .clip_arch import ClipArch, arch_from_hf_config, arch_from_open_clip_config
from .clip_source import ClipSource, SourceMissing, locate_source
from .config import ImageTowerConfig, ModelConfig, TextTowerConfig

__all__ = ["check_init_from", "converted_weights", "resolve_init_from"]

MARKER = "rankclip_init_from.json"
WEIGHTS = "model.safetensors"
# Text overrides that change the converted tower's tensors or depth (the converted weights would not load).
_ARCH_OVERRIDES = {"hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "max_position_embeddings",
                   "num_hidden_layers"}  # fmt: skip


def _converted_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "rankclip_ds" / "init_from"


def _source_arch(source: ClipSource, open_clip_name: str | None) -> ClipArch:
    """The architecture from the source's config (reads config.json only)."""
    if source.kind == "open_clip":
        assert source.open_clip_config is not None and open_clip_name
        return arch_from_open_clip_config(source.open_clip_config, open_clip_name)
    from transformers import AutoConfig, CLIPConfig

    config = AutoConfig.from_pretrained(str(source.path), local_files_only=True)
    if not isinstance(config, CLIPConfig):
        raise ConfigError(
            problem_message(
                "model.init_from",
                str(source.path),
                f"holds a {type(config).__name__} (model_type {config.model_type!r}), not a CLIPModel",
                "give a Hugging Face CLIPModel folder or hub id, or an open_clip checkpoint with model.open_clip_name",
            )
        )
    return arch_from_hf_config(config)


# ------------------------------------------------------------------------------------------------ derived config
def _derived_fields(arch: ClipArch, folder: Path) -> list[tuple[str, str, str, Any]]:
    """(section, field, dotted key, derived value) of every field ``init_from`` decides."""
    return [
        ("image", "name", "model.image.name", arch.image_name),
        ("image", "model_kwargs", "model.image.model_kwargs", dict(arch.model_kwargs)),
        ("image", "image_size", "model.image.image_size", arch.image_size),
        ("text", "name_or_path", "model.text.name_or_path", str(folder / "text")),
        ("text", "pretrained", "model.text.pretrained", False),
        ("text", "pooling", "model.text.pooling", "eos"),
        ("text", "max_length", "model.text.max_length", arch.context_length),
        ("", "embed_dim", "model.embed_dim", arch.embed_dim),
        ("", "init_logit_scale", "model.init_logit_scale", arch.init_logit_scale),
    ]


_DEFAULTS = {"image": ImageTowerConfig(), "text": TextTowerConfig(), "": ModelConfig()}


def _contradictions(cfg: ModelConfig, arch: ClipArch, folder: Path) -> list[Problem]:
    """Fields set to a value that is neither the default nor what the checkpoint says, and per-tower weights."""
    source = f"model.init_from={cfg.init_from!r}"
    problems = [
        Problem.of(
            f"model.image.{name}",
            getattr(cfg.image, name),
            f"is set together with {source}: the image tower's weights come from that checkpoint",
            f"remove model.image.{name}",
        )
        for name in ("weights", "pretrained")
        if getattr(cfg.image, name)
    ]
    for section, name, key, derived in _derived_fields(arch, folder):
        value = getattr(getattr(cfg, section) if section else cfg, name)
        default = getattr(_DEFAULTS[section], name)
        if value not in (default, derived):
            problems.append(
                Problem.of(
                    key,
                    value,
                    f"contradicts {source}, whose architecture has {key.removeprefix('model.')}={derived!r}",
                    f"remove {key} (it is derived from the checkpoint), or set it to {derived!r}",
                )
            )
    reshaping = sorted(_ARCH_OVERRIDES & set(cfg.text.overrides))
    if reshaping:
        problems.append(
            Problem.of(
                "model.text.overrides",
                cfg.text.overrides,
                f"{reshaping} change the text tower of {source}, so its weights would not load",
                "keep only overrides that leave the architecture alone (dropout rates)",
            )
        )
    return problems


def _derive(cfg: ModelConfig, arch: ClipArch, folder: Path) -> ModelConfig:
    values: dict[str, dict[str, Any]] = {"image": {}, "text": {}, "": {}}
    for section, name, _, derived in _derived_fields(arch, folder):
        values[section][name] = derived
    return dataclasses.replace(
        cfg,
        image=dataclasses.replace(cfg.image, **values["image"]),
        text=dataclasses.replace(cfg.text, **values["text"]),
        **values[""],
    )


# ------------------------------------------------------------------------------------------------ shape check
def _expected_shapes(arch: ClipArch, source: ClipSource) -> dict[str, tuple[int, ...]]:
    """The tensor shapes the source's config promises, in the source's own keys: our towers built on the meta
    device (no memory), mapped back to the source layout."""
    import timm
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_keys import ours_to_hf, ours_to_open_clip

    with torch.device("meta"):
        trunk = timm.create_model(
            arch.image_name, pretrained=False, num_classes=0, img_size=arch.image_size, **arch.model_kwargs
        )
        text_config = CLIPTextConfig(**{k: v for k, v in arch.text_config.items() if k != "model_type"})
        text = CLIPTextModel(text_config)
    state = {f"image_tower.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state |= {f"text_tower.encoder.{k}": v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    e = arch.embed_dim
    state |= {"image_proj.weight": torch.empty(e, trunk.embed_dim, device="meta"),
              "text_proj.weight": torch.empty(e, text_config.hidden_size, device="meta"),
              "logit_scale": torch.empty(1, device="meta")}  # fmt: skip
    if source.kind == "hf":
        return {k: tuple(v.shape) for k, v in ours_to_hf(state).items()}
    prefix = "text." if (source.open_clip_config or {}).get("custom_text") else ""
    mapped = ours_to_open_clip(state)
    return {(k if k.startswith(("visual.", "logit_scale")) else prefix + k): tuple(v.shape) for k, v in mapped.items()}


def _first_mismatch(source: ClipSource, arch: ClipArch, open_clip_name: str | None) -> Problem | None:
    """The first tensor whose shape in the checkpoint differs from what the model config says (or is missing)."""
    from .clip_source import read_checkpoint_shapes

    found = read_checkpoint_shapes(source.weights)
    found = {k: v for k, v in found.items() if not k.endswith(("position_ids", "attn_mask"))}
    for key, expected in _expected_shapes(arch, source).items():
        have = found.get(key)
        if have is None or (have != expected and not (key == "logit_scale" and have in ((), (1,)))):
            name = f"model.open_clip_name={open_clip_name!r}" if open_clip_name else f"the config of {source.path}"
            state = "is missing from" if have is None else f"has shape {list(have)} in"
            return Problem.of(
                "model.open_clip_name" if open_clip_name else "model.init_from",
                open_clip_name or str(source.path),
                f"does not match the checkpoint {str(source.weights)!r}: tensor {key!r} {state} the checkpoint, "
                f"but {name} expects {list(expected)}",
                "give the open_clip model name the checkpoint was trained as (e.g. ViT-B-32 vs ViT-B-16), or the "
                "checkpoint that belongs to this name",
            )
    return None


# ------------------------------------------------------------------------------------------------ conversion
def _convert_weights(source: ClipSource) -> dict[str, Any]:
    from .clip_keys import KeyMapError, hf_to_ours, open_clip_to_ours
    from .clip_source import read_checkpoint

    state = read_checkpoint(source.weights)
    try:
        if source.kind == "hf":
            return hf_to_ours(state)
        text_prefix = "text." if (source.open_clip_config or {}).get("custom_text") else ""
        return open_clip_to_ours(state, text_prefix=text_prefix)
    except KeyMapError as exc:
        raise ConfigError(
            problem_message("model.init_from", str(source.weights), str(exc), "check the source")
        ) from exc


def _write_text_folder(source: ClipSource, arch: ClipArch, text_dir: Path) -> None:
    from transformers import AutoTokenizer, CLIPTextConfig

    CLIPTextConfig(**{k: v for k, v in arch.text_config.items() if k != "model_type"}).save_pretrained(text_dir)
    if source.kind == "hf":
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                problem_message(
                    "model.init_from",
                    str(source.path),
                    f"its tokenizer does not load ({exc})",
                    "save the CLIP tokenizer into the folder too (tokenizer.save_pretrained)",
                )
            ) from exc
        tokenizer.model_max_length = arch.context_length
    else:
        from .clip_source import openai_bpe_tokenizer

        tokenizer = openai_bpe_tokenizer(arch.context_length)
    tokenizer.save_pretrained(text_dir)


def _write_converted(source: ClipSource, arch: ClipArch, cfg: ModelConfig, folder: Path) -> None:
    """Convert into a temporary sibling of ``folder`` and rename it into place (atomic: the folder either is
    complete or does not exist). A concurrent writer that finished first wins; this one's copy is removed."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_text_folder(source, arch, tmp / "text")
        state = {k: v.detach().to("cpu").float().contiguous() for k, v in _convert_weights(source).items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "rankclip_ds.init_from"})
        marker = {"init_from": cfg.init_from, "open_clip_name": cfg.open_clip_name, "source": str(source.path)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / MARKER).is_file():  # not a finished concurrent writer: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ entry points
def resolve_init_from(model_cfg: ModelConfig, *, local_files_only: bool) -> ModelConfig:
    """The model section with every field ``init_from`` decides filled in (``model_cfg`` itself when ``init_from``
    is unset), the checkpoint converted into the cache if it is not there yet. ``local_files_only``: never
    download a hub id (the other ranks, after rank 0 fetched it). Idempotent: a derived config derives itself.
    A contradicting field, per-tower weights, an unknown source or a mismatching open_clip name is a
    :class:`ConfigError` naming the field, the value and the fix."""
    if not model_cfg.init_from:
        return model_cfg
    source = locate_source(model_cfg.init_from, model_cfg.open_clip_name, local_files_only=local_files_only)
    arch = _source_arch(source, model_cfg.open_clip_name)
    folder = _converted_root() / source.digest()
    problems = _contradictions(model_cfg, arch, folder)
    if problems:
        raise ConfigError(format_problems(problems))
    if not (folder / MARKER).is_file():
        mismatch = _first_mismatch(source, arch, model_cfg.open_clip_name)
        if mismatch is not None:
            raise ConfigError(mismatch.message)
        _write_converted(source, arch, model_cfg, folder)
    return _derive(model_cfg, arch, folder)


def check_init_from(model_cfg: ModelConfig) -> list[Problem]:
    """The pre-flight's checks of ``init_from`` (nothing written or downloaded): the source is here (a hub id in
    the cache, or allowed to download), the open_clip name is known and matches the checkpoint's shapes, no field
    contradicts it; the derived image tower is checked as any image tower is."""
    if not model_cfg.init_from:
        return []
    from huggingface_hub import constants

    from .checks import check_image_tower

    try:
        source = locate_source(model_cfg.init_from, model_cfg.open_clip_name, local_files_only=True)
        arch = _source_arch(source, model_cfg.open_clip_name)
    except SourceMissing as exc:
        if exc.hub_id and not constants.HF_HUB_OFFLINE:
            return []  # a hub id not cached yet: rank 0 downloads it, and resolve_init_from checks it then
        return [Problem(exc.key, str(exc), machine=True)]
    except ConfigError as exc:
        return [Problem("model.open_clip_name" if model_cfg.open_clip_name else "model.init_from", str(exc))]
    folder = _converted_root() / source.digest()
    problems = _contradictions(model_cfg, arch, folder)
    if not (folder / MARKER).is_file():
        mismatch = _first_mismatch(source, arch, model_cfg.open_clip_name)
        problems += [mismatch] if mismatch else []
    return problems + check_image_tower(_derive(model_cfg, arch, folder).image)


def converted_weights(model_cfg: ModelConfig) -> Path:
    """The converted ``model.safetensors`` of a derived config; a config :func:`resolve_init_from` has not
    derived is an error that says so."""
    from .towers import ModelConfigError

    folder = Path(model_cfg.text.name_or_path).expanduser().parent
    marker = folder / MARKER
    made_from = json.loads(marker.read_text()) if marker.is_file() else {}
    if made_from.get("init_from") != model_cfg.init_from or made_from.get("open_clip_name") != model_cfg.open_clip_name:
        raise ModelConfigError(
            f"model.init_from={model_cfg.init_from!r}: this model config has not been derived from it "
            f"(model.text.name_or_path={model_cfg.text.name_or_path!r}, model.image.name={model_cfg.image.name!r}). "
            "Fix: call rankclip_ds.model.clip_init.resolve_init_from(cfg.model, local_files_only=...) and build the "
            "model from the config it returns"
        )
    return folder / WEIGHTS
