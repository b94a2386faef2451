"""The trainer's build phases, each a plain function of what it needs, called in order by ``Trainer.__init__``:

    start_process → (resume target) → write_run_folder → fetch_pretrained → build_model_for_training → build_train_data
                  → training_length → build_engine

Nothing here trains; each phase returns what the next ones and the training loop use.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import BatchSizes, Config, save_config
from ..dist import DistInfo, init_distributed
from ..ds_config import optimizer_offloaded
from ..model import DualEncoder, build_model, build_tokenizer
from ..model.hub import fetch_model_files, hub_cache, offline
from ..problems import ConfigError, fail
from ..resolved import ResolvedRun
from .checkpoint import CheckpointManager, LoadTarget
from .errors import TrainingError
from .heartbeat import Heartbeat
from .optim import build_lr_lambda, build_optimizer, param_groups_from_config
from .tf32 import set_tf32
from .universal import ensure_universal
from .watchdog import CollectiveTracker

__all__ = [
    "ImagePreprocessing",
    "Process",
    "TrainingLength",
    "build_engine",
    "build_model_for_training",
    "build_train_data",
    "fetch_pretrained",
    "log_run_start",
    "seed_everything",
    "start_process",
    "training_length",
    "write_run_folder",
]

log = logging.getLogger("rankclip_ds.train")


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch, from one integer (never ``hash``: see docs/data.md)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Process:
    """This rank's place in the job: its group, device, and the watchdog that names a stuck collective."""

    group: Any
    """The data-parallel process group, or None for a single process."""
    device: torch.device
    heartbeat: Heartbeat | None
    """Started with the run folder (:func:`write_run_folder`)."""
    tracker: CollectiveTracker


def start_process(cfg: Config, info: DistInfo, run_dir: Path) -> Process:
    """The process group (NCCL flight-recorder dumps into the run folder), the device and its TF32 setting, the CPU
    threads of ranks sharing a host, the initial seed (the same weights on every rank), and the watchdog (its
    heartbeats start with the run folder, :func:`write_run_folder`)."""
    init_distributed(info, timeout_minutes=cfg.dist.timeout_minutes, single_process=True, diagnostics_dir=run_dir)
    device = torch.device(info.device)
    set_tf32(device, cfg.run.tf32)  # CUDA only; the CPU's settings are left alone
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a CPU host split its cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    seed_everything(cfg.run.seed)  # same initial weights on every rank (DeepSpeed also broadcasts them)
    tracker = CollectiveTracker(rank=info.rank, world_size=info.world_size, timeout_minutes=cfg.dist.timeout_minutes)
    return Process(dist.group.WORLD if info.distributed else None, device, None, tracker)


def write_run_folder(cfg: Config, info: DistInfo, run_dir: Path, process: Process) -> None:
    """The run folder and its resolved ``config.yaml`` (rank 0), and every rank's heartbeat (the file a collective
    timeout reads to name the silent ranks), once the resume was agreed: a run refused for a checkpoint of another
    global batch leaves the folder as it was."""
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if cfg.dist.heartbeat_seconds > 0:
        hb = Heartbeat(
            run_dir / "heartbeats", info.rank, min_interval_s=cfg.dist.heartbeat_seconds, node=info.node_rank
        ).start()
        process.heartbeat = process.tracker.heartbeat = hb


def fetch_pretrained(cfg: Config, info: DistInfo, run_dir: Path, process: Process) -> Config:
    """Rank 0 downloads every file the model section names from the Hugging Face hub into the cache (a text hub id,
    timm's published weights: :func:`~rankclip_ds.model.hub.fetch_model_files`) and, with ``model.init_from``,
    fetches and converts the CLIP checkpoint (:func:`~rankclip_ds.model.clip_init.resolve_init_from`), while the
    other ranks wait; then every rank derives the same model section from the cache. Returns ``cfg`` with that
    section (the towers ``init_from`` decides filled in); rank 0 rewrites the run's ``config.yaml`` with it, so the
    run folder, its checkpoints and its export describe the model that trains.

    Nothing is fetched for local folders, ``builtin:`` aliases, files already cached, or offline
    (``HF_HUB_OFFLINE=1``: the pre-flight checked the cache). Rank 0's failure is sent to every rank and raised
    there too, so no rank waits for a peer that gave up. A download longer than ``dist.timeout_minutes`` times the
    others out: fill the cache beforehand (``hf download``)."""
    from ..model.clip_init import resolve_init_from

    outcome: list[Any] = [None]  # rank 0's (kind, message) on failure
    failure: BaseException | None = None
    model_cfg = cfg.model
    with process.tracker.guard("pretrained files (rank 0 downloads into the Hugging Face cache, the others wait)", 0):
        if info.is_main:
            try:
                for fetched in fetch_model_files(cfg.model):
                    log.info("fetched %s (cache %s)", fetched, hub_cache())
                if cfg.model.init_from:
                    log.info("init_from %s: fetching and converting (once; cached after)", cfg.model.init_from)
                    model_cfg = resolve_init_from(cfg.model, local_files_only=offline())
            except ConfigError as exc:
                outcome, failure = [("config", str(exc))], exc
            except Exception as exc:  # network, disk, permissions: reported on every rank below
                outcome, failure = [("error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}")], exc
        if info.distributed:
            dist.broadcast_object_list(outcome, src=0)  # also the barrier the other ranks wait at
    if outcome[0] is not None:
        kind, message = outcome[0]
        if kind == "config":
            raise ConfigError(message) from failure
        raise TrainingError(
            f"rank 0 could not fetch the model's files into {hub_cache()}: {message}. Fix: check the network and "
            "the ids, or fill the cache beforehand (`hf download ID`) and set HF_HUB_OFFLINE=1"
        ) from failure
    if not info.is_main:
        model_cfg = resolve_init_from(cfg.model, local_files_only=True)  # reads what rank 0 converted
    if model_cfg is cfg.model:
        return cfg
    cfg = dataclasses.replace(cfg, model=model_cfg)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        log.info(
            "init_from %s: image tower %s, text tower %s (converted %s)",
            model_cfg.init_from,
            model_cfg.image.name,
            model_cfg.text.name_or_path,
            model_cfg.text.name_or_path.rsplit("/", 1)[0],
        )
    return cfg


@dataclass(frozen=True)
class ImagePreprocessing:
    """The image tower's normalisation (timm's ``pretrained_cfg``), used by the training and evaluation transforms."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def build_model_for_training(cfg: Config, info: DistInfo) -> tuple[DualEncoder, Any, ImagePreprocessing]:
    """The dual encoder on the CPU (``deepspeed.initialize`` moves and partitions it), its tokenizer, and the image
    preprocessing; then the per-rank seed for data and dropout.

    The full model is built on every rank and partitioned by ``deepspeed.initialize``: pretrained weights load as
    usual under every stage (``zero.Init`` is needed only for models that do not fit one host's memory, far beyond
    CLIP sizes)."""
    tokenizer = build_tokenizer(cfg.model.text.name_or_path)
    model = build_model(cfg.model, device="cpu")
    # Lets ds_to_universal convert this run's checkpoints (no tensor parallelism: nothing else to declare).
    model.universal_checkpoint_info = {"universal_checkpoint_version": 0.4}
    data_config = model.image_tower.data_config()  # timm's pretrained_cfg only: safe before partitioning
    preprocessing = ImagePreprocessing(
        cfg.model.image.image_size, tuple(data_config["mean"]), tuple(data_config["std"])
    )
    seed_everything(cfg.run.seed * 1000 + info.rank + 1)  # data and dropout differ per rank
    return model, tokenizer, preprocessing


def build_train_data(
    cfg: Config,
    info: DistInfo,
    run: ResolvedRun,
    tokenizer,
    preprocessing: ImagePreprocessing,
    device: torch.device,
    data_factory: Callable[[int, int, int], Any] | None = None,
    streams: int | None = None,
):
    """The training stream of this rank (``data_factory(rank, world, micro)`` replaces it in tests); ``streams``:
    see :func:`data_streams`."""
    micro = run.batch.micro_batch_size
    if data_factory is not None:
        return data_factory(info.rank, info.world_size, micro)
    from ..data import build_image_transform, build_train_loader
    from ..data.remote import RemotePolicy

    data = cfg.data
    transform = build_image_transform(
        preprocessing.image_size,
        mean=preprocessing.mean,
        std=preprocessing.std,
        train=True,
        scale=tuple(data.rrc_scale),
        hflip=data.hflip,
    )
    return build_train_loader(
        data.train_data,
        tokenizer=tokenizer,
        image_transform=transform,
        batch_size=micro,
        grad_accum_steps=run.batch.grad_accum_steps,
        streams=streams,
        num_workers=data.num_workers,
        seed=cfg.run.seed,
        rank=info.rank,
        world_size=info.world_size,
        mode=data.mode,
        samples_per_epoch=data.samples_per_epoch,
        shuffle_buffer=data.shuffle_buffer,
        max_text_len=cfg.model.text.max_length,
        caption_key=data.caption_key,
        # Pinned batches make the step's non-blocking copies asynchronous; only a CUDA device can use them.
        pin_memory=data.pin_memory and device.type == "cuda",
        remote=RemotePolicy(
            retries=data.remote_retries,
            backoff_s=data.remote_backoff_s,
            backoff_max_s=data.remote_backoff_max_s,
            timeout_s=data.remote_timeout_s,
        ),
    )


def data_streams(cfg: Config, target: LoadTarget | None) -> int | None:
    """The number of streams of the global sample order: a resumed run keeps its checkpoint's (so every step sees
    the samples of the uninterrupted run on any world size); otherwise ``data.streams`` (None: the loader's default).
    A ``data.streams`` that contradicts the checkpoint is a :class:`ConfigError`."""
    saved = None if target is None else target.meta.get("data_streams")
    if saved is None:
        return cfg.data.streams
    if cfg.data.streams is not None and cfg.data.streams != int(saved):
        fail(
            "data.streams",
            cfg.data.streams,
            f"contradicts the checkpoint {target.path}, whose sample order was made of {saved} streams",
            f"drop the override (or set data.streams={saved}) to resume the same order",
        )
    return int(saved)


@dataclass(frozen=True)
class TrainingLength:
    """How long the run is, in optimizer steps and epochs."""

    steps_per_epoch: int
    total_steps: int
    epochs: int


def training_length(cfg: Config, batches_per_epoch: int, batch: BatchSizes) -> TrainingLength:
    """Optimizer steps per epoch (an epoch's tail that cannot fill a step is skipped), the run's total steps
    (``schedule.total_steps``, or ``schedule.epochs`` of them) and the epochs that takes."""
    steps_per_epoch = batch.steps_per_epoch(batches_per_epoch)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"data.train_data: one epoch has {batches_per_epoch} batches per rank, fewer than optim.grad_accum_steps="
            f"{batch.grad_accum_steps}. Fix: use more data, a smaller batch, or fewer accumulation steps"
        )
    sched = cfg.schedule
    total = sched.total_steps if sched.total_steps is not None else sched.epochs * steps_per_epoch
    return TrainingLength(steps_per_epoch, total, math.ceil(total / steps_per_epoch))


def build_engine(
    cfg: Config,
    run: ResolvedRun,
    model: DualEncoder,
    length: TrainingLength,
    process: Process,
    ckpt: CheckpointManager,
    resume_target: LoadTarget | None,
):
    """AdamW over CLIP's parameter groups, warm-up + cosine, and the DeepSpeed engine around the model.

    The scheduler is handed to ``deepspeed.initialize``, so it is stepped at accumulation boundaries and saved and
    restored with the engine under every ZeRO stage (one kept outside is not restored under ZeRO-3). A checkpoint
    of another world size or ZeRO stage is loaded through DeepSpeed's universal form, which the engine must know
    about when it is built. Returns ``(engine, the torch optimizer inside it)``."""
    import deepspeed

    ds = dict(run.deepspeed)
    if resume_target is not None and resume_target.universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    optimizer = build_optimizer(
        model,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        cpu_offload=optimizer_offloaded(ds),
        fused=cfg.optim.fused,
        device=process.device,  # where DeepSpeed keeps the fp32 master partitions the optimizer steps
        groups=param_groups_from_config(model, cfg.optim),  # per-part base lr and layer decay; frozen left out
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, build_lr_lambda(length.total_steps, cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio)
    )
    with process.tracker.guard("engine set-up (parameter broadcast, universal checkpoint conversion)", 0):
        if resume_target is not None and resume_target.universal:
            ensure_universal(resume_target, ckpt.rank)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds, dist_init_required=False
        )
    return engine, optimizer


def log_run_start(
    cfg: Config,
    run: ResolvedRun,
    length: TrainingLength,
    model: DualEncoder,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    run_dir: Path,
) -> None:
    """The start-up banner: the run folder, the batch, the ZeRO stage and length, and the speed settings."""
    cuda = device.type == "cuda"
    log.info("run folder %s", run_dir)
    log.info("%s", run.batch.describe())
    log.info(
        "ZeRO stage %d, %s, %d steps (%d per epoch, %d epochs), parameters %s",
        run.zero_stage,
        cfg.run.precision,
        length.total_steps,
        length.steps_per_epoch,
        length.epochs,
        model.param_counts()["total"],
    )
    log.info(
        "speed settings: AdamW %s, model.compile %s, attention image %s / text %s, run.tf32 %s, pin_memory %s",
        "fused" if optimizer.defaults.get("fused") else type(optimizer).__name__,
        cfg.model.compile,
        "sdpa" if cfg.model.image.fused_attn else "eager",
        cfg.model.text.attn_implementation,
        cfg.run.tf32 and cuda,
        cfg.data.pin_memory and cuda,
    )
    if cfg.model.compile and run.zero_stage == 3:
        log.warning(
            "model.compile under ZeRO-3: DeepSpeed's parameter-gathering hooks on every submodule break the compiled "
            "towers into per-module pieces (and hit torch._dynamo's recompile limit), so expect little speed-up; "
            "ZeRO-1/2 compile whole towers (docs/training.md, GPU speed switches)"
        )
