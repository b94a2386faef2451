"""Training telemetry: TensorBoard scalars and one console line per log step (rank 0), memory readings."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsWriter", "StepTimer", "format_duration", "memory_stats"]

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
