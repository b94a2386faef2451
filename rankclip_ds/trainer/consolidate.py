"""Whole-model copies of a training run: the live model gathered from its ZeRO partitions, and the export of the
latest checkpoint consolidated by DeepSpeed's own ``zero_to_fp32``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..export import consolidated_state, save_export
from ..model import DualEncoder, ModelConfig, architecture_only, build_model

__all__ = ["export_latest_checkpoint", "unpartitioned_copy"]

log = logging.getLogger("rankclip_ds.train")


def unpartitioned_copy(model: DualEncoder, model_cfg: ModelConfig, device: torch.device) -> DualEncoder:
    """A plain copy of ``model`` (the engine's module) with every parameter materialised, in eval mode on
    ``device``. Under ZeRO-3 the gather is a collective: every rank calls this."""
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in params.items()}
    copy = build_model(architecture_only(model_cfg), device="cpu")
    copy.load_state_dict(state, strict=True)
    return copy.to(device).eval()


def export_latest_checkpoint(latest: Path | None, model_cfg: ModelConfig, out: Path) -> Path | None:
    """Consolidated fp32 weights of checkpoint ``latest`` (any ZeRO stage) and the model section, written to
    ``out`` (:func:`rankclip_ds.export.save_export`); None when the run has no checkpoint. Rank 0 only."""
    if latest is None:
        return None
    save_export(consolidated_state(latest), model_cfg, out)
    log.info("exported consolidated fp32 weights to %s", out)
    return out
