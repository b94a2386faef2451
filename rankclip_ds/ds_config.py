"""The DeepSpeed JSON, reconciled with the typed config.

The typed config is the single source of truth for batch sizes, precision and gradient clipping. The JSON
(``--deepspeed ds_configs/zero2.json``) contributes the ZeRO stage, offload, communication and loss-scaling
settings. :func:`build_deepspeed_config` fills the derived fields and rejects a JSON that contradicts the config,
showing both values; DeepSpeed's own validator then checks the rest (unknown ZeRO keys, stage 4, ...).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from .config import BatchSizes, Config
from .problems import ConfigError

__all__ = [
    "BATCH_FIELDS",
    "build_deepspeed_config",
    "load_deepspeed_json",
    "optimizer_offloaded",
    "validate_with_deepspeed",
]

log = logging.getLogger(__name__)

BATCH_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")

# Sections the trainer builds itself from the typed config; a JSON that sets them would be silently overridden.
_OWNED_SECTIONS = {
    "optimizer": "the trainer builds AdamW with parameter groups from the optim section",
    "scheduler": "the trainer builds warm-up + cosine from the schedule section",
}
# Top-level keys this project knows DeepSpeed reads; anything else is reported (DeepSpeed itself ignores
# unknown top-level keys without a word).
_KNOWN_TOP_LEVEL = {
    *BATCH_FIELDS,
    "zero_optimization",
    "bf16",
    "fp16",
    "gradient_clipping",
    "steps_per_print",
    "wall_clock_breakdown",
    "prescale_gradients",
    "gradient_predivide_factor",
    "communication_data_type",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "activation_checkpointing",
    "flops_profiler",
    "tensorboard",
    "csv_monitor",
    "comms_logger",
    "checkpoint",
    "data_types",
    "dump_state",
    "memory_breakdown",
    "aio",
    "seq_parallel_communication_data_type",
    "torch_autocast",
    "compile",
}


def load_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON file (plain JSON; comments are not allowed)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed {str(path)!r}: no such file. Fix: pass one of ds_configs/*.json")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed {str(path)!r}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed {str(path)!r}: the top level must be a JSON object")
    return data


def optimizer_offloaded(ds: dict[str, Any]) -> bool:
    """Whether the DeepSpeed JSON offloads the ZeRO optimizer to the CPU (DeepSpeed then needs its CPU Adam)."""
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") == "cpu"


def _is_auto(value: Any) -> bool:
    return value == "auto"


def _check_same(source: str, key: str, json_value: Any, cfg_key: str, cfg_value: Any) -> None:
    if json_value is not None and not _is_auto(json_value) and json_value != cfg_value:
        raise ConfigError(
            f"{source}: {key}={json_value!r} contradicts the config's {cfg_key} ({cfg_value!r}). The typed config "
            f'is the single source of truth: remove {key} from the JSON (or set it to "auto"), or change '
            f"{cfg_key}"
        )


def build_deepspeed_config(
    ds: dict[str, Any], cfg: Config, batch: BatchSizes, *, source: str = "DeepSpeed JSON"
) -> dict[str, Any]:
    """Return the DeepSpeed config dict for ``cfg`` with the resolved ``batch`` (``config.resolve_batch``).

    Fills ``train_batch_size``, ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``,
    ``bf16``/``fp16``, ``gradient_clipping``; rejects contradictions with a message that shows both values.
    """
    out = copy.deepcopy(ds)
    derived = {
        "train_batch_size": batch.global_batch_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.grad_accum_steps,
    }
    cfg_keys = {
        "train_batch_size": f"optim.global_batch_size = micro {batch.micro_batch_size} × accum "
        f"{batch.grad_accum_steps} × world {batch.world_size}",
        "train_micro_batch_size_per_gpu": "optim.micro_batch_size",
        "gradient_accumulation_steps": "optim.grad_accum_steps",
    }
    for key in BATCH_FIELDS:
        _check_same(source, key, out.get(key), cfg_keys[key], derived[key])
        out[key] = derived[key]

    for section, why in _OWNED_SECTIONS.items():
        if section in out:
            raise ConfigError(f"{source}: has an {section!r} block, but {why}. Fix: remove {section!r} from the JSON")

    # Precision: the config decides; the JSON may carry loss-scaling details for fp16.
    precision = cfg.run.precision
    for name in ("bf16", "fp16"):
        section = out.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f'{source}: {name} must be an object like {{"enabled": true}}, got {section!r}')
        _check_same(source, f"{name}.enabled", section.get("enabled"), "run.precision", precision == name)
    out["bf16"] = {**out.get("bf16", {}), "enabled": precision == "bf16"}
    out["fp16"] = {**out.get("fp16", {}), "enabled": precision == "fp16"}

    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else 0.0
    _check_same(source, "gradient_clipping", out.get("gradient_clipping"), "optim.grad_clip", clip)
    out["gradient_clipping"] = clip

    zero = out.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else zero
    if stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"{source}: zero_optimization.stage={stage!r} does not exist; DeepSpeed's ZeRO has stages 0, 1, 2 and 3. "
            f"Fix: use ds_configs/zero1.json, zero2.json or zero3.json"
        )
    # Our own logs carry the step information; keep DeepSpeed's per-step prints out of the console by default.
    out.setdefault("steps_per_print", 10**9)

    for key in out:
        if key not in _KNOWN_TOP_LEVEL:
            log.warning(
                "%s: top-level key %r is not one this project passes on knowingly; DeepSpeed may ignore it", source, key
            )
    return out


def validate_with_deepspeed(ds: dict[str, Any], *, source: str = "DeepSpeed JSON") -> None:
    """Run DeepSpeed's own config validation (pydantic models, precision checks) without a process group.

    DeepSpeed checks ``train_batch_size = micro × accum × world`` against the world size it sees, which is 1
    without a process group, so the check is done on a copy with the batch fields for one rank.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = copy.deepcopy(ds)
    micro = probe.get("train_micro_batch_size_per_gpu", 1)
    accum = probe.get("gradient_accumulation_steps", 1)
    probe["train_batch_size"] = micro * accum
    try:
        DeepSpeedConfig(probe)
    except Exception as exc:  # pydantic ValidationError, AssertionError, ValueError: all are config mistakes
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{source}: DeepSpeed rejects this config: {detail}") from exc
