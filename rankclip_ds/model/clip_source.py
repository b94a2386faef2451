"""Where a ``model.init_from`` CLIP checkpoint comes from, and reading it: a Hugging Face ``CLIPModel`` folder or hub
id (through the standard hub cache), or an open_clip checkpoint file with its model config; OpenAI's BPE vocabulary
as a Hugging Face ``CLIPTokenizer`` for open_clip sources (open_clip ships the BPE file, not an HF tokenizer)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..problems import ConfigError, problem_message
from .hub import download_text_model, hub_cache, offline

if TYPE_CHECKING:
    import torch

__all__ = ["ClipSource", "locate_source", "openai_bpe_tokenizer", "read_checkpoint", "read_checkpoint_shapes"]

_CONVERTER_VERSION = "1"  # part of the cache key: a converter change re-converts
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class SourceMissing(ConfigError):
    """The ``init_from`` source is not on this machine (a missing file, or a hub id not in the cache)."""

    def __init__(self, key: str, value: Any, problem: str, fix: str, *, hub_id: bool = False) -> None:
        super().__init__(problem_message(key, value, problem, fix))
        self.key = key
        self.hub_id = hub_id
        """A hub id missing from the cache (a download fills it, where downloads are allowed)."""


@dataclass(frozen=True)
class ClipSource:
    """A located CLIP checkpoint."""

    kind: str
    """``hf`` (a CLIPModel folder) or ``open_clip`` (a checkpoint file)."""
    path: Path
    """The folder (``hf``) or the checkpoint file (``open_clip``)."""
    open_clip_config: dict[str, Any] | None = field(default=None, repr=False)
    """The open_clip model config (``open_clip`` only)."""

    @property
    def weights(self) -> Path:
        if self.kind == "open_clip":
            return self.path
        return next((self.path / n for n in _HF_WEIGHTS if (self.path / n).is_file()), self.path / _HF_WEIGHTS[0])

    def digest(self) -> str:
        """A key that changes when the source does: its path, weights size and mtime, its config."""
        stat = self.weights.stat()
        config = json.dumps(self.open_clip_config, sort_keys=True) if self.open_clip_config else ""
        if self.kind == "hf":
            config = (self.path / "config.json").read_text()
        key = f"{_CONVERTER_VERSION}|{self.kind}|{self.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{config}"
        return hashlib.sha256(key.encode()).hexdigest()[:20]


def _hub_miss(repo_id: str, why: str) -> SourceMissing:
    return SourceMissing(
        "model.init_from",
        repo_id,
        f"neither a local folder nor in the Hugging Face cache {str(hub_cache())!r} ({why})",
        f"fill the cache on a machine with network access: hf download {repo_id} (with the same HF_HOME / "
        "HF_HUB_CACHE), or unset HF_HUB_OFFLINE so that rank 0 downloads it, or give a local CLIPModel folder",
        hub_id=True,
    )


def _hub_snapshot(repo_id: str, *, local_files_only: bool) -> Path:
    """The cached snapshot folder of ``repo_id`` holding config, tokenizer and one weights file (downloaded into
    the standard cache unless ``local_files_only`` or ``HF_HUB_OFFLINE=1``), through the text tower's download
    (:func:`.hub.download_text_model`)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    why = "HF_HUB_OFFLINE=1" if offline() else "downloads are not allowed here"
    try:
        folder = download_text_model(repo_id, local_files_only=local_files_only or offline(), field="model.init_from")
    except LocalEntryNotFoundError as exc:
        raise _hub_miss(repo_id, why) from exc
    if not any((folder / name).is_file() for name in _HF_WEIGHTS):
        raise _hub_miss(repo_id, f"the cached snapshot {str(folder)!r} lacks the weights")
    return folder


def _open_clip_model_config(name: str) -> dict[str, Any]:
    """The model config of an open_clip name, or of a model-config JSON file (a bare config or an
    ``open_clip_config.json`` with ``model_cfg``)."""
    path = Path(name).expanduser()
    if name.endswith(".json") or path.is_file():
        if not path.is_file():
            raise SourceMissing("model.open_clip_name", name, "no such file", "give the model-config JSON's path")
        data = json.loads(path.read_text())
        return data.get("model_cfg", data)
    try:
        import open_clip
    except ImportError as exc:
        raise ConfigError(
            problem_message(
                "model.open_clip_name",
                name,
                "needs the open_clip package to look the name up",
                "pip install open-clip-torch==3.3.0 (requirements-dev.txt), or give the model-config JSON's path",
            )
        ) from exc
    config = open_clip.get_model_config(name)
    if config is None:
        from ..problems import suggest

        raise ConfigError(
            problem_message(
                "model.open_clip_name",
                name,
                "is not an open_clip model name" + suggest(name, open_clip.list_models(), n=3),
                "use a name from open_clip.list_models() (e.g. ViT-B-16, ViT-B-32-quickgelu) or a model-config JSON",
            )
        )
    return config


def locate_source(init_from: str, open_clip_name: str | None, *, local_files_only: bool) -> ClipSource:
    """Find the checkpoint: an open_clip file (with ``open_clip_name``), a local CLIPModel folder, or a hub id."""
    path = Path(init_from).expanduser()
    if open_clip_name:
        if not path.is_file():
            raise SourceMissing("model.init_from", init_from, "no such file", "give the open_clip checkpoint file")
        return ClipSource("open_clip", path, _open_clip_model_config(open_clip_name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceMissing(
                "model.init_from", init_from, "the folder has no config.json", "save the CLIPModel with save_pretrained"
            )
        return ClipSource("hf", path)
    if path.exists() or not _HUB_ID.match(init_from):
        raise SourceMissing(
            "model.init_from",
            init_from,
            "is neither a CLIPModel folder nor a hub id",
            "give a Hugging Face CLIPModel folder or hub id (openai/clip-vit-base-patch16), or an open_clip "
            "checkpoint file together with model.open_clip_name",
        )
    return ClipSource("hf", _hub_snapshot(init_from, local_files_only=local_files_only))


# ------------------------------------------------------------------------------------------------ reading weights
def _unwrap(state: Any) -> dict[str, torch.Tensor]:
    """A training checkpoint's model state: ``{"state_dict": ...}`` unwrapped, DDP's ``module.`` prefix stripped."""
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _torch_load(path: Path, *, mmap: bool) -> Any:
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) files cannot mmap


def _safetensors_files(path: Path) -> list[Path]:
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return [path.parent / shard for shard in shards]
    return [path]


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file (safetensors, a sharded safetensors index, or a PyTorch file)."""
    if path.suffix == ".safetensors" or path.name.endswith(".index.json"):
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for file in _safetensors_files(path):
            state.update(load_file(str(file)))
        return state
    return _unwrap(_torch_load(path, mmap=False))


def read_checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, without reading the tensors (safetensors headers; a memory-mapped PyTorch file)."""
    if path.suffix == ".safetensors" or path.name.endswith(".index.json"):
        from safetensors import safe_open

        shapes: dict[str, tuple[int, ...]] = {}
        for file in _safetensors_files(path):
            with safe_open(str(file), framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
        return shapes
    return {k: tuple(v.shape) for k, v in _unwrap(_torch_load(path, mmap=True)).items()}


# ------------------------------------------------------------------------------------------------ tokenizer
def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in vocabulary order: bytes that print as themselves
    ('!'..'~', '¡'..'¬', '®'..'ÿ') keep their code point, the other bytes take 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def openai_bpe_tokenizer(context_length: int):
    """OpenAI's CLIP tokenizer as a Hugging Face ``CLIPTokenizer``, built from the BPE merges open_clip ships
    (``bpe_simple_vocab_16e6.txt.gz``): ids 0-255 the byte symbols, 256-511 the same ending a word (``</w>``),
    then one id per merge (48,894), then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # line 0 is the version header
    symbols = _byte_symbols()
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges)
    tokenizer.model_max_length = context_length
    return tokenizer
