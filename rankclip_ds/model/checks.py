"""Cheap checks of the two towers' settings, for the pre-flight: nothing is built, loaded or downloaded.

Each check takes its tower's config section and returns every :class:`~rankclip_ds.problems.Problem` it finds
(empty when the tower can be built): whether the timm architecture (and its published weights) exists, whether the
text model resolves and takes its overrides, whether the files the towers will read are on this machine. A hub id
or timm's published weights missing from the Hugging Face cache is a problem only offline (``HF_HUB_OFFLINE=1``):
online, rank 0 downloads them before the model is built (:func:`rankclip_ds.model.hub.fetch_model_files`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from ..problems import Problem, suggest
from . import hub
from .config import ImageTowerConfig, TextTowerConfig

__all__ = ["check_image_tower", "check_text_tower"]


# ------------------------------------------------------------------------------------------------ image tower
def check_image_tower(image: ImageTowerConfig) -> list[Problem]:
    """The timm architecture (and pretrained tag) exists; with ``pretrained``, timm publishes weights for it (and
    offline, they are in the cache); a weights file, if named, is there."""
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
    elif tag and tag not in (tags := [name.partition(".")[2] for name in timm.list_pretrained(f"{arch}.*")]):
        problems.append(
            Problem.of(
                "model.image.name",
                image.name,
                f"timm knows no tag {tag!r} for {arch!r} (the tag selects its preprocessing config, and with "
                "model.image.pretrained its weights)",
                f"use the bare name {arch!r}"
                + (f" or one of {', '.join(f'{arch}.{t}' for t in tags[:4])}" if tags else ""),
            )
        )
    elif image.pretrained:
        problems += _check_timm_weights(image)
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


def _check_timm_weights(image: ImageTowerConfig) -> list[Problem]:
    """timm publishes weights for ``image.name``; offline, the file timm reads is in the cache."""
    source = hub.timm_weights(image.name)
    if source is None:
        import timm

        tags = timm.list_pretrained(f"{image.name.partition('.')[0]}.*")[:4]
        return [
            Problem.of(
                "model.image.pretrained",
                True,
                f"timm has no published weights for {image.name!r}",
                (f"use a name with weights, e.g. {', '.join(tags)}" if tags else "pick one from timm.list_pretrained()")
                + ", or set model.image.pretrained=false",
            )
        ]
    if hub.offline() and hub.cached_timm_weights(source) is None:
        return [Problem.of("model.image.pretrained", True, *hub.timm_miss(source), machine=True)]
    return []


# ------------------------------------------------------------------------------------------------ text tower
def check_text_tower(text: TextTowerConfig) -> list[Problem]:
    """The text model resolves (a hub id: offline, it is in the cache), its config takes the overrides, and the
    tokenizer (and the weights, when pretrained) are in its folder. Reads config.json only; nothing is built.

    A hub id not yet (or not wholly) in the cache is no problem online: rank 0 downloads what is missing before the
    model is built. Its config and files are then checked only when they are there."""
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
    problems = _check_overrides(text, hf_config)
    repo_id = hub.text_hub_id(text.name_or_path)
    if repo_id is None or hub.offline():  # online, rank 0 fetches what a hub snapshot lacks
        problems += _check_text_files(text, folder, repo_id)
    return problems


def _text_folder(text: TextTowerConfig) -> tuple[Path | None, list[Problem]]:
    """The local folder of the text model (a builtin alias resolved to its pip package's folder, a hub id to its
    snapshot in the cache), or ``None`` with the problems that stop every further text check (none for a hub id
    not cached while online: rank 0 will download it)."""
    from .towers import BUILTIN_TEXT_MODELS, ModelConfigError, resolve_text_path

    field = "model.text.name_or_path"
    repo_id = hub.text_hub_id(text.name_or_path)
    if repo_id is not None:
        snapshot = hub.cached_snapshot(repo_id)
        if snapshot is None and hub.offline():
            return None, [Problem.of(field, repo_id, *hub.text_miss(repo_id))]
        return snapshot, []
    if text.name_or_path not in BUILTIN_TEXT_MODELS and not Path(text.name_or_path).expanduser().exists():
        return None, [
            Problem.of(
                field,
                text.name_or_path,
                "no such folder on this machine, and not a Hugging Face hub id ('name' or 'org/name')",
                "save the model and its tokenizer there first (save_pretrained), give a hub id such as "
                "bert-base-uncased, or use " + " / ".join(BUILTIN_TEXT_MODELS),
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


def _check_text_files(text: TextTowerConfig, folder: Path, repo_id: str | None) -> list[Problem]:
    """The tokenizer files, and the weights when ``pretrained``, are in ``folder`` (problems of this machine);
    ``folder`` is the cached snapshot of hub id ``repo_id`` when that is given."""
    refill = f"run `hf download {repo_id}` on a machine with internet access" if repo_id else None
    problems = []
    if not hub.has_tokenizer(folder):
        problems.append(
            Problem.of(
                "model.text.name_or_path",
                text.name_or_path,
                f"the folder {str(folder)!r} has no tokenizer file",
                refill or "save the tokenizer there too (tokenizer.save_pretrained)",
                machine=True,
            )
        )
    if text.pretrained and not hub.has_weights(folder):
        problems.append(
            Problem.of(
                "model.text.pretrained",
                True,
                f"the folder {str(folder)!r} has no weights ({' / '.join(hub.WEIGHT_FILES[::2])})",
                (refill or "save the weights there (save_pretrained)")
                + ", or set model.text.pretrained=false to train the text tower from scratch",
                machine=True,
            )
        )
    return problems
