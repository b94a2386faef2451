"""The sections of the run config: nested dataclasses, a docstring per field, validation in ``__post_init__``.

The model section (:class:`ModelConfig` and its towers) is the model's own schema and lives in
:mod:`rankclip_ds.model.config`; it is imported here and re-exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..model.config import ImageTowerConfig, LockConfig, ModelConfig, TextTowerConfig
from ..problems import ConfigError, check_positive, fail

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "EvalConfig",
    "ImageTowerConfig",
    "LockConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TextTowerConfig",
]


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
    tf32: bool = True
    """On a CUDA device (Ampere and later), let float32 matrix multiplications (cuBLAS) and cuDNN convolutions use
    TensorFloat-32 tensor cores: set at start-up with ``torch.set_float32_matmul_precision("high")`` and
    ``torch.backends.cudnn.allow_tf32``; ``false`` sets both to full float32. Matters for fp32 training and for
    the float32 parts of bf16/fp16 runs (the loss). On the CPU nothing is changed."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            fail("run.name", self.name, "must be a non-empty folder name without '/'", "pick e.g. run.name=my_run")
        if self.seed < 0:
            fail("run.seed", self.seed, "must be >= 0", "use a non-negative integer seed")


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
    streams: int | None = None
    """Streams the global sample order is made of (docs/data.md): each reads its own range of the shuffled shards
    through its own shuffle buffer and gives ``global_batch / streams`` samples to every step. ``None``: one per
    (rank, worker) of the run that starts training. A resumed run keeps the checkpoint's number, so the order (and
    the samples of every step) stay the same on any world size."""
    caption_key: str = "txt"
    """Member holding the caption: ``txt``, or ``json:FIELD`` for a field of the json member."""
    rrc_scale: tuple[float, float] = (0.9, 1.0)
    """Random-resized-crop area range for training images."""
    hflip: bool = False
    """Random horizontal flips (off by default: captions may name left and right)."""
    pin_memory: bool = True
    """On a CUDA device, the loader hands over batches in pinned (page-locked) host memory, so the trainer's
    non-blocking host-to-device copies overlap with compute. Ignored on the CPU (nothing to pin for)."""
    remote_retries: int = 5
    """Remote shards (``http(s)://``, ``s3://``): transient failures in a row without progress (reset, timeout,
    5xx/429, short body) retried before the shard is skipped for this pass (``data/skipped_remote_failed``)."""
    remote_backoff_s: float = 1.0
    """First wait before a retry; doubled after each failure in a row (with jitter), up to
    ``remote_backoff_max_s``."""
    remote_backoff_max_s: float = 30.0
    """Longest wait between two retries."""
    remote_timeout_s: float = 60.0
    """Connect timeout, and the longest wait for the next bytes of a remote shard."""

    def __post_init__(self) -> None:
        if not self.train_data:
            fail("data.train_data", self.train_data, "is empty", "point it at shards, e.g. data/x-{0000..0099}.tar")
        check_positive("data", "samples_per_epoch", self.samples_per_epoch, allow_none=True)
        if self.mode == "resampled" and self.samples_per_epoch is None:
            fail(
                "data.samples_per_epoch",
                None,
                "resampled mode is infinite and needs a virtual epoch length",
                "set data.samples_per_epoch (e.g. the dataset size)",
            )
        if self.shuffle_buffer < 0:
            fail("data.shuffle_buffer", self.shuffle_buffer, "must be >= 0", "use 0 to disable shuffling")
        if self.num_workers < 0:
            fail("data.num_workers", self.num_workers, "must be >= 0", "use 0 for in-process loading")
        if self.streams is not None and self.streams < 1:
            fail("data.streams", self.streams, "must be >= 1", "use null for one stream per rank and worker")
        lo, hi = self.rrc_scale
        if not 0.0 < lo <= hi <= 1.0:
            fail("data.rrc_scale", self.rrc_scale, "must satisfy 0 < low <= high <= 1", "use e.g. [0.9, 1.0]")
        self._check_remote()

    def _check_remote(self) -> None:
        if isinstance(self.remote_retries, bool) or not isinstance(self.remote_retries, int) or self.remote_retries < 0:
            fail("data.remote_retries", self.remote_retries, "must be an integer >= 0", "use e.g. 5 (0: never retry)")
        if not self.remote_backoff_s >= 0:
            fail("data.remote_backoff_s", self.remote_backoff_s, "must be >= 0 seconds", "use e.g. 1.0")
        if not self.remote_backoff_max_s >= self.remote_backoff_s:
            fail(
                "data.remote_backoff_max_s",
                self.remote_backoff_max_s,
                f"must be >= data.remote_backoff_s={self.remote_backoff_s}",
                "use e.g. 30.0, or lower data.remote_backoff_s",
            )
        if not self.remote_timeout_s > 0:
            fail("data.remote_timeout_s", self.remote_timeout_s, "must be > 0 seconds", "use e.g. 60.0")


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
    rank_weight_schedule: Literal["epoch", "step", "constant"] = "step"
    """``epoch``: the released code's ramp w(e)=clip(3(e-1)/(E-1), 0, w_max); ``step``: linear in steps, 0 → w_max,
    held from ``rank_weight_hold_from`` of training; ``constant``: w = w_max from the first step (no ramp; the
    ablation of the warm-up)."""
    rank_weight_max: float = 2.0
    """The ramp's plateau w_max."""
    rank_weight_hold_from: float = 2.0 / 3.0
    """Fraction of training from which the step ramp holds w_max."""

    def __post_init__(self) -> None:
        for name in ("lambda_cross", "lambda_in", "rank_weight_max"):
            value = getattr(self, name)
            if value < 0:
                fail(f"loss.{name}", value, "must be >= 0", f"use 0 to switch the term off, or a positive loss.{name}")
        check_positive("loss", "chunk_size", self.chunk_size, allow_none=True)
        if self.top_k is not None and self.top_k <= 0:
            fail("loss.top_k", self.top_k, "must be a positive integer", "use null for the exact loss, or K >= 1")
        if self.impl == "top_k" and self.top_k is None:
            fail("loss.top_k", None, "loss.impl=top_k needs K", "set loss.top_k (e.g. 128), or use loss.impl=chunked")
        if self.impl != "top_k" and self.top_k is not None:
            fail(
                "loss.top_k",
                self.top_k,
                f"is only used by loss.impl=top_k (loss.impl={self.impl!r})",
                "set loss.impl=top_k, or loss.top_k=null",
            )
        if not 0.0 < self.rank_weight_hold_from <= 1.0:
            fail("loss.rank_weight_hold_from", self.rank_weight_hold_from, "must be in (0, 1]", "use e.g. 0.6667")


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
    image_lr: float | None = None
    """Base learning rate of the image tower; ``None``: ``lr``."""
    text_lr: float | None = None
    """Base learning rate of the text tower; ``None``: ``lr``."""
    proj_lr: float | None = None
    """Learning rate of the two projections and the logit scale; ``None``: ``lr``."""
    image_layer_decay: float = 1.0
    """Layer-wise learning-rate decay of the image tower (EVA-CLIP, BEiT): a parameter at depth ``layer`` (0: the
    embeddings, 1..depth: the blocks, depth+1: what follows them) gets ``image_lr × decay^(depth + 1 − layer)``.
    1.0: the same rate for the whole tower."""
    text_layer_decay: float = 1.0
    """Layer-wise learning-rate decay of the text tower, as ``image_layer_decay``."""
    grad_clip: float | None = 1.0
    """Global gradient-norm clip (DeepSpeed ``gradient_clipping``); ``None`` disables."""
    fused: Literal["auto", True, False] = "auto"
    """``torch.optim.AdamW(fused=True)``: one fused kernel for the whole update. ``auto``: fused on CUDA devices,
    PyTorch's default (for-each) elsewhere. ``true``: fused on any device PyTorch has the kernel for (CUDA, and the
    CPU since PyTorch 2.4). ``false``: never. With ZeRO optimizer offload to the CPU, DeepSpeed's CPU Adam is
    used and ``true`` is an error."""

    def __post_init__(self) -> None:
        check_positive("optim", "micro_batch_size", self.micro_batch_size, allow_none=True)
        check_positive("optim", "grad_accum_steps", self.grad_accum_steps)
        check_positive("optim", "global_batch_size", self.global_batch_size, allow_none=True)
        if self.micro_batch_size is None and self.global_batch_size is None:
            fail(
                "optim.micro_batch_size",
                None,
                "neither micro_batch_size nor global_batch_size is set",
                "set at least one of optim.micro_batch_size / optim.global_batch_size",
            )
        check_positive("optim", "lr", self.lr)
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                fail(f"optim.betas[{i}]", beta, "must be in [0, 1)", "use e.g. [0.9, 0.999]")
        check_positive("optim", "eps", self.eps)
        if self.weight_decay < 0:
            fail("optim.weight_decay", self.weight_decay, "must be >= 0", "use 0 to disable weight decay")
        for name in ("image_lr", "text_lr", "proj_lr"):
            check_positive("optim", name, getattr(self, name), allow_none=True)
        for name in ("image_layer_decay", "text_layer_decay"):
            if not 0.0 < getattr(self, name) <= 1.0:
                fail(f"optim.{name}", getattr(self, name), "must be in (0, 1]", "use e.g. 0.75 (EVA-CLIP), 1 for none")
        check_positive("optim", "grad_clip", self.grad_clip, allow_none=True)
        # The Literal check lets 1 and 0 through (they compare equal to True and False).
        if not (self.fused == "auto" or isinstance(self.fused, bool)):
            fail("optim.fused", self.fused, "must be auto, true or false", "write optim.fused: auto")


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
            fail(
                "schedule.epochs",
                self.epochs,
                f"exactly one of schedule.epochs / schedule.total_steps (={self.total_steps}) must be set",
                "set one of them and the other to null",
            )
        check_positive("schedule", "epochs", self.epochs, allow_none=True)
        check_positive("schedule", "total_steps", self.total_steps, allow_none=True)
        if self.warmup_steps < 0:
            fail("schedule.warmup_steps", self.warmup_steps, "must be >= 0", "use 0 for no warm-up")
        # Equal lengths are a mistake too: the learning rate would end the run at its peak, never decaying.
        if self.total_steps is not None and self.warmup_steps >= self.total_steps:
            fail(
                "schedule.warmup_steps",
                self.warmup_steps,
                f"is as long as or longer than schedule.total_steps={self.total_steps}, so the learning rate "
                "would never decay",
                f"use schedule.warmup_steps < {self.total_steps} (e.g. {self.total_steps // 10}), or train longer",
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("schedule.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]", "use e.g. 0.0 or 0.1")


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
    min_free_factor: float = 1.1
    """Before each save, rank 0 checks that the checkpoint file system has at least this many times the size of
    the previous checkpoint free, and stops the run with a clear error instead of writing a partial checkpoint
    (0 disables the check)."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            fail("checkpoint.every_steps", self.every_steps, "must be >= 0", "use 0 to save only at the end")
        check_positive("checkpoint", "keep_last", self.keep_last)
        if self.min_free_factor < 0:
            fail("checkpoint.min_free_factor", self.min_free_factor, "must be >= 0", "use 0 to skip the check")


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
    sample_keys: bool = False
    """Append the keys of the samples each rank trained on to ``<run>/sample_keys/rankNNNNN.jsonl``, one line per
    optimizer step (``{"step", "keys"}``): an audit trail of the data order across resumes (a step redone after a
    crash appears twice; the later line is the one that counted)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device at the training precision, for ``perf/mfu`` (model FLOP utilisation).
    ``None``: looked up by ``torch.cuda.get_device_name()`` in a table of known GPUs (bf16/fp16, TF32 or fp32
    peak, by ``run.precision`` and ``run.tf32``); on the CPU, or on a GPU the table does not know, MFU is then not
    logged."""

    def __post_init__(self) -> None:
        check_positive("logging", "log_every", self.log_every)
        check_positive("logging", "peak_tflops", self.peak_tflops, allow_none=True)


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
            fail("eval.every_steps", self.every_steps, "must be >= 0", "use 0 to evaluate only at the end")
        check_positive("eval", "batch_size", self.batch_size)


@dataclass
class DistConfig:
    """Process group settings (rank and world size come from the launcher's environment)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """``auto``: nccl on CUDA, gloo on CPU."""
    timeout_minutes: float = 30.0
    """Collective timeout; a stuck rank fails after this long instead of hanging forever, with an error that names
    the collective it was in and the ranks that went silent (from the heartbeats)."""
    heartbeat_seconds: float = 10.0
    """Each rank rewrites ``<run>/heartbeats/rankNNNNN.json`` (step, phase, host, pid) this often, so a timeout can
    name the stuck rank; 0 disables the files (the error then names the collective only)."""

    def __post_init__(self) -> None:
        check_positive("dist", "timeout_minutes", self.timeout_minutes)
        if self.heartbeat_seconds < 0:
            fail("dist.heartbeat_seconds", self.heartbeat_seconds, "must be >= 0", "use 0 to disable heartbeats")


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
            fail(
                "loss.ranking",
                True,
                "both loss.lambda_cross and loss.lambda_in are 0, so the ranking terms contribute nothing",
                "set loss.ranking=false for plain CLIP, or give one lambda a positive value",
            )
        # loss.chunk_size against the loss's local rows needs the resolved batch: the pre-flight checks it.
