"""Hugging Face hub names of the two towers: where their files are in the standard cache, how they get there, and
what a miss says.

``model.text.name_or_path`` may be a hub id (``bert-base-uncased``, ``org/name``); an image tower with
``model.image.pretrained`` takes timm's published weights, which timm keeps on the hub as ``timm/<arch>.<tag>``.
Both live in huggingface_hub's cache (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``):
``models--org--name/snapshots/<commit>/<file>``, with ``refs/main`` naming the commit. Building a model only
reads that cache (:func:`cached_snapshot`, :func:`cached_timm_weights`); :func:`fetch_model_files` is the one
place that downloads, called by the trainer on rank 0 while the other ranks wait (``trainer/setup.py``). With
``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) nothing downloads, and a miss names the id, the cache folder
searched and the command that fills it (:func:`text_miss`, :func:`timm_miss`).

huggingface_hub reads ``HF_HOME``/``HF_HUB_CACHE``/``HF_HUB_OFFLINE`` once, when it is imported, into
``huggingface_hub.constants``; every function here reads those constants when it is called. Nothing here imports
torch at module level: the pre-flight uses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..problems import ConfigError, problem_message
from .config import ModelConfig

__all__ = [
    "TOKENIZER_FILES",
    "WEIGHT_FILES",
    "TimmWeights",
    "cached_snapshot",
    "cached_timm_weights",
    "download_text_model",
    "download_timm_weights",
    "fetch_model_files",
    "has_tokenizer",
    "has_weights",
    "hub_cache",
    "is_hub_id",
    "offline",
    "text_hub_id",
    "text_miss",
    "timm_miss",
    "timm_weights",
]

# Files a Hugging Face folder needs for the tokenizer (any one of them) and for pretrained weights (any one).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# What a text tower takes from its hub repository (never the TF/Flax/ONNX/Core ML copies many repositories hold):
# the config, the tokenizer, and one weight format, safetensors when the repository has it.
_TEXT_PATTERNS = ("config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt", *TOKENIZER_FILES)
_SAFETENSORS_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
_PICKLE_PATTERNS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")


# ------------------------------------------------------------------------------------------------ the cache
def offline() -> bool:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1`` when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> Path:
    """The cache folder searched and filled: ``HF_HUB_CACHE``, by default ``$HF_HOME/hub``."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline_switch() -> str:
    """The variable that switched offline mode on, as the user would unset it."""
    return (
        "TRANSFORMERS_OFFLINE"
        if os.environ.get("TRANSFORMERS_OFFLINE") and not os.environ.get("HF_HUB_OFFLINE")
        else "HF_HUB_OFFLINE"
    )


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub model id: ``name`` or ``org/name`` (letters, digits, ``-_.``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ text tower
def text_hub_id(name_or_path: str) -> str | None:
    """The hub id ``model.text.name_or_path`` stands for, or None. Resolution order: a ``builtin:`` alias, then an
    existing local folder, then a hub id (so a local folder ``org/name`` wins over the hub repository)."""
    if name_or_path.startswith("builtin:") or Path(name_or_path).expanduser().exists():
        return None
    return name_or_path if is_hub_id(name_or_path) else None


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` in the cache (the commit ``refs/main`` names) when it holds a
    ``config.json``, else None. Reads the cache only."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None  # None, or a cached "does not exist" marker


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer file."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds transformers weights (safetensors or pickled, single or sharded)."""
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def download_text_model(
    repo_id: str, *, weights: bool = True, local_files_only: bool = False, field: str = "model.text.name_or_path"
) -> Path:
    """Download ``repo_id``'s config and tokenizer, and with ``weights`` one weight format (safetensors when the
    repository has them, else the pickled files), into the cache; returns the snapshot folder. With
    ``local_files_only`` nothing is downloaded and a cache miss raises huggingface_hub's
    ``LocalEntryNotFoundError`` (the caller words the miss). ``field`` is the setting named in errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    patterns = [*_TEXT_PATTERNS, *(_SAFETENSORS_PATTERNS if weights else ())]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_files_only))
        if weights and not has_weights(folder):
            folder = Path(
                snapshot_download(repo_id, allow_patterns=list(_PICKLE_PATTERNS), local_files_only=local_files_only)
            )
    except RepositoryNotFoundError as exc:  # also a gated repository without access
        problem = f"the Hugging Face hub has no model repository of that name, or it is gated ({type(exc).__name__})"
        fix = "check the id on huggingface.co; for a gated model accept its terms there and run `hf auth login`"
        raise ConfigError(problem_message(field, repo_id, problem, fix)) from exc
    if not (folder / "config.json").is_file():
        problem = "its hub repository has no config.json: it is not a transformers model"
        raise ConfigError(problem_message(field, repo_id, problem, "use a transformers model"))
    return folder


def text_miss(repo_id: str) -> tuple[str, str]:
    """(problem, fix) for a text hub id that is not in the cache, offline or online."""
    where = f"a Hugging Face hub id not in the cache {str(hub_cache())!r} (HF_HUB_CACHE), nor a local folder"
    command = f"`hf download {repo_id}`"
    if offline():
        switch = _offline_switch()
        return (
            f"{where}, and {switch}=1 forbids downloading it",
            f"run {command} on a machine with internet access (into the same HF_HUB_CACHE, or copy that cache "
            f"folder here), or unset {switch} so that rank 0 downloads it",
        )
    return (
        f"{where}; building a model only reads the cache",
        f"train with the trainer (rank 0 downloads it first), call rankclip_ds.model.hub.fetch_model_files first, "
        f"or run {command}",
    )


# ------------------------------------------------------------------------------------------------ timm weights
@dataclass(frozen=True)
class TimmWeights:
    """Where timm takes the published weights of one model name from (its ``pretrained_cfg``)."""

    name: str
    hub_id: str | None
    """``timm/<arch>.<tag>``: a hub repository (timm's source whenever the registry names one)."""
    revision: str | None
    filenames: tuple[str, ...]
    """The files timm tries in the repository, in its order (the safetensors alternative first)."""
    url: str | None
    """A plain URL (a few legacy weights only): timm keeps them in torch's hub cache."""

    def describe(self) -> str:
        if self.hub_id:
            return f"{self.hub_id} ({' or '.join(self.filenames)})"
        return f"{self.url} (torch hub cache {_torch_checkpoints()})"


def timm_weights(name: str) -> TimmWeights | None:
    """Where timm finds the published weights of ``name`` (``arch`` or ``arch.tag``), or None when it has none."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")  # timm's "repo@revision"
        return TimmWeights(name, repo_id, revision or None, _timm_filenames(cfg.hf_hub_filename), None)
    if cfg.url:
        return TimmWeights(name, None, None, (), cfg.url)
    return None


def _timm_filenames(filename: str | None) -> tuple[str, ...]:
    """The files timm's ``load_state_dict_from_hf`` tries for ``filename`` (default ``pytorch_model.bin``)."""
    filename = filename or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return (filename,)
    safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    return (safe.get(filename, filename.removesuffix(".bin") + ".safetensors"), filename)


def _torch_checkpoints() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_timm_weights(weights: TimmWeights) -> Path | None:
    """The cached weights file timm would read for ``weights``, or None. Reads the cache only."""
    if weights.url and not weights.hub_id:
        path = _torch_checkpoints() / os.path.basename(weights.url.split("?")[0])
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    for filename in weights.filenames:
        found = try_to_load_from_cache(weights.hub_id, filename, revision=weights.revision)
        if isinstance(found, str):
            return Path(found)
    return None


def download_timm_weights(weights: TimmWeights) -> Path:
    """Download the file timm will look for (the first of its candidates the repository has) into the cache."""
    if weights.url and not weights.hub_id:
        import torch.hub

        path = _torch_checkpoints() / os.path.basename(weights.url.split("?")[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path))
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for filename in weights.filenames[:-1]:
        try:
            return Path(hf_hub_download(weights.hub_id, filename, revision=weights.revision))
        except EntryNotFoundError:  # the repository has only the next candidate
            continue
    return Path(hf_hub_download(weights.hub_id, weights.filenames[-1], revision=weights.revision))


def timm_miss(weights: TimmWeights) -> tuple[str, str]:
    """(problem, fix) for timm weights that are not in the cache, offline or online."""
    if weights.hub_id:
        where = f"timm's published weights {weights.describe()} are not in the cache {str(hub_cache())!r}"
        command = f"run `hf download {weights.hub_id} {weights.filenames[0]}`"
    else:
        where = f"timm's published weights {weights.describe()} are not downloaded"
        command = f"download {weights.url} into {_torch_checkpoints()}"
    if offline():
        switch = _offline_switch()
        return (
            f"{where}, and {switch}=1 forbids downloading them",
            f"{command} on a machine with internet access (then copy that cache folder here), or unset {switch} "
            "so that rank 0 downloads them, or set model.image.pretrained=false",
        )
    return (
        f"{where}; building a model only reads the cache",
        f"train with the trainer (rank 0 downloads them first), call rankclip_ds.model.hub.fetch_model_files "
        f"first, or {command}",
    )


# ------------------------------------------------------------------------------------------------ rank 0's fetch
def fetch_model_files(model_cfg: ModelConfig, *, weights: bool = True) -> list[str]:
    """Download into the cache every file the model section names from the hub and the cache lacks: the text hub
    id's config and tokenizer (and weights when ``model.text.pretrained``), timm's published weights when
    ``model.image.pretrained``. ``weights=False`` fetches only what building the architecture needs (the dry run).

    Returns what was fetched, for the log; nothing for local folders, ``builtin:`` aliases and files already
    cached, and nothing offline (the pre-flight reported the miss; building names it again)."""
    if offline():
        return []
    fetched = []
    text = model_cfg.text
    repo_id = text_hub_id(text.name_or_path)
    if repo_id is not None:
        text_weights = weights and text.pretrained
        folder = cached_snapshot(repo_id)
        if folder is None or not has_tokenizer(folder) or (text_weights and not has_weights(folder)):
            folder = download_text_model(repo_id, weights=text_weights)
            fetched.append(f"text model {repo_id} → {folder}")
    image = model_cfg.image
    if weights and image.pretrained:
        source = timm_weights(image.name)
        if source is None:
            problem = "timm has no published weights for this model name"
            fix = "pick a name from timm.list_pretrained(), or set model.image.pretrained=false"
            raise ConfigError(problem_message("model.image.name", image.name, problem, fix))
        if cached_timm_weights(source) is None:
            fetched.append(f"timm weights {source.describe()} → {download_timm_weights(source)}")
    return fetched
