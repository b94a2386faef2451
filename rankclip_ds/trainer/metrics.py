"""Training telemetry: TensorBoard scalars and one console line per log step (rank 0), memory readings."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MetricsWriter",
    "StepTimer",
    "engine_scalars",
    "format_duration",
    "format_progress",
    "format_summary",
    "memory_stats",
]

log = logging.getLogger("rankclip_ds.train")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory in GiB. On GPUs, from PyTorch's caching allocator: ``cuda_allocated_gib`` held by tensors now,
    ``cuda_peak_gib`` the most ever held by tensors (since start-up), ``cuda_reserved_gib`` held by the allocator
    now (tensors + its cache: what other processes cannot have). On the CPU: process peak RSS and current RSS."""
    if device.type == "cuda":
        return {
            "memory/cuda_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
            "memory/cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory/cuda_reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
        }
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    out = {"memory/rss_peak_gib": peak_kib / 2**20}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["memory/rss_gib"] = pages * resource.getpagesize() / 2**30
    except (OSError, ValueError, IndexError):
        pass
    return out


def engine_scalars(engine) -> dict[str, float]:
    """The DeepSpeed engine's learning rate, global gradient norm, fp16 loss scale and skipped steps."""
    out = {"train/lr": float(engine.get_lr()[0])}
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        out["train/grad_norm"] = float(grad_norm)
    for attr in ("cur_scale", "loss_scale"):  # fp16's dynamic loss scale, under its name in each ZeRO stage
        value = getattr(engine.optimizer, attr, None)
        if isinstance(value, (int, float, torch.Tensor)):
            out["train/loss_scale"] = float(value)
            break
    out["train/skipped_steps"] = float(getattr(engine, "skipped_steps", 0))
    return out


def format_progress(step: int, total: int, s: dict[str, float], eta_s: float) -> str:
    """The console line of a logging window, from its TensorBoard scalars ``s``."""
    mem = s.get("memory/cuda_peak_gib", s.get("memory/rss_peak_gib", 0.0))
    return (
        f"step {step}/{total} | loss {s['train/loss']:.4f} (clip {s['train/clip']:.4f} cross {s['train/cross']:.2f} "
        f"in {s['train/inmodal']:.2f}) w {s['train/rank_weight']:.3f} | scale {s['train/logit_scale']:.2f} | "
        f"lr {s['train/lr']:.2e} | {s.get('perf/samples_per_s', 0.0):.1f} samples/s | "
        f"data {100 * s.get('perf/data_wait_fraction', 0.0):.0f}% | mem {mem:.2f} GiB | eta {format_duration(eta_s)}"
    )


def format_summary(summary: dict, *, requeue_exit_code: int) -> str:
    """The end-of-run report: what was trained, how well, and where everything is; or, for a run stopped by a
    signal, where it stopped and how to continue."""
    if summary["stopped_by_signal"]:
        return (
            f"stopped by signal {summary['stopped_by_signal']} at step {summary['steps']}; checkpoint "
            f"{summary['checkpoint']}; exit code {requeue_exit_code} (resume with --checkpoint.resume latest)"
        )
    lines = ["", "RankCLIP-DS run finished", f"  steps            {summary['steps']} in {summary['seconds']:.0f} s"]
    ev = summary.get("eval")
    if ev:
        lines.append(
            f"  zero-shot        top-1 {100 * ev['top1']:.1f}% (chance {100 * ev['chance']:.1f}%), "
            f"top-5 {100 * ev['top5']:.1f}%, mean per class {100 * ev['mean_per_class']:.1f}% "
            f"on {ev['num_samples']} held-out images of {ev['num_classes']} classes"
        )
    run = summary["run_dir"]
    lines += [
        f"  run folder       {run} (resolved config: {run}/config.yaml)",
        f"  TensorBoard      tensorboard --logdir {run}/tb",
        f"  checkpoint       {summary['checkpoint']}",
        f"  export           {summary['export']} (rankclip_ds.load_model(path) loads it without DeepSpeed)",
    ]
    return "\n".join(lines)


class StepTimer:
    """Splits wall time between waiting for data and computing, over a logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.data_s = 0.0
        self.total_s = 0.0
        self.steps = 0
        self.samples = 0

    def add(self, data_s: float, total_s: float, samples: int) -> None:
        self.data_s += data_s
        self.total_s += total_s
        self.steps += 1
        self.samples += samples

    def summary(self, world_size: int) -> dict[str, float]:
        if not self.steps:
            return {}
        step_time = self.total_s / self.steps
        rate = self.samples / self.total_s if self.total_s > 0 else 0.0
        return {
            "perf/step_time_s": step_time,
            "perf/samples_per_s": rate,
            "perf/samples_per_s_per_device": rate / world_size,
            "perf/data_wait_fraction": self.data_s / self.total_s if self.total_s > 0 else 0.0,
        }


class MetricsWriter:
    """TensorBoard event files under ``<run>/tb`` and an ``eval.jsonl``; only rank 0 writes."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        self.start = time.time()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is None:
            return
        for key, value in values.items():
            self.tb.add_scalar(key, float(value), global_step=step)

    def eval_record(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with (self.run_dir / "eval.jsonl").open("a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
