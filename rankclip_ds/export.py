"""Consolidated model export, and loading of exports and training checkpoints without a DeepSpeed engine.

An export folder holds ``model.safetensors`` (fp32 weights of the whole dual encoder) and ``config.json`` (the
resolved run config, so the architecture can be rebuilt). :func:`load_model` rebuilds the model from that config
(towers built from their configs, never downloaded) and loads the weights strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import Config, config_from_dict, config_to_dict
from .model import DualEncoder, build_model, build_tokenizer

__all__ = [
    "EXPORT_CONFIG",
    "EXPORT_WEIGHTS",
    "architecture_config",
    "load_model",
    "model_source_config",
    "save_export",
]

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


def save_export(state_dict: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path) -> Path:
    """Write ``state_dict`` (as fp32, contiguous, untied copies) and the config to ``out_dir`` atomically.

    Files are written under temporary names and renamed, so a crash never leaves a half-written export that looks
    complete.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state_dict.items()}
    tmp_w = out / (EXPORT_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "pt", "producer": "rankclip_ds"})
    tmp_c = out / (EXPORT_CONFIG + ".tmp")
    tmp_c.write_text(json.dumps(config_to_dict(cfg), indent=2))
    os.replace(tmp_w, out / EXPORT_WEIGHTS)
    os.replace(tmp_c, out / EXPORT_CONFIG)
    return out


def architecture_config(cfg: Config) -> Config:
    """``cfg`` with weight loading switched off (no image weights file, text tower built from its config): for
    rebuilding a model whose every tensor comes from elsewhere. ``model.compile`` is switched off too: it is a
    training speed setting, not architecture (a loaded or evaluated copy would otherwise compile on first use)."""
    data = config_to_dict(cfg)
    data["model"]["image"]["weights"] = None
    data["model"]["text"]["pretrained"] = False
    data["model"]["compile"] = False
    return config_from_dict(data)


def load_export_config(path: str | Path) -> Config:
    """The run config stored beside an export."""
    p = Path(path) / EXPORT_CONFIG
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not an export folder (expected {EXPORT_CONFIG} and {EXPORT_WEIGHTS})")
    data: dict[str, Any] = json.loads(p.read_text())
    return config_from_dict(data)


def _is_training_checkpoint(path: Path) -> bool:
    # A DeepSpeed tag folder as the trainer writes it: <run>/checkpoints/step_XXXXXXXX/ with the model states.
    return any(path.glob("*model_states.pt"))  # mp_rank_00_… (ZeRO 0-2) or zero_pp_rank_0_mp_rank_00_… (ZeRO-3)


def model_source_config(path: str | Path) -> Config:
    """The run config behind an export folder (its ``config.json``) or a training checkpoint folder (the run's
    ``config.yaml`` two levels up)."""
    from .config import load_config

    path = Path(path)
    if not _is_training_checkpoint(path):
        return load_export_config(path)
    run_config = path.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise FileNotFoundError(
            f"{run_config}: the run's resolved config is not beside checkpoint {path}; keep checkpoints inside their "
            "run folder (<run>/checkpoints/step_…), or copy the run's config.yaml to that place"
        )
    return load_config(run_config)


def _checkpoint_state(path: Path) -> tuple[Config, dict[str, torch.Tensor], str]:
    """The run config and DeepSpeed's consolidated fp32 weights of a training checkpoint (any ZeRO stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return model_source_config(path), state, f"checkpoint {path}"


def load_model(path: str | Path, *, device: str | torch.device = "cpu", with_tokenizer: bool = False):
    """Load an export folder or a training checkpoint folder (``<run>/checkpoints/step_…``) without a DeepSpeed
    engine. Returns the model in eval mode, or ``(model, tokenizer)``.

    A checkpoint is consolidated with DeepSpeed's own ``zero_to_fp32`` (any ZeRO stage, any world size). The text
    tower is rebuilt from its config and never loads the pretrained weights it started from: every tensor comes
    from the export or checkpoint, and a missing or extra tensor is an error.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if _is_training_checkpoint(path):
        cfg, state, source = _checkpoint_state(path)
    else:
        cfg = load_export_config(path)
        weights = path / EXPORT_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing; the export at {path} is incomplete")
        state, source = load_file(str(weights)), str(weights)
    model: DualEncoder = build_model(architecture_config(cfg).model, device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{source}: does not match the architecture of its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.to(device).eval()
    if with_tokenizer:
        return model, build_tokenizer(cfg.model.text.name_or_path)
    return model
