"""What a configuration resolves to on a given number of ranks: the batch sizes (and so the loss's list length and
local rows) and the DeepSpeed JSON, reconciled with the config and validated by DeepSpeed.

Computed once, by the pre-flight (:func:`rankclip_ds.preflight.run_preflight`, which returns it once every check
passed), and handed to whoever needs it: the trainer, the dry run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import BatchSizes, Config, resolve_batch
from .ds_config import build_deepspeed_config, validate_with_deepspeed

__all__ = ["ResolvedRun", "resolve_run"]


@dataclass(frozen=True)
class ResolvedRun:
    """A run's numbers for its world size."""

    batch: BatchSizes
    """``global = micro × accum × world``, the loss's list length and local rows."""
    deepspeed: dict[str, Any]
    """The DeepSpeed config: the JSON with its batch, precision and clipping fields filled from the config."""
    deepspeed_source: str = "DeepSpeed JSON"
    """Where the JSON came from (its path), for messages."""

    @property
    def world_size(self) -> int:
        return self.batch.world_size

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))


def resolve_run(
    cfg: Config, ds_json: dict[str, Any], world_size: int, *, source: str = "DeepSpeed JSON"
) -> ResolvedRun:
    """Resolve ``cfg`` and the DeepSpeed JSON for ``world_size`` ranks; raises :class:`ConfigError` on the first
    problem (the pre-flight reports all of them at once and calls this only when there are none)."""
    batch = resolve_batch(cfg.optim, world_size)
    ds = build_deepspeed_config(ds_json, cfg, batch, source=source)
    validate_with_deepspeed(ds, source=source)
    return ResolvedRun(batch, ds, source)
