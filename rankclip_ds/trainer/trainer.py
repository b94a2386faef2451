"""The DeepSpeed trainer: one object that owns the engine, the data stream, checkpoints and telemetry."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, config_to_dict, resolve_batch, save_config
from ..dist import DistInfo, init_distributed
from ..ds_config import build_deepspeed_config, optimizer_offloaded, validate_with_deepspeed
from ..export import save_export
from ..losses import official_rank_weight, step_rank_weight
from ..model import DualEncoder, build_model, build_tokenizer
from .checkpoint import CheckpointManager, LoadTarget
from .logit_scale import clamp_logit_scale
from .metrics import MetricsWriter, StepTimer, format_duration, memory_stats
from .mfu import build_mfu_meter
from .optim import build_lr_lambda, build_optimizer, place_optimizer_steps
from .resume import agree_resume, batches_consumed
from .signals import REQUEUE_EXIT_CODE, StopRequest
from .step import StepRunner
from .tf32 import set_tf32
from .watchdog import CollectiveTracker, Heartbeat

__all__ = ["Trainer"]

log = logging.getLogger("rankclip_ds.train")


@dataclass
class DataPosition:
    """Where the stream is: the epoch, and batches consumed from it on each rank (identical on every rank)."""

    epoch: int = 0
    batches: int = 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds everything from a :class:`Config` and trains.

    ``data_factory`` (tests only) replaces the WebDataset loader: ``data_factory(rank, world, micro)`` must return an
    object with ``__len__`` (batches per epoch, equal on every rank), ``epoch_iter(epoch)`` yielding batch dicts
    (``image``, ``input_ids``, ``attention_mask``), ``resume(epoch, samples=...)`` and ``skip_counts()``.
    """

    def __init__(
        self,
        cfg: Config,
        ds_json: dict[str, Any],
        info: DistInfo,
        *,
        ds_source: str = "DeepSpeed JSON",
        data_factory: Callable[[int, int, int], Any] | None = None,
    ) -> None:
        import deepspeed

        self.cfg = cfg
        self.info = info
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.batch = resolve_batch(cfg.optim, info.world_size)
        ds = build_deepspeed_config(ds_json, cfg, info.world_size, source=ds_source)
        validate_with_deepspeed(ds, source=ds_source)
        self.zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last=cfg.checkpoint.keep_last,
            rank=info.rank,
            min_free_factor=cfg.checkpoint.min_free_factor,
        )
        init_distributed(
            info, timeout_minutes=cfg.dist.timeout_minutes, single_process=True, diagnostics_dir=self.run_dir
        )
        self.group = dist.group.WORLD if info.distributed else None
        self.device = torch.device(info.device)
        set_tf32(self.device, cfg.run.tf32)  # CUDA only; the CPU's settings are left alone
        # Found and checked before any heavy work, by rank 0 for everyone; a checkpoint of another world size or
        # ZeRO stage is loaded through DeepSpeed's universal form, which the engine must know about when built.
        self.resume_target = agree_resume(
            self.ckpt,
            cfg.checkpoint.resume,
            batch=self.batch,
            zero_stage=self.zero_stage,
            grad_cache=cfg.optim.grad_cache,
            num_workers=cfg.data.num_workers,
        )
        if self.resume_target is not None and self.resume_target.universal:
            ds.setdefault("checkpoint", {})["load_universal"] = True
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Ranks sharing a CPU host split its cores instead of oversubscribing them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
        # Same initial weights on every rank (DeepSpeed also broadcasts them); data and dropout seeds differ per rank.
        _seed_everything(cfg.run.seed)

        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        # Heartbeats and the current phase: a collective timeout then names the collective and the silent ranks.
        self.heartbeat = None
        if cfg.dist.heartbeat_seconds > 0:
            self.heartbeat = Heartbeat(
                self.run_dir / "heartbeats", info.rank, min_interval_s=cfg.dist.heartbeat_seconds
            ).start()
        self.tracker = CollectiveTracker(
            rank=info.rank,
            world_size=info.world_size,
            timeout_minutes=cfg.dist.timeout_minutes,
            heartbeat=self.heartbeat,
        )
        self.tokenizer = build_tokenizer(cfg.model.text.name_or_path)
        # The full model is built on every rank and partitioned by deepspeed.initialize; this keeps pretrained
        # weights loading as usual under every stage (zero.Init would be needed only for models that do not fit
        # one host's memory, far beyond CLIP sizes).
        model = build_model(cfg.model, device="cpu")
        # Lets ds_to_universal convert this run's checkpoints (no tensor parallelism: nothing else to declare).
        model.universal_checkpoint_info = {"universal_checkpoint_version": 0.4}
        self.data_cfg = model.image_tower.data_config()  # reads timm's pretrained_cfg only, safe under ZeRO-3
        _seed_everything(cfg.run.seed * 1000 + info.rank + 1)

        self.loader = self._build_loader(data_factory)
        self.steps_per_epoch = len(self.loader) // self.batch.grad_accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"one epoch has {len(self.loader)} batches per rank, fewer than optim.grad_accum_steps="
                f"{self.batch.grad_accum_steps}: use more data, a smaller batch, or fewer accumulation steps"
            )
        if cfg.schedule.total_steps is not None:
            self.total_steps = cfg.schedule.total_steps
        else:
            self.total_steps = cfg.schedule.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)

        optimizer = build_optimizer(
            model,
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
            cpu_offload=optimizer_offloaded(ds),
            fused=cfg.optim.fused,
            device=self.device,  # where DeepSpeed keeps the fp32 master partitions the optimizer steps
        )
        self.base_optimizer = optimizer  # the torch optimizer inside DeepSpeed's wrapper
        # Handed to deepspeed.initialize, so it is stepped at accumulation boundaries and saved/restored with the
        # engine under every ZeRO stage (a scheduler kept outside is not restored under ZeRO-3).
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, build_lr_lambda(self.total_steps, cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio)
        )
        with self.tracker.guard("engine set-up (parameter broadcast, universal checkpoint conversion)"):
            if self.resume_target is not None and self.resume_target.universal:
                self.ckpt.ensure_universal(self.resume_target)
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds, dist_init_required=False
            )
        self.model: DualEncoder = self.engine.module
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.precision, torch.float32)

        self.metrics = MetricsWriter(self.run_dir, enabled=info.is_main, tensorboard=cfg.logging.tensorboard)
        # Model FLOPs per sample, counted once on fake tensors (every rank: the same cheap, deterministic work).
        self.mfu = build_mfu_meter(cfg, self.device, info.world_size)
        self.step = 0
        self.last_saved_step = -1
        self.pos = DataPosition()
        self.stepper = StepRunner(
            self.engine,
            cfg.loss,
            group=self.group,
            world_size=info.world_size,
            device=self.device,
            dtype=self.dtype,
            micro_batch_size=self.batch.micro_batch_size,
            max_logit_scale=cfg.model.max_logit_scale,
            profile_loss=cfg.logging.profile_loss,
            tracker=self.tracker,
        )
        self.last_eval: dict[str, Any] | None = None
        self.sample_log = None
        if self.resume_target is not None:
            with self.tracker.guard("checkpoint load"):
                self._resume(self.resume_target)
        self.metrics.scalars(self.step, self.mfu.startup_scalars())
        self._log_plan()

    # ------------------------------------------------------------------------------------------------ set-up
    def _build_loader(self, data_factory):
        micro = self.batch.micro_batch_size
        if data_factory is not None:
            return data_factory(self.info.rank, self.info.world_size, micro)
        from ..data import build_image_transform, build_train_loader

        dc = self.data_cfg
        transform = build_image_transform(
            self.cfg.model.image.image_size,
            mean=dc["mean"],
            std=dc["std"],
            train=True,
            scale=tuple(self.cfg.data.rrc_scale),
            hflip=self.cfg.data.hflip,
        )
        return build_train_loader(
            self.cfg.data.train_data,
            tokenizer=self.tokenizer,
            image_transform=transform,
            batch_size=micro,
            num_workers=self.cfg.data.num_workers,
            seed=self.cfg.run.seed,
            rank=self.info.rank,
            world_size=self.info.world_size,
            mode=self.cfg.data.mode,
            samples_per_epoch=self.cfg.data.samples_per_epoch,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            max_text_len=self.cfg.model.text.max_length,
            caption_key=self.cfg.data.caption_key,
            # Pinned batches make the step's non-blocking copies asynchronous; only a CUDA device can use them.
            pin_memory=self.cfg.data.pin_memory and self.device.type == "cuda",
        )

    def _log_plan(self) -> None:
        b = self.batch
        n = b.global_batch_size if self.cfg.optim.grad_cache else b.micro_batch_size * b.world_size
        counts = self.model.param_counts()
        log.info("run folder %s", self.run_dir)
        log.info("%s", b.describe(self.cfg.optim.grad_cache))
        log.info(
            "ZeRO stage %d, %s, %d steps (%d per epoch, %d epochs), loss list N=%d, parameters %s",
            self.zero_stage,
            self.cfg.run.precision,
            self.total_steps,
            self.steps_per_epoch,
            self.epochs,
            n,
            counts["total"],
        )
        c = self.cfg
        log.info(
            "speed settings: AdamW %s, model.compile %s, attention image %s / text %s, run.tf32 %s, pin_memory %s",
            "fused" if self.base_optimizer.defaults.get("fused") else type(self.base_optimizer).__name__,
            c.model.compile,
            "sdpa" if c.model.image.fused_attn else "eager",
            c.model.text.attn_implementation,
            c.run.tf32 and self.device.type == "cuda",
            c.data.pin_memory and self.device.type == "cuda",
        )
        if c.model.compile and self.zero_stage == 3:
            log.warning(
                "model.compile under ZeRO-3: DeepSpeed's parameter-gathering hooks on every submodule break the "
                "compiled towers into per-module pieces (and hit torch._dynamo's recompile limit), so expect little "
                "speed-up; ZeRO-1/2 compile whole towers (docs/training.md, GPU speed switches)"
            )

    # ------------------------------------------------------------------------------------------------ schedule
    def rank_weight(self, step: int) -> float:
        """w(t) for optimizer step ``step`` (0-based); 0 for the plain-CLIP baseline."""
        lc = self.cfg.loss
        if not lc.ranking:
            return 0.0
        if lc.rank_weight_schedule == "epoch":
            epoch = step // self.steps_per_epoch + 1  # the released code counts epochs from 1
            return official_rank_weight(epoch, self.epochs, w_max=lc.rank_weight_max)
        return step_rank_weight(step, self.total_steps, w_max=lc.rank_weight_max, hold_from=lc.rank_weight_hold_from)

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor | float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns this step's scalars (the loss
        components as device tensors, read once per logging window)."""
        w = self.rank_weight(self.step)
        out: dict[str, torch.Tensor | float] = dict(
            self.stepper.run(micro_batches, w, grad_cache=self.cfg.optim.grad_cache, step=self.step)
        )
        self.tracker.enter("logit-scale clamp (optimizer master and module copy, no collective)")
        self._clamp_logit_scale()
        out["rank_weight"] = w
        return out

    def _clamp_logit_scale(self) -> None:
        """``model.max_logit_scale`` on the optimizer's fp32 master and on the module (see logit_scale.py)."""
        clamp_logit_scale(self.model.logit_scale, self.cfg.model.max_logit_scale)

    def logit_scale_value(self) -> float:
        """The raw (log) logit scale, gathered under ZeRO-3."""
        import deepspeed

        with deepspeed.zero.GatheredParameters([self.model.logit_scale]):
            return float(self.model.logit_scale.detach().float())

    # ------------------------------------------------------------------------------------------------ the loop
    def _micro_batches(self) -> Iterator[list[dict]]:
        """Yields the micro-batches of each optimizer step, advancing epochs; the tail of an epoch that cannot
        fill a whole step is skipped (identically on every rank)."""
        accum = self.batch.grad_accum_steps
        while True:
            it = self.loader.epoch_iter(self.pos.epoch)
            while self.pos.batches + accum <= len(self.loader):
                group = [next(it) for _ in range(accum)]
                self.pos.batches += accum
                yield group
            self.pos = DataPosition(self.pos.epoch + 1, 0)

    def train(self, stop: StopRequest | None = None) -> dict[str, Any]:
        """Train to ``total_steps``; returns a summary.

        ``stop``: the entry point installs it before building the trainer, so a signal during start-up is not
        lost, and keeps it installed through the final save, evaluation and export. Without one, the handlers are
        installed here for the loop only."""
        start = time.time()
        log.info("training from step %d to %d", self.step, self.total_steps)
        own = stop is None
        stop = StopRequest(self.group, self.device) if own else stop
        stop.attach(self.group, self.device)
        try:
            with self.tracker.guard():
                stopped = self._agreed(stop) or self._loop(stop, start)
        finally:
            if own:
                stop.restore()
        with self.tracker.guard():
            return self._finish(stopped, start)

    def _agreed(self, stop: StopRequest) -> int | None:
        self.tracker.enter("stop-flag all_reduce", self.step)
        return stop.agreed()

    def _finish(self, stopped: int | None, start: float) -> dict[str, Any]:
        cfg = self.cfg
        if stopped:
            if self.last_saved_step != self.step:
                self.save()
            log.warning(
                "stopped by %s after step %d; checkpoint saved, exit code %d asks for a requeue",
                signal.Signals(stopped).name,
                self.step,
                REQUEUE_EXIT_CODE,
            )
            return self._summary(start, export=None, stopped=stopped)
        if self.last_saved_step != self.step:
            self.save()
        if cfg.eval.zeroshot_data and (not cfg.eval.every_steps or self.step % cfg.eval.every_steps):
            self.evaluate()
        export = self.export() if cfg.checkpoint.export else None
        return self._summary(start, export=export, stopped=None)

    def _summary(self, start: float, *, export: Path | None, stopped: int | None) -> dict[str, Any]:
        return {
            "steps": self.step,
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.ckpt.latest()),
            "export": str(export) if export else None,
            "eval": self.last_eval,
            "seconds": time.time() - start,
            "stopped_by_signal": stopped,
        }

    def _loop(self, stop: StopRequest, start: float) -> int | None:
        """Steps until ``total_steps``, or until a stop signal reached any rank (returns its number)."""
        cfg = self.cfg
        batches = self._micro_batches()
        timer, window, first_step = StepTimer(), {}, self.step
        while self.step < self.total_steps:
            t0 = time.time()
            self.tracker.enter("data loading", self.step + 1)
            micro = next(batches)
            t1 = time.time()
            self.engine.train()
            out = self.train_step(micro)
            self.step += 1
            if cfg.logging.sample_keys:
                self._log_sample_keys(micro)
            timer.add(t1 - t0, time.time() - t0, self.batch.global_batch_size)
            for k, v in out.items():
                window[k] = window.get(k, 0.0) + v
            if self.step % cfg.logging.log_every == 0 or self.step == self.total_steps:
                self._log_window(window, timer, start, first_step)
                window, timer = {}, StepTimer()
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                self.evaluate()
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
            signum = self._agreed(stop)
            if signum:
                return signum
        return None

    def _log_sample_keys(self, micro_batches: list[dict]) -> None:
        """One line per optimizer step with the keys of this rank's samples (``logging.sample_keys``)."""
        if self.sample_log is None:
            folder = self.run_dir / "sample_keys"
            folder.mkdir(parents=True, exist_ok=True)
            self.sample_log = (folder / f"rank{self.info.rank:05d}.jsonl").open("a")
        keys = [str(k) for batch in micro_batches for k in batch.get("key", [])]
        self.sample_log.write(json.dumps({"step": self.step, "epoch": self.pos.epoch, "keys": keys}) + "\n")
        self.sample_log.flush()

    def _log_window(self, window: dict[str, float], timer: StepTimer, start: float, first_step: int) -> None:
        self.tracker.enter("logging (logit-scale gather under ZeRO-3)", self.step)
        n = timer.steps
        window = {k: float(v) for k, v in window.items()}  # the window's one read of the device
        scalars = {f"train/{k}": v / n for k, v in window.items() if k != "rank_weight"}
        scalars["train/rank_weight"] = window.get("rank_weight", 0.0) / n
        raw = self.logit_scale_value()
        scalars["train/logit_scale_raw"] = raw
        scalars["train/logit_scale"] = min(math.exp(raw), self.cfg.model.max_logit_scale)
        scalars["train/lr"] = float(self.engine.get_lr()[0])
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        loss_scale = _loss_scale(self.engine)
        if loss_scale is not None:
            scalars["train/loss_scale"] = loss_scale
        scalars["train/skipped_steps"] = float(getattr(self.engine, "skipped_steps", 0))
        scalars["train/nonfinite_losses"] = float(self.stepper.nonfinite_total)
        scalars.update(timer.summary(self.info.world_size))
        scalars.update(self.mfu.scalars(scalars.get("perf/samples_per_s", 0.0)))
        if self.cfg.logging.profile_loss and timer.total_s > 0:
            scalars["perf/loss_time_fraction"] = self.stepper.take_loss_seconds() / timer.total_s
        scalars.update(memory_stats(self.device))
        for reason, count in self.loader.skip_counts().items():
            scalars[f"data/skipped_{reason}"] = float(count)
        scalars["train/epoch"] = self.pos.epoch + self.pos.batches / max(1, len(self.loader))
        self.metrics.scalars(self.step, scalars)
        elapsed = time.time() - start
        done = self.step - first_step
        eta = elapsed / done * (self.total_steps - self.step) if done else 0.0
        mem_key = "memory/cuda_peak_gib" if "memory/cuda_peak_gib" in scalars else "memory/rss_peak_gib"
        log.info(
            "step %d/%d | loss %.4f (clip %.4f cross %.2f in %.2f) w %.3f | scale %.2f | lr %.2e | %.1f samples/s "
            "| data %.0f%% | mem %.2f GiB | eta %s",
            self.step,
            self.total_steps,
            scalars["train/loss"],
            scalars["train/clip"],
            scalars["train/cross"],
            scalars["train/inmodal"],
            scalars["train/rank_weight"],
            scalars["train/logit_scale"],
            scalars["train/lr"],
            scalars.get("perf/samples_per_s", 0.0),
            100 * scalars.get("perf/data_wait_fraction", 0.0),
            scalars.get(mem_key, 0.0),
            format_duration(eta),
        )
        self.metrics.flush()

    # ------------------------------------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, Any] | None:
        """Zero-shot evaluation on ``eval.zeroshot_data`` (every rank takes part); logged and appended to
        ``<run>/eval.jsonl``."""
        cfg = self.cfg.eval
        if not cfg.zeroshot_data:
            return None
        from ..evaluate import zeroshot_eval

        self.tracker.enter("evaluation (result gather)", self.step)
        self.engine.eval()
        dc = self.data_cfg
        # Under ZeRO-3 evaluate an unpartitioned copy: each rank evaluates its own slice, and ZeRO-3's per-module
        # gathers would otherwise be collectives issued a different number of times on different ranks.
        model = self.unpartitioned_model() if self.zero_stage == 3 else self.model
        with torch.no_grad():
            result = zeroshot_eval(
                model,
                self.tokenizer,
                data=cfg.zeroshot_data,
                classnames=cfg.classnames,
                templates=cfg.templates,
                image_size=self.cfg.model.image.image_size,
                mean=dc["mean"],
                std=dc["std"],
                batch_size=cfg.batch_size,
                max_length=self.cfg.model.text.max_length,
                device=self.device,
            )
        self.engine.train()
        summary = {k: result[k] for k in ("top1", "top5", "mean_per_class", "num_samples", "num_classes")}
        chance = 1.0 / max(1, summary["num_classes"])
        self.metrics.scalars(self.step, {f"eval/zeroshot_{k}": summary[k] for k in ("top1", "top5", "mean_per_class")})
        self.metrics.eval_record(self.step, {"task": "zeroshot", **summary, "chance": chance})
        log.info(
            "eval step %d: zero-shot top-1 %.1f%% top-5 %.1f%% (chance %.1f%%, %d images, %d classes)",
            self.step,
            100 * summary["top1"],
            100 * summary["top5"],
            100 * chance,
            summary["num_samples"],
            summary["num_classes"],
        )
        self.last_eval = {**summary, "chance": chance}
        return self.last_eval

    def unpartitioned_model(self) -> DualEncoder:
        """A plain copy of the current model with every parameter materialised (all ranks must call this under
        ZeRO-3: the gather is a collective). Used for evaluation and export checks."""
        import deepspeed

        params = dict(self.model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in params.items()}
        copy = build_model(_architecture_only(self.cfg).model, device="cpu")
        copy.load_state_dict(state, strict=True)
        return copy.to(self.device).eval()

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Client state stored with every checkpoint (DeepSpeed stores the engine, optimizer and scheduler)."""
        return {
            "step": self.step,
            "epoch": self.pos.epoch,
            "batches_in_epoch": self.pos.batches,
            "samples_in_epoch_per_rank": self.pos.batches * self.batch.micro_batch_size,
            "world_size": self.info.world_size,
            "nonfinite_total": self.stepper.nonfinite_total,
            "config": json.dumps(config_to_dict(self.cfg)),
        }

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint's ``COMPLETE`` marker records: enough to plan a resume without loading anything."""
        b = self.batch
        return {
            "world_size": b.world_size,
            "zero_stage": self.zero_stage,
            "micro_batch_size": b.micro_batch_size,
            "grad_accum_steps": b.grad_accum_steps,
            "global_batch_size": b.global_batch_size,
            "precision": self.cfg.run.precision,
            "num_workers": self.cfg.data.num_workers,
            "epoch": self.pos.epoch,
            "batches_in_epoch": self.pos.batches,
            "samples_in_epoch": self.pos.batches * b.micro_batch_size * b.world_size,
            "time": time.time(),
        }

    def save(self) -> Path:
        self.tracker.enter("checkpoint save (barriers, error agreement)", self.step)
        path = self.ckpt.save(self.engine, self.step, self.state_dict(), self.checkpoint_meta())
        self.last_saved_step = self.step
        return path

    def _resume(self, target: LoadTarget) -> None:
        src_world = int(target.meta.get("world_size", self.info.world_size))
        client = self.ckpt.load(self.engine, target, same_world=src_world == self.info.world_size)
        place_optimizer_steps(self.base_optimizer)  # after a universal load, fused AdamW needs its steps on device
        self.step = int(client["step"])
        self.last_saved_step = self.step
        self.stepper.nonfinite_total = int(client.get("nonfinite_total", 0))
        self.pos = DataPosition(int(client["epoch"]), batches_consumed(client, self.batch, where=target.path))
        self.loader.resume(self.pos.epoch, samples=self.pos.batches * self.batch.micro_batch_size)
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d of %d per rank%s)",
            target.path,
            self.step,
            self.pos.epoch,
            self.pos.batches,
            len(self.loader),
            f"; written by {src_world} ranks" if src_world != self.info.world_size else "",
        )

    def export(self) -> Path | None:
        """Consolidated fp32 weights from the latest checkpoint (DeepSpeed's own ZeRO consolidation), written by
        rank 0 as ``<run>/export/{model.safetensors,config.json}``."""
        self.tracker.enter("export (rank 0 consolidates, the others wait at a barrier)", self.step)
        out: Path | None = self.run_dir / "export"
        if self.info.is_main:  # rank 0 alone looks at the folder: every rank reaches the barrier whatever it sees
            latest = self.ckpt.latest()
            if latest is None:
                out = None
            else:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state = get_fp32_state_dict_from_zero_checkpoint(str(latest.parent), tag=latest.name)
                save_export(state, self.cfg, out)
                log.info("exported consolidated fp32 weights to %s", out)
        if self.group is not None:
            dist.barrier()
        return out

    def close(self, barrier: bool = True) -> None:
        """Flush and close the run's files; ``barrier=False`` after a failure (another rank may be gone)."""
        if self.sample_log is not None:
            self.sample_log.close()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.metrics.close()
        if barrier and dist.is_available() and dist.is_initialized():
            dist.barrier()


def _loss_scale(engine) -> float | None:
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, (int, float, torch.Tensor)):
            return float(value)
    return None


def _architecture_only(cfg: Config) -> Config:
    """The config with pretrained-weight loading switched off: for rebuilding a model whose weights come from
    elsewhere (an export, a gathered state)."""
    from ..export import architecture_config

    return architecture_config(cfg)
