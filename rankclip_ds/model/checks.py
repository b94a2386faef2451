"""Cheap checks of the two towers' settings, for the pre-flight: nothing is built, loaded or downloaded.

Each check takes its tower's config section and returns every :class:`~rankclip_ds.problems.Problem` it finds
(empty when the tower can be built): whether the timm architecture exists, whether the text model resolves offline
and takes its overrides, whether the files the towers will read are on this machine.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from ..problems import Problem, suggest
from .config import ImageTowerConfig, TextTowerConfig

__all__ = ["check_image_tower", "check_text_tower"]

# Files a Hugging Face folder needs for the tokenizer (any one of them) and for pretrained weights (any one).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ------------------------------------------------------------------------------------------------ image tower
def check_image_tower(image: ImageTowerConfig) -> list[Problem]:
    """The timm architecture (and pretrained tag) exists, and a weights file, if named, is there."""
    import timm

    problems = []
    arch, _, tag = image.name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        if not close:
            close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        problems.append(
            Problem(
                "model.image.name",
                f"model.image.name={image.name!r} is not a timm model. Fix: pick one from timm.list_models()"
                + (f"; did you mean {', '.join(close)}?" if close else ""),
            )
        )
    elif tag:
        tags = [name.partition(".")[2] for name in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            problems.append(
                Problem.of(
                    "model.image.name",
                    image.name,
                    f"timm knows no tag {tag!r} for {arch!r} (the tag selects its preprocessing config; "
                    "nothing is downloaded)",
                    f"use the bare name {arch!r}"
                    + (f" or one of {', '.join(f'{arch}.{t}' for t in tags[:4])}" if tags else ""),
                )
            )
    if image.weights and not Path(image.weights).is_file():
        problems.append(
            Problem.of(
                "model.image.weights",
                image.weights,
                "no such file",
                "give a local .safetensors/.pth/.bin file, or null to train the image tower from scratch",
                machine=True,
            )
        )
    return problems


# ------------------------------------------------------------------------------------------------ text tower
def check_text_tower(text: TextTowerConfig) -> list[Problem]:
    """The text model resolves offline, its config takes the overrides, and the tokenizer (and the weights,
    when pretrained) are in its folder. Reads config.json only; nothing is built."""
    folder, problems = _text_folder(text)
    if folder is None:
        return problems
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # any failure to read config.json: JSON, unknown model_type, ...
        detail = " ".join(str(exc).split())
        problem = f"its config.json cannot be read ({detail})"
        return [
            Problem.of("model.text.name_or_path", text.name_or_path, problem, "re-save the model with save_pretrained")
        ]
    return _check_overrides(text, hf_config) + _check_text_files(text, folder)


def _text_folder(text: TextTowerConfig) -> tuple[Path | None, list[Problem]]:
    """The local folder of the text model (a builtin alias resolved to its pip package's folder), or ``None`` with
    the problem that stops every further text check."""
    from .towers import BUILTIN_TEXT_MODELS, ModelConfigError, resolve_text_path

    field = "model.text.name_or_path"
    if text.name_or_path not in BUILTIN_TEXT_MODELS:
        path = Path(text.name_or_path).expanduser()
        if not path.exists():
            return None, [
                Problem.of(
                    field,
                    text.name_or_path,
                    "no such folder on this machine (Hugging Face hub names are never downloaded)",
                    "save the model and its tokenizer there first (save_pretrained), or use "
                    + " / ".join(BUILTIN_TEXT_MODELS),
                )
            ]
    try:
        return Path(resolve_text_path(text.name_or_path)), []
    except ModelConfigError as exc:
        return None, [Problem(field, str(exc))]


def _check_overrides(text: TextTowerConfig, hf_config: Any) -> list[Problem]:
    """Each override names a field of the Hugging Face config (applied to ``hf_config`` in place), and
    ``max_length`` fits the position embeddings of the overridden config."""
    problems = []
    known = sorted(hf_config.to_dict())
    for key, value in text.overrides.items():
        if not hasattr(hf_config, key):
            problems.append(
                Problem.of(
                    f"model.text.overrides.{key}",
                    value,
                    f"{type(hf_config).__name__} has no field {key!r}",
                    "use a field of its config.json" + (suggest(key, known) or ", e.g. num_hidden_layers"),
                )
            )
        else:
            setattr(hf_config, key, value)
    max_positions = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and text.max_length > max_positions:
        problems.append(
            Problem.of(
                "model.text.max_length",
                text.max_length,
                f"exceeds the text model's max_position_embeddings={max_positions}: longer token sequences "
                "have no position embedding",
                f"use model.text.max_length <= {max_positions}",
            )
        )
    return problems


def _check_text_files(text: TextTowerConfig, folder: Path) -> list[Problem]:
    """The tokenizer files, and the weights when ``pretrained``, are in ``folder`` (problems of this machine)."""
    problems = []
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        problems.append(
            Problem.of(
                "model.text.name_or_path",
                text.name_or_path,
                f"the folder {str(folder)!r} has no tokenizer file",
                "save the tokenizer there too (tokenizer.save_pretrained)",
                machine=True,
            )
        )
    if text.pretrained and not any((folder / name).is_file() for name in _WEIGHT_FILES):
        problems.append(
            Problem.of(
                "model.text.pretrained",
                True,
                f"the folder {str(folder)!r} has no weights ({' / '.join(_WEIGHT_FILES[::2])})",
                "save the weights there (save_pretrained), or set model.text.pretrained=false to train the "
                "text tower from scratch",
                machine=True,
            )
        )
    return problems
