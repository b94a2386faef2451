"""Our CLIP-type model in the two formats the ecosystem reads: an open_clip checkpoint with its model config, and a
Hugging Face ``CLIPModel`` folder.

- ``open_clip/``: ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``: loads with
  ``open_clip.create_model_and_transforms("local-dir:" + folder)``), ``<name>.json`` (the bare model config, for
  ``open_clip.add_model_config``) and ``open_clip_model.safetensors`` (open_clip ``CLIP`` keys; loads with
  ``create_model_and_transforms(name, pretrained=file)``). open_clip's own tokenizer (``SimpleTokenizer``, OpenAI's
  BPE, zero-padded) gives the same ids as our CLIP tokenizer; the text tower pools at the first end-of-text token
  (``pool_type: eos``), and its causal mask keeps padding (0 there, end-of-text here) out of that token's output.
- ``hf_clip/``: ``config.json`` + ``model.safetensors`` (``CLIPModel.from_pretrained``), the tokenizer, and
  ``preprocessor_config.json`` (a ``CLIPImageProcessor``: resize the shortest edge, center crop, mean/std of the
  image tower).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..problems import ConfigError
from .clip_arch import VisionArch, hf_clip_config, open_clip_model_config, vision_arch
from .config import ModelConfig

__all__ = ["HF_CLIP_DIR", "OPEN_CLIP_DIR", "write_clip_exports"]

log = logging.getLogger(__name__)

OPEN_CLIP_DIR, HF_CLIP_DIR = "open_clip", "hf_clip"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def _text_config(model_cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """The text tower's folder and its ``CLIPTextConfig`` as a dict, with ``model.text.overrides`` applied."""
    from transformers import AutoConfig

    from .towers import resolve_text_path

    folder = resolve_text_path(model_cfg.text.name_or_path)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    for key, value in model_cfg.text.overrides.items():
        setattr(config, key, value)
    return folder, config.to_dict()


def _write_folder(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of ``target`` with ``write`` and put it in ``target``'s place: a crash leaves the
    old folder or none, never a half-written one."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def open_clip_name(out_dir: Path) -> str:
    """The model name the open_clip export registers under (its config file's stem): ``rankclip-<folder name>``."""
    return "rankclip-" + re.sub(r"[^A-Za-z0-9_.-]", "-", out_dir.resolve().name)


def _write_open_clip(state, model_cfg: ModelConfig, vision: VisionArch, text: dict[str, Any], eos_id: int, out_dir):
    from .clip_keys import ours_to_open_clip

    model_config = open_clip_model_config(model_cfg, vision, text, eos_id)
    preprocess = {"size": vision.image_size, "mean": list(vision.mean), "std": list(vision.std),
                  "interpolation": "bicubic", "resize_mode": "shortest"}  # fmt: skip
    name = open_clip_name(out_dir)

    def write(folder: Path) -> None:
        config = {"model_cfg": model_config, "preprocess_cfg": preprocess}
        (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        (folder / f"{name}.json").write_text(json.dumps(model_config, indent=2))
        _save(ours_to_open_clip(state), folder / OPEN_CLIP_WEIGHTS)

    _write_folder(out_dir / OPEN_CLIP_DIR, write)


def _write_hf_clip(state, model_cfg: ModelConfig, vision: VisionArch, tokenizer, text: dict, out_dir: Path) -> None:
    from transformers import CLIPImageProcessor

    from .clip_keys import ours_to_hf

    config = hf_clip_config(model_cfg, vision, text, float(state["logit_scale"].reshape(())))
    config.architectures = ["CLIPModel"]
    size = vision.image_size
    processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(vision.mean),
        image_std=list(vision.std),
        resample=3,  # bicubic
    )

    def write(folder: Path) -> None:
        config.save_pretrained(folder)
        _save(ours_to_hf(state), folder / "model.safetensors")
        tokenizer.save_pretrained(folder)
        processor.save_pretrained(folder)

    _write_folder(out_dir / HF_CLIP_DIR, write)


def write_clip_exports(state: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: Path) -> list[str]:
    """Write ``open_clip/`` and ``hf_clip/`` beside an export of a CLIP-type model (see
    :func:`.clip_arch.is_clip_type`); returns the folders written. A model open_clip cannot express (different
    activations in the two towers) gets the Hugging Face folder only, with a warning."""
    from transformers import AutoTokenizer

    vision = vision_arch(model_cfg)
    text_folder, text = _text_config(model_cfg)
    tokenizer = AutoTokenizer.from_pretrained(text_folder, local_files_only=True)
    tokenizer.model_max_length = int(text["max_position_embeddings"])
    written = []
    try:
        _write_open_clip(state, model_cfg, vision, text, tokenizer.eos_token_id, out_dir)
        written.append(OPEN_CLIP_DIR)
    except ConfigError as exc:
        log.warning("export %s: no open_clip checkpoint: %s", out_dir, exc)
    _write_hf_clip(state, model_cfg, vision, tokenizer, text, out_dir)
    written.append(HF_CLIP_DIR)
    return written
