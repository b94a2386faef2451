"""Pre-flight: every cheap check of a run's configuration, done before any heavy work, all problems at once.

The typed config validates each value on its own when it is loaded. What it cannot see needs the world size,
the DeepSpeed JSON, installed packages or the file system: whether the batch splits over this many ranks, whether
the JSON contradicts the config, whether the timm model exists, whether the text model, the shards, the eval data,
the resume checkpoint and the run folder are there. Without this module those mistakes surface one at a time and
late: after the process group is up, the model built, the loader started, sometimes hours into a run (the final
zero-shot evaluation). :func:`run_preflight` runs all of these checks in milliseconds once timm, transformers and
DeepSpeed are imported (the run imports them anyway), with no process group, no model construction and no data
decoding, and raises one :class:`ConfigError` listing every problem on its own line, each naming the field, the
bad value and the fix. Independent checks all run; a dependent one is narrowed, not skipped (when the batch does
not resolve, the JSON's batch fields cannot be compared, but the rest of the JSON is still checked).

Some problems concern this machine rather than the configuration (the data, the weights, the checkpoint, the run
folder, the device's precision support): a dry run may plan on a login node or a laptop where the data is not
mounted, so :mod:`rankclip_ds.dry_run` reports those as notes, while training refuses to start.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import BatchSizes, Config, resolve_batch
from .config.batch import nodes_hint
from .model.checks import check_image_tower, check_text_tower
from .model.clip_init import check_init_from
from .model.lock import check_locks
from .problems import ConfigError, Problem, format_problems, problem_message, suggest
from .resolved import ResolvedRun

__all__ = ["preflight", "run_preflight"]


# ------------------------------------------------------------------------------------------------ batch
def _batch_text(batch: BatchSizes) -> str:
    return (
        f"global batch {batch.global_batch_size} = micro {batch.micro_batch_size} × accum {batch.grad_accum_steps} "
        f"× world {batch.world_size}"
    )


def _check_batch(
    cfg: Config, world_size: int, ranks_per_node: int | None = None
) -> tuple[BatchSizes | None, list[Problem]]:
    """Batch arithmetic for this world size, and the checks that need it (the loss's chunk against its local rows,
    a virtual epoch against one step). ``ranks_per_node`` (the launcher's local world size) names the nodes of a
    multi-node world in the message of a batch that does not fit it."""
    try:
        batch = resolve_batch(cfg.optim, world_size)
    except ConfigError as exc:
        hint = nodes_hint(cfg.optim, world_size, ranks_per_node)
        return None, [Problem("optim.global_batch_size", f"{exc}." + hint if hint else str(exc))]
    problems = []
    rows = batch.loss_local_rows
    if cfg.loss.chunk_size is not None and cfg.loss.chunk_size > rows:
        micro = (
            f"optim.micro_batch_size={batch.micro_batch_size}"
            if cfg.optim.micro_batch_size is not None
            else f"the micro batch derived from optim.global_batch_size={batch.global_batch_size} over "
            f"{world_size} ranks"
        )
        accum = f" × grad_accum_steps={batch.grad_accum_steps} with grad_cache" if batch.grad_cache else ""
        problems.append(
            Problem.of(
                "loss.chunk_size",
                cfg.loss.chunk_size,
                f"is larger than the loss's local batch ({rows} rows: {micro}{accum})",
                f"use loss.chunk_size <= {rows}, or null for the default",
            )
        )
    data = cfg.data
    if data.streams is not None and data.streams > batch.global_batch_size:
        problems.append(
            Problem.of(
                "data.streams",
                data.streams,
                f"is larger than the global batch ({_batch_text(batch)}): every stream gives at least one sample to "
                "each step",
                f"use data.streams <= {batch.global_batch_size}, or null for one per rank and worker",
            )
        )
    # A virtual epoch shorter than one step gives the loader no batch (it refuses only once it is built).
    if (
        data.mode == "resampled"
        and data.samples_per_epoch is not None
        and data.samples_per_epoch < batch.global_batch_size
    ):
        problems.append(
            Problem.of(
                "data.samples_per_epoch",
                data.samples_per_epoch,
                f"is less than one optimizer step ({_batch_text(batch)})",
                f"use data.samples_per_epoch >= {batch.global_batch_size}, or a smaller batch",
            )
        )
    return batch, problems


# ------------------------------------------------------------------------------------------------ DeepSpeed
def _check_deepspeed(
    cfg: Config, ds_json: dict[str, Any], batch: BatchSizes | None, source: str
) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The JSON, reconciled with the config and validated by DeepSpeed itself (no process group needed); returns
    the resolved JSON when ``batch`` resolved and nothing is wrong."""
    from .ds_config import BATCH_FIELDS, build_deepspeed_config, validate_with_deepspeed

    problems = []
    ds = dict(ds_json)
    both = [name for name in ("bf16", "fp16") if isinstance(ds.get(name), dict) and ds[name].get("enabled") is True]
    if len(both) == 2:
        problems.append(
            Problem(
                f"bf16.enabled / fp16.enabled in {source}",
                f"{source}: bf16.enabled=true and fp16.enabled=true: a run trains in one precision, and "
                f'run.precision={cfg.run.precision!r} decides it. Fix: set both to "auto" (or remove them) and '
                f"choose with --run.precision bf16|fp16|fp32",
            )
        )
        # Checked; drop the flags so that the JSON's other mistakes still show instead of a derived contradiction.
        ds = {**ds, "bf16": {k: v for k, v in ds["bf16"].items() if k != "enabled"}}
        ds["fp16"] = {k: v for k, v in ds["fp16"].items() if k != "enabled"}
    if batch is None:
        # The batch does not resolve (reported above), so the JSON's batch fields cannot be compared; check the
        # rest of the JSON against a one-rank probe batch instead of hiding its mistakes until the batch is fixed.
        ds = {k: v for k, v in ds.items() if k not in BATCH_FIELDS}
    probe = batch or BatchSizes(micro_batch_size=1, grad_accum_steps=1, world_size=1, global_batch_size=1)
    try:
        resolved = build_deepspeed_config(ds, cfg, probe, source=source)
    except ConfigError as exc:
        problems.append(Problem(_json_field(str(exc), source), str(exc)))
        return None, problems
    try:
        validate_with_deepspeed(resolved, source=source)
    except ConfigError as exc:
        problems.extend(_deepspeed_rejections(exc, resolved, source))
    return (resolved if batch is not None and not problems else None), problems


def _deepspeed_rejections(exc: ConfigError, ds: dict[str, Any], source: str) -> list[Problem]:
    """DeepSpeed's pydantic errors, one problem each, naming the JSON field, the value and a fix (DeepSpeed's own
    text names neither the section nor a fix)."""
    cause = exc.__cause__
    errors = getattr(cause, "errors", None)
    if not callable(errors):
        fix = "correct the field DeepSpeed names (https://www.deepspeed.ai/docs/config-json/)"
        return [Problem(source, f"{exc}. Fix: {fix}")]
    model = _deepspeed_models().get(getattr(cause, "title", ""))
    problems = []
    for err in errors():
        loc = [str(part) for part in err.get("loc", ())]
        section = _json_section(ds, loc)
        field = ".".join(([section] if section else []) + loc) or "(top level)"
        if err.get("type") == "extra_forbidden" and model is not None and len(loc) == 1:
            names = [n for name, f in model.model_fields.items() for n in (name, f.alias) if n]
            fix = f"remove {field}" + (suggest(loc[-1], names) or f"; valid keys: {', '.join(sorted(names))}")
        elif err.get("type") == "enum" and "expected" in err.get("ctx", {}):
            fix = f"use one of {err['ctx']['expected']}"
        else:
            fix = "see https://www.deepspeed.ai/docs/config-json/"
        value = err.get("input")
        problem = f"DeepSpeed rejects it: {err.get('msg', 'invalid')}"
        problems.append(Problem(f"{field} in {source}", f"{source}: " + problem_message(field, value, problem, fix)))
    return problems


def _deepspeed_models() -> dict[str, type]:
    """DeepSpeed's config sections by class name (a pydantic error carries only the class name as its title)."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    found: dict[str, type] = {}
    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.setdefault(sub.__name__, sub)
            todo.append(sub)
    return found


def _json_section(ds: dict[str, Any], loc: list[str]) -> str | None:
    """The top-level JSON section in which the error location ``loc`` (relative to that section) lies."""
    for key, value in ds.items():
        node: Any = value
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and loc and loc[-1] in node:
            return key
    return None


def _json_field(message: str, source: str) -> str:
    """Which JSON field a DeepSpeed-config message is about (for the problem's ``field``), else the file."""
    match = re.match(r"([A-Za-z_][\w.]*)=", message.removeprefix(f"{source}: "))
    return f"{match[1]} in {source}" if match else source


# ------------------------------------------------------------------------------------------------ data
def _check_train_data(cfg: Config, batch: BatchSizes | None) -> list[Problem]:
    """The shards (data/checks.py); in epoch mode, when their sample counts are known without reading them
    (manifests), one epoch holds at least one optimizer step and the warm-up fits the run."""
    from .data.checks import check_shards, local_sample_count

    data, sched = cfg.data, cfg.schedule
    problems, sources = check_shards(data.train_data, caption_key=data.caption_key)
    total = None if sources is None or data.mode != "epoch" or batch is None else local_sample_count(sources)
    if total is None:
        return problems  # counting would read tar headers (slow for big datasets); the loader checks later
    steps_per_epoch = batch.steps_per_epoch(total // batch.samples_per_micro_step)
    if steps_per_epoch < 1:
        problems.append(
            Problem.of(
                "data.train_data",
                data.train_data,
                f"holds {total} samples, less than one optimizer step ({_batch_text(batch)})",
                "add data, or lower optim.micro_batch_size / optim.grad_accum_steps",
                machine=True,
            )
        )
    elif sched.epochs is not None and sched.warmup_steps >= sched.epochs * steps_per_epoch:
        total_steps = sched.epochs * steps_per_epoch
        problems.append(
            Problem.of(
                "schedule.warmup_steps",
                sched.warmup_steps,
                f"is as long as or longer than the whole run: schedule.epochs={sched.epochs} × "
                f"{steps_per_epoch} steps per epoch ({total} samples) = {total_steps} steps",
                f"use schedule.warmup_steps < {total_steps}, or train longer",
                machine=True,
            )
        )
    return problems


def _check_eval(cfg: Config) -> list[Problem]:
    """The zero-shot data, its class names and templates (evaluate/checks.py)."""
    from .evaluate.checks import check_zeroshot_inputs

    ev = cfg.eval
    return check_zeroshot_inputs(ev.zeroshot_data, ev.classnames, ev.templates) if ev.zeroshot_data else []


# ------------------------------------------------------------------------------------------------ run folder
def _check_resume(cfg: Config) -> list[Problem]:
    """A resume path (not ``latest``) must be one complete checkpoint folder."""
    resume = cfg.checkpoint.resume
    if not resume or resume == "latest":
        return []
    from .trainer.checkpoint import COMPLETE, TAG_RE

    path = Path(resume)
    if (path / COMPLETE).is_file():
        return []
    complete = []
    if path.is_dir():
        complete = sorted(
            (p.name for p in path.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()),
            key=lambda t: int(TAG_RE.match(t).group(1)),  # type: ignore[union-attr]
        )
    if complete:
        problem = "is a checkpoints folder, not one checkpoint"
        fix = f"use {str(path / complete[-1])!r} (its newest complete checkpoint), or 'latest'"
    elif path.is_dir() and TAG_RE.match(path.name):
        problem = f"has no {COMPLETE} marker: this checkpoint was never finished (a crash while saving?)"
        fix = "use an earlier complete step_NNNNNNNN folder, or 'latest' (the newest complete one)"
    elif path.is_dir():
        problem = f"is not a checkpoint folder (no {COMPLETE} marker, no complete step_NNNNNNNN folder inside)"
        fix = "give a complete <run>/checkpoints/step_NNNNNNNN folder, or 'latest'"
    else:
        problem = "no such checkpoint folder"
        fix = "give a complete <run>/checkpoints/step_NNNNNNNN folder, 'latest', or null to start from scratch"
    return [Problem.of("checkpoint.resume", resume, problem, fix, machine=True)]


def _check_output_dir(cfg: Config) -> list[Problem]:
    """The run folder ``<output_dir>/<name>`` can be created and written (checked with the file system's own
    answers: no probe file is written, since every rank runs this)."""
    out = Path(cfg.run.output_dir)
    run_dir = out / cfg.run.name
    for path, field, value in ((out, "run.output_dir", cfg.run.output_dir), (run_dir, "run.name", cfg.run.name)):
        if path.exists() and not path.is_dir():
            return [
                Problem.of(
                    field,
                    value,
                    f"{str(path)!r} is a file, not a folder",
                    "choose another run.output_dir / run.name, or move the file away",
                    machine=True,
                )
            ]
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [
            Problem.of(
                "run.output_dir",
                cfg.run.output_dir,
                f"{str(existing)!r} on its path is a file",
                "choose a run.output_dir under a folder",
                machine=True,
            )
        ]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [
            Problem.of(
                "run.output_dir",
                cfg.run.output_dir,
                f"{str(existing)!r} is not writable by this user",
                "choose a run.output_dir you can write",
                machine=True,
            )
        ]
    return []


def _check_precision(cfg: Config) -> list[Problem]:
    """The precision is supported by the device DeepSpeed will use (it refuses inside deepspeed.initialize,
    after the model is built). Only checked without CUDA: asking CUDA for device capabilities before the rank
    has chosen its device would open a context on GPU 0 in every rank."""
    precision = cfg.run.precision
    if precision == "fp32":
        return []
    import torch

    if torch.cuda.is_available():
        return []
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = accelerator.is_fp16_supported() if precision == "fp16" else accelerator.is_bf16_supported()
    if supported:
        return []
    other = "bf16" if precision == "fp16" else "fp32"
    return [
        Problem.of(
            "run.precision",
            precision,
            f"DeepSpeed's {accelerator.device_name()!r} accelerator on this machine does not support {precision}",
            f"use run.precision={other} (or fp32) here, or run on a device that supports {precision}",
            machine=True,
        )
    ]


def _check_fused_optimizer(cfg: Config, ds_json: dict[str, Any], source: str) -> list[Problem]:
    """``optim.fused: true`` asks for torch's fused AdamW, which a ZeRO optimizer offload to the CPU replaces by
    DeepSpeed's CPU Adam."""
    from .ds_config import optimizer_offloaded

    if cfg.optim.fused is not True or not optimizer_offloaded(ds_json):
        return []
    return [
        Problem.of(
            "optim.fused",
            True,
            f"{source} offloads the optimizer to the CPU (zero_optimization.offload_optimizer.device=cpu), "
            "where DeepSpeed steps its own CPU Adam, not torch.optim.AdamW",
            "set optim.fused to auto or false, or drop offload_optimizer from the DeepSpeed JSON",
        )
    ]


# ------------------------------------------------------------------------------------------------ entry points
def preflight(
    cfg: Config, ds_json: dict[str, Any], world_size: int, *, ds_source: str, ranks_per_node: int | None = None
) -> tuple[ResolvedRun | None, list[Problem]]:
    """Every problem the pre-flight finds, in config order, and the resolved run (batch sizes, DeepSpeed config)
    when the batch and the JSON resolve; the run may start when the list is empty. ``ranks_per_node``: the
    launcher's ranks per node, to name the nodes of a multi-node world."""
    batch, problems = _check_batch(cfg, world_size, ranks_per_node)
    ds, ds_problems = _check_deepspeed(cfg, ds_json, batch, ds_source)
    problems.extend(ds_problems)
    checks: list[Callable[[], list[Problem]]] = [
        lambda: _check_precision(cfg),
        lambda: _check_fused_optimizer(cfg, ds_json, ds_source),
        # With model.init_from the towers are derived from the checkpoint (its converted text folder may not exist
        # yet): check_init_from checks the source, the contradictions and the derived image tower instead.
        lambda: check_image_tower(cfg.model.image) if not cfg.model.init_from else check_init_from(cfg.model),
        lambda: check_text_tower(cfg.model.text) if not cfg.model.init_from else [],
        lambda: check_locks(cfg.model),
        lambda: _check_train_data(cfg, batch),
        lambda: _check_eval(cfg),
        lambda: _check_resume(cfg),
        lambda: _check_output_dir(cfg),
    ]
    for check in checks:
        problems.extend(check())
    resolved = ResolvedRun(batch, ds, ds_source) if batch is not None and ds is not None else None
    return resolved, problems


def run_preflight(
    cfg: Config, ds_json: dict[str, Any], world_size: int, *, ds_source: str, ranks_per_node: int | None = None
) -> ResolvedRun:
    """The resolved run, or one :class:`ConfigError` listing every problem of this run.

    Needs no process group, builds no model and decodes no data; call it before anything heavy, on every rank
    (each rank checks the files it will read itself)."""
    resolved, problems = preflight(cfg, ds_json, world_size, ds_source=ds_source, ranks_per_node=ranks_per_node)
    if problems:
        raise ConfigError(format_problems(problems))
    assert resolved is not None  # no problem: the batch and the JSON resolved
    return resolved
