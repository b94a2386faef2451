"""The DeepSpeed trainer: one object that owns the engine, the data stream, checkpoints and telemetry.

Read it top to bottom: ``__init__`` is the sequence of build phases (trainer/setup.py); ``train`` runs the loop;
``train_step`` is one optimizer step, forward → loss → backward → step, with its two strategies beside it (plain
accumulation, gradient caching); then logging, evaluation, checkpoints and the export.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import Config, config_to_dict
from ..dist import DistInfo
from ..model import DualEncoder
from ..resolved import ResolvedRun
from .checkpoint import CheckpointManager, LoadTarget
from .consolidate import export_latest_checkpoint, unpartitioned_copy
from .logit_scale import clamp_logit_scale
from .loss import TrainingLoss
from .metrics import MetricsWriter, StepTimer, engine_scalars, format_progress, memory_stats
from .mfu import build_mfu_meter
from .optim import place_optimizer_steps
from .periodic_eval import record_zeroshot, zeroshot_during_training
from .resume import agree_resume, batches_consumed
from .setup import (
    build_engine,
    build_model_for_training,
    build_train_data,
    data_streams,
    fetch_pretrained,
    log_run_start,
    start_process,
    training_length,
    write_run_folder,
)
from .signals import REQUEUE_EXIT_CODE, StopRequest
from .step import COMPONENTS, NonFiniteGuard, dropout_rng_state, replay_dropout_rng, to_device

__all__ = ["Trainer"]

log = logging.getLogger("rankclip_ds.train")


@dataclass
class DataPosition:
    """Where the stream is: the epoch, and batches consumed from it on each rank (identical on every rank)."""

    epoch: int = 0
    batches: int = 0


class Trainer:
    """Builds everything from a :class:`Config` and the pre-flight's :class:`ResolvedRun`, and trains.

    ``data_factory`` (tests only) replaces the WebDataset loader: ``data_factory(rank, world, micro)`` must return an
    object with ``__len__`` (batches per epoch, equal on every rank), ``epoch_iter(epoch)`` yielding batch dicts
    (``image``, ``input_ids``, ``attention_mask``), ``resume(epoch, samples=...)`` and ``skip_counts()``.
    ``step`` counts the optimizer steps done: the one step counter (the watchdog and the heartbeat are told it).
    """

    def __init__(
        self,
        cfg: Config,
        run: ResolvedRun,
        info: DistInfo,
        *,
        data_factory: Callable[[int, int, int], Any] | None = None,
    ) -> None:
        self.cfg, self.run, self.info = cfg, run, info
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.step = 0
        self.pos = DataPosition()
        self.last_saved_step = -1
        self.last_eval: dict[str, Any] | None = None
        self.sample_log = None
        self.metrics: MetricsWriter | None = None  # made by _build; close() runs without it after a failed build
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last=cfg.checkpoint.keep_last,
            rank=info.rank,
            min_free_factor=cfg.checkpoint.min_free_factor,
        )
        self.process = start_process(cfg, info, self.run_dir)
        self.group, self.device, self.tracker = self.process.group, self.process.device, self.process.tracker
        # Found and checked before any heavy work, by rank 0 for everyone (docs/reliability.md).
        self.resume_target = agree_resume(
            self.ckpt,
            cfg.checkpoint.resume,
            batch=run.batch,
            zero_stage=run.zero_stage,
        )
        write_run_folder(cfg, info, self.run_dir, self.process)
        try:
            self._build(data_factory)
        except BaseException:
            self.close(barrier=False)  # the heartbeat thread and the run's files; nothing else was opened yet
            raise

    def _build(self, data_factory) -> None:
        """The build phases after the run folder: hub files, model, data, length, engine, objective, telemetry,
        resume."""
        # Rank 0 fills the Hugging Face cache (and converts model.init_from); every rank then reads it.
        self.cfg = fetch_pretrained(self.cfg, self.info, self.run_dir, self.process)
        cfg, run, info = self.cfg, self.run, self.info
        model, self.tokenizer, self.preprocessing = build_model_for_training(cfg, info)
        streams = data_streams(cfg, self.resume_target)
        self.loader = build_train_data(
            cfg, info, run, self.tokenizer, self.preprocessing, self.device, data_factory, streams
        )
        self.length = training_length(cfg, len(self.loader), run.batch)
        self.engine, self.base_optimizer = build_engine(
            cfg, run, model, self.length, self.process, self.ckpt, self.resume_target
        )
        self.model: DualEncoder = self.engine.module
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.precision, torch.float32)
        self.loss = TrainingLoss(
            cfg.loss,
            group=self.group,
            world_size=info.world_size,
            local_rows=run.batch.loss_local_rows,
            max_logit_scale=cfg.model.max_logit_scale,
            length=self.length,
            device=self.device,
            profile=cfg.logging.profile_loss,
        )
        self.nonfinite = NonFiniteGuard(self.engine.optimizer)
        self.metrics = MetricsWriter(self.run_dir, enabled=info.is_main, tensorboard=cfg.logging.tensorboard)
        self.mfu = build_mfu_meter(cfg, self.device, info.world_size)  # FLOPs per sample, counted once
        if self.resume_target is not None:
            with self.tracker.guard("checkpoint load", self.step):
                self._resume(self.resume_target)
        self.metrics.scalars(self.step, self.mfu.startup_scalars())
        log_run_start(cfg, run, self.length, self.model, self.base_optimizer, self.device, self.run_dir)

    @property
    def total_steps(self) -> int:
        return self.length.total_steps

    # ------------------------------------------------------------------------------------------------ the loop
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
            timer.add(t1 - t0, time.time() - t0, self.run.batch.global_batch_size)
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

    def _micro_batches(self) -> Iterator[list[dict]]:
        """Yields the micro-batches of each optimizer step, advancing epochs; the tail of an epoch that cannot
        fill a whole step is skipped (identically on every rank)."""
        accum = self.run.batch.grad_accum_steps
        while True:
            it = self.loader.epoch_iter(self.pos.epoch)
            while self.pos.batches + accum <= len(self.loader):
                group = [next(it) for _ in range(accum)]
                self.pos.batches += accum
                yield group
            self.pos = DataPosition(self.pos.epoch + 1, 0)

    def _agreed(self, stop: StopRequest) -> int | None:
        self.tracker.enter("stop-flag all_reduce", self.step)
        return stop.agreed()

    def _finish(self, stopped: int | None, start: float) -> dict[str, Any]:
        cfg = self.cfg
        if self.last_saved_step != self.step:
            self.save()
        if stopped:
            log.warning(
                "stopped by %s after step %d; checkpoint saved, exit code %d asks for a requeue",
                signal.Signals(stopped).name,
                self.step,
                REQUEUE_EXIT_CODE,
            )
            return self._summary(start, export=None, stopped=stopped)
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

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor | float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches, then the logit-scale clamp; returns the
        step's loss components (global values, device tensors read once per logging window) and ``rank_weight``.

        The loss gives each rank the gradient of the *global* loss for its embeddings and its share of the
        logit-scale gradient; DeepSpeed averages gradients over ranks, so every backward is scaled by the world
        size (docs/training.md)."""
        w = self.loss.rank_weight(self.step)
        if self.cfg.optim.grad_cache:
            out = self._grad_cache_step(micro_batches, w)
        else:
            out = self._accumulation_step(micro_batches, w)
        self.nonfinite.end_step(self.step + 1)
        self.tracker.enter("logit-scale clamp (optimizer master and module copy, no collective)", self.step + 1)
        clamp_logit_scale(self.model.logit_scale, self.cfg.model.max_logit_scale)
        return {**out, "rank_weight": w}

    def _accumulation_step(self, micro_batches: list[dict], w: float) -> dict[str, torch.Tensor]:
        """Plain accumulation: each micro-batch's own loss over micro × world items; DeepSpeed divides each backward
        by the accumulation steps and steps the optimizer at the last one."""
        step, world, n = self.step + 1, self.info.world_size, len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            self.tracker.enter(f"forward and loss embedding exchange (micro-batch {i})", step)
            img, txt, logit_scale = self.engine(*to_device(batch, self.device, self.dtype))  # forward
            out = self.loss(img, txt, logit_scale, w)  # loss
            finite = self.nonfinite.finite(out, step=step, where=f"micro-batch {i}")
            loss = out["loss"] if finite else self.nonfinite.stand_in((img, txt, logit_scale))
            self.tracker.enter(f"backward gradient reduction (micro-batch {i})", step)
            self.engine.backward(loss * world)  # backward
            self.tracker.enter("optimizer step (gradient norm all-reduce, parameter all-gather)", step)
            with self.nonfinite.stepping(last=i == n - 1):
                self.engine.step()  # step (DeepSpeed steps the optimizer at the accumulation boundary)
            for k in COMPONENTS:
                sums[k] = sums.get(k, 0.0) + out[k].detach() / n
        return sums

    def _grad_cache_step(self, micro_batches: list[dict], w: float) -> dict[str, torch.Tensor]:
        """Gradient caching: embed every micro-batch without autograd, one loss over the whole global batch, then
        re-run each micro-batch with autograd (same RNG as the first pass) feeding the cached embedding gradients
        back through the surrogate ``<emb, cached grad>``, which already carries the full gradient."""
        step, world, n = self.step + 1, self.info.world_size, len(micro_batches)
        self.tracker.enter("gradient-cache embedding forward", step)
        rng, imgs, txts = [], [], []
        with torch.no_grad():
            for batch in micro_batches:
                rng.append(dropout_rng_state(self.device))
                img, txt, logit_scale = self.engine(*to_device(batch, self.device, self.dtype))  # forward, no graph
                imgs.append(img.float())
                txts.append(txt.float())
        img_all = torch.cat(imgs).requires_grad_(True)  # (accum × b, D): this rank's rows of the global list
        txt_all = torch.cat(txts).requires_grad_(True)
        scale_leaf = logit_scale.detach().float().requires_grad_(True)
        self.tracker.enter("gradient-cache loss embedding exchange", step)
        out = self.loss(img_all, txt_all, scale_leaf, w)  # loss over the whole global batch
        finite = self.nonfinite.finite(out, step=step, where="gradient-cache loss")
        if finite:
            out["loss"].backward()  # the cached gradients w.r.t. the embeddings and the logit scale
            g_img, g_txt = img_all.grad.split([len(x) for x in imgs]), txt_all.grad.split([len(x) for x in txts])
        for i, batch in enumerate(micro_batches):
            self.tracker.enter(f"gradient-cache replay: forward, backward, step (micro-batch {i})", step)
            replay_dropout_rng(rng[i], self.device)
            img, txt, logit_scale = self.engine(*to_device(batch, self.device, self.dtype))  # forward again
            if finite:
                surrogate = (img.float() * g_img[i]).sum() + (txt.float() * g_txt[i]).sum()
                if i == 0:  # the logit scale's (local share of the) gradient enters once
                    surrogate = surrogate + (logit_scale.float() * scale_leaf.grad).sum()
            else:
                surrogate = self.nonfinite.stand_in((img, txt, logit_scale))
            # The surrogate carries the full gradient: no division by the accumulation steps; undo DeepSpeed's
            # mean over ranks.
            self.engine.backward(surrogate * world, scale_wrt_gas=False)  # backward
            with self.nonfinite.stepping(last=i == n - 1):
                self.engine.step()  # step
        return {k: out[k].detach() for k in COMPONENTS}

    # ------------------------------------------------------------------------------------------------ logging
    def logit_scale_value(self) -> float:
        """The raw (log) logit scale, gathered under ZeRO-3."""
        import deepspeed

        with deepspeed.zero.GatheredParameters([self.model.logit_scale]):
            return float(self.model.logit_scale.detach().float())

    def _log_window(self, window: dict, timer: StepTimer, start: float, first_step: int) -> None:
        self.tracker.enter("logging (logit-scale gather under ZeRO-3)", self.step)
        n = timer.steps
        window = {k: float(v) for k, v in window.items()}  # the window's one read of the device
        scalars = {f"train/{k}": v / n for k, v in window.items()}
        raw = self.logit_scale_value()
        scalars["train/logit_scale_raw"] = raw
        scalars["train/logit_scale"] = min(math.exp(raw), self.cfg.model.max_logit_scale)
        scalars.update(engine_scalars(self.engine))
        scalars["train/nonfinite_losses"] = float(self.nonfinite.total)
        scalars.update(timer.summary(self.info.world_size))
        scalars.update(self.mfu.scalars(scalars.get("perf/samples_per_s", 0.0)))
        if self.cfg.logging.profile_loss and timer.total_s > 0:
            scalars["perf/loss_time_fraction"] = self.loss.take_seconds() / timer.total_s
        scalars.update(memory_stats(self.device))
        for reason, count in self.loader.skip_counts().items():
            # retries and padding lose no sample: named for what they count
            name = {"remote_retry": "data/remote_retries", "padded": "data/padded_samples"}.get(reason)
            scalars[name or f"data/skipped_{reason}"] = float(count)
        scalars["train/epoch"] = self.pos.epoch + self.pos.batches / max(1, len(self.loader))
        self.metrics.scalars(self.step, scalars)
        done = self.step - first_step
        eta = (time.time() - start) / done * (self.total_steps - self.step) if done else 0.0
        log.info("%s", format_progress(self.step, self.total_steps, scalars, eta))
        self.metrics.flush()

    def _log_sample_keys(self, micro_batches: list[dict]) -> None:
        """One line per optimizer step with the keys of this rank's samples (``logging.sample_keys``)."""
        if self.sample_log is None:
            folder = self.run_dir / "sample_keys"
            folder.mkdir(parents=True, exist_ok=True)
            self.sample_log = (folder / f"rank{self.info.rank:05d}.jsonl").open("a")
        keys = [str(k) for batch in micro_batches for k in batch.get("key", [])]
        self.sample_log.write(json.dumps({"step": self.step, "epoch": self.pos.epoch, "keys": keys}) + "\n")
        self.sample_log.flush()

    # ------------------------------------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, Any] | None:
        """Zero-shot evaluation on ``eval.zeroshot_data`` (every rank takes part); logged and appended to
        ``<run>/eval.jsonl``."""
        if not self.cfg.eval.zeroshot_data:
            return None
        self.tracker.enter("evaluation (result gather)", self.step)
        self.engine.eval()
        # Under ZeRO-3 evaluate an unpartitioned copy: each rank evaluates its own slice, and ZeRO-3's per-module
        # gathers would otherwise be collectives issued a different number of times on different ranks.
        model = self.unpartitioned_model() if self.run.zero_stage == 3 else self.model
        self.last_eval = zeroshot_during_training(model, self.tokenizer, self.cfg, self.preprocessing, self.device)
        self.engine.train()
        record_zeroshot(self.metrics, self.step, self.last_eval)
        return self.last_eval

    def unpartitioned_model(self) -> DualEncoder:
        """A plain copy of the current model, every parameter materialised (a collective under ZeRO-3: every rank
        calls it). Used for evaluation under ZeRO-3 and by checks of the export."""
        return unpartitioned_copy(self.model, self.cfg.model, self.device)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Client state stored with every checkpoint (DeepSpeed stores the engine, optimizer and scheduler)."""
        return {
            "step": self.step,
            "epoch": self.pos.epoch,
            "batches_in_epoch": self.pos.batches,
            "samples_in_epoch_per_rank": self.pos.batches * self.run.batch.micro_batch_size,
            "world_size": self.info.world_size,
            "nonfinite_total": self.nonfinite.total,
            "config": json.dumps(config_to_dict(self.cfg)),
        }

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint's ``COMPLETE`` marker records: enough to plan a resume without loading anything."""
        b = self.run.batch
        return {
            "world_size": b.world_size,
            "zero_stage": self.run.zero_stage,
            "micro_batch_size": b.micro_batch_size,
            "grad_accum_steps": b.grad_accum_steps,
            "global_batch_size": b.global_batch_size,
            "precision": self.cfg.run.precision,
            "num_workers": self.cfg.data.num_workers,
            "epoch": self.pos.epoch,
            "batches_in_epoch": self.pos.batches,
            "samples_in_epoch": self.pos.batches * b.samples_per_micro_step,
            "data_streams": getattr(self.loader, "streams", None),
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
        self.step = self.last_saved_step = int(client["step"])
        self.nonfinite.total = int(client.get("nonfinite_total", 0))
        self.pos = DataPosition(int(client["epoch"]), batches_consumed(client, self.run.batch, where=target.path))
        self.loader.resume(self.pos.epoch, samples=self.pos.batches * self.run.batch.micro_batch_size)
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
        """Consolidated fp32 weights of the latest checkpoint (DeepSpeed's own ZeRO consolidation), written by
        rank 0 as ``<run>/export``; the other ranks wait at a barrier."""
        self.tracker.enter("export (rank 0 consolidates, the others wait at a barrier)", self.step)
        out = None
        if self.info.is_main:  # rank 0 alone looks at the folder: every rank reaches the barrier whatever it sees
            out = export_latest_checkpoint(self.ckpt.latest(), self.cfg.model, self.run_dir / "export")
        if self.group is not None:
            dist.barrier()
        return out if self.info.is_main else self.run_dir / "export"

    def close(self, barrier: bool = True) -> None:
        """Flush and close the run's files; ``barrier=False`` after a failure (another rank may be gone)."""
        if self.sample_log is not None:
            self.sample_log.close()
        if self.process.heartbeat is not None:
            self.process.heartbeat.stop()
        if self.metrics is not None:
            self.metrics.close()
        if barrier and dist.is_available() and dist.is_initialized():
            dist.barrier()
