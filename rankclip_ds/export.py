"""Consolidated model export, and loading of exports and training checkpoints without a DeepSpeed engine.

An export folder holds ``model.safetensors`` (fp32 weights of the whole dual encoder) and ``config.json``: the
model section of the run config under a format marker, ``{"format": "rankclip_ds.export/2", "model": {...}}``,
so the architecture can be rebuilt. Exports written before the marker existed hold the whole run config in
``config.json``; they load the same way, reading only its ``model`` section. :func:`load_model` rebuilds the model
from that section (towers built from their configs, never downloaded) and loads the weights strictly. Nothing of
the run's data, evaluation or process-group settings is read or validated: building the model does not need them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, config_to_dict, section_from_dict
from .model import DualEncoder, ModelConfig, architecture_only, build_model, build_tokenizer
from .model.clip_arch import is_clip_type
from .model.clip_export import write_clip_exports

__all__ = [
    "EXPORT_CONFIG",
    "EXPORT_FORMAT",
    "EXPORT_WEIGHTS",
    "consolidated_state",
    "load_model",
    "model_source_config",
    "save_export",
]

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_FORMAT = "rankclip_ds.export/2"
"""The format marker of ``config.json``. Format 1 (no marker) was the whole run config."""


def save_export(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Write ``state_dict`` (as fp32, contiguous, untied copies) and the model section ``model_cfg`` (the run
    config's ``cfg.model``) to ``out_dir`` atomically.

    Files are written under temporary names and renamed, so a crash never leaves a half-written export that looks
    complete. A CLIP-type model (a timm CLIP ViT and a ``clip_text_model`` text tower pooled at end-of-text, e.g.
    one started from ``model.init_from``) also gets ``open_clip/`` (an open_clip checkpoint and model config) and
    ``hf_clip/`` (a ``transformers.CLIPModel`` folder): see :mod:`rankclip_ds.model.clip_export`.
    """
    from safetensors.torch import save_file

    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(
            f"save_export: model_cfg is a {type(model_cfg).__name__}, not a ModelConfig; pass the run config's "
            "model section (cfg.model)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state_dict.items()}
    tmp_w = out / (EXPORT_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "pt", "producer": "rankclip_ds"})
    tmp_c = out / (EXPORT_CONFIG + ".tmp")
    tmp_c.write_text(json.dumps({"format": EXPORT_FORMAT, "model": config_to_dict(model_cfg)}, indent=2))
    os.replace(tmp_w, out / EXPORT_WEIGHTS)
    os.replace(tmp_c, out / EXPORT_CONFIG)
    if is_clip_type(model_cfg):  # the ecosystem's formats too: open_clip/ and hf_clip/ (model/clip_export.py)
        write_clip_exports(tensors, model_cfg, out)
    return out


def _model_section(data: Any, source: Path) -> Any:
    """The model section of an export's ``config.json``: format 2 (``{"format", "model"}``) or format 1 (the whole
    run config, of which only ``model`` is read)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: holds a {type(data).__name__}, not an export config; re-export the model")
    if "format" not in data:  # format 1: the run config as the trainer wrote it before the marker existed
        if "model" not in data:
            raise ConfigError(
                f"{source}: has neither a 'format' marker nor a 'model' section, so it is not a rankclip_ds export "
                f"config (keys: {sorted(data)[:8]}); point load_model at a folder written by save_export or the "
                "trainer"
            )
        return data["model"]
    if data["format"] != EXPORT_FORMAT:
        raise ConfigError(
            f"{source}: format={data['format']!r} is not one this version reads ({EXPORT_FORMAT!r}); load it with "
            "the rankclip_ds version that wrote it, or re-export"
        )
    extra = sorted(set(data) - {"format", "model"})
    if extra or "model" not in data:
        raise ConfigError(
            f"{source}: a {EXPORT_FORMAT} config holds exactly 'format' and 'model', found keys {sorted(data)}; "
            "re-export the model with save_export"
        )
    return data["model"]


def _validated_model_section(data: Any, source: Path) -> ModelConfig:
    """Build and validate the model section alone; a mistake names the file and the dotted key."""
    try:
        return section_from_dict(ModelConfig, data, "model")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _read_export_config(path: Path) -> ModelConfig:
    """The model section stored beside an export, validated alone."""
    p = path / EXPORT_CONFIG
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not an export folder (expected {EXPORT_CONFIG} and {EXPORT_WEIGHTS})")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}: not valid JSON ({exc}); the export is damaged, re-export the model") from exc
    return _validated_model_section(_model_section(data, p), p)


def _read_run_model_config(run_config: Path) -> ModelConfig:
    """The model section of a run's resolved ``config.yaml``, validated alone (defaults where it has none, as
    :func:`rankclip_ds.config.load_config` does)."""
    import yaml

    try:
        data = yaml.safe_load(run_config.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{run_config}: not valid YAML ({exc}); restore the run's resolved config") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{run_config}: the top level must be a mapping of sections; restore the run's config")
    return _validated_model_section(data.get("model") or {}, run_config)


def _is_training_checkpoint(path: Path) -> bool:
    # A DeepSpeed tag folder as the trainer writes it: <run>/checkpoints/step_XXXXXXXX/ with the model states.
    return any(path.glob("*model_states.pt"))  # mp_rank_00_… (ZeRO 0-2) or zero_pp_rank_0_mp_rank_00_… (ZeRO-3)


def model_source_config(path: str | Path) -> ModelConfig:
    """The model section behind an export folder (its ``config.json``, either format) or a training checkpoint
    folder (the run's ``config.yaml`` two levels up). Only that section is read and validated."""
    path = Path(path)
    if not _is_training_checkpoint(path):
        return _read_export_config(path)
    run_config = path.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise FileNotFoundError(
            f"{run_config}: the run's resolved config is not beside checkpoint {path}; keep checkpoints inside their "
            "run folder (<run>/checkpoints/step_…), or copy the run's config.yaml to that place"
        )
    return _read_run_model_config(run_config)


def consolidated_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own ``zero_to_fp32`` consolidation of a training checkpoint folder (any ZeRO stage, any world
    size): the whole model's fp32 weights, from the optimizer's master copies.

    Frozen parameters (a locked tower) have no master copy. ``zero_to_fp32`` finds them in the model states only
    where ZeRO-2/3 record them (``frozen_param_fragments``); under ZeRO-0/1 the engine's module weights in the model
    states file hold them whole, and they are taken from there (in the precision they trained in)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(checkpoint)
    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return _with_frozen_from_module_states(state, path)


def _with_frozen_from_module_states(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``state`` completed with the tensors only the module weights of ``path``'s model states hold (the frozen
    parameters of a ZeRO-0/1 checkpoint). ZeRO-3's module weights are empty placeholders and are never taken."""
    states = sorted(path.glob("*model_states.pt"))
    if not states:
        return state
    module = torch.load(str(states[0]), map_location="cpu", weights_only=False).get("module") or {}
    for key, tensor in module.items():
        if key not in state and torch.is_tensor(tensor) and tensor.numel() > 0 and tensor.is_floating_point():
            state[key] = tensor.to(torch.float32)
    return state


def _checkpoint_state(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """The model section and the consolidated fp32 weights of a training checkpoint."""
    return model_source_config(path), consolidated_state(path), f"checkpoint {path}"


def load_model(path: str | Path, *, device: str | torch.device = "cpu", with_tokenizer: bool = False):
    """Load an export folder or a training checkpoint folder (``<run>/checkpoints/step_…``) without a DeepSpeed
    engine. Returns the model in eval mode, or ``(model, tokenizer)``.

    A checkpoint is consolidated with DeepSpeed's own ``zero_to_fp32`` (any ZeRO stage, any world size). The text
    tower is rebuilt from its config and never loads the pretrained weights it started from: every tensor comes
    from the export or checkpoint, and a missing or extra tensor is an error. Only the model section of the
    stored config is read.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if _is_training_checkpoint(path):
        model_cfg, state, source = _checkpoint_state(path)
    else:
        model_cfg = _read_export_config(path)
        weights = path / EXPORT_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing; the export at {path} is incomplete")
        state, source = load_file(str(weights)), str(weights)
    model: DualEncoder = build_model(architecture_only(model_cfg), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{source}: does not match the architecture of its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.to(device).eval()
    if with_tokenizer:
        return model, build_tokenizer(model_cfg.text.name_or_path)
    return model
