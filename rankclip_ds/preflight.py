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
mounted, so :mod:`rankclip_ds.plan` reports those as notes, while training refuses to start.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import BatchPlan, Config, resolve_batch
from .problems import ConfigError, Problem, format_problems, problem_message, suggest

__all__ = ["find_problems", "run_preflight"]

# Files a Hugging Face folder needs for the tokenizer (any one of them) and for pretrained weights (any one).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ------------------------------------------------------------------------------------------------ batch
def _batch_text(plan: BatchPlan) -> str:
    return (
        f"global batch {plan.global_batch_size} = micro {plan.micro_batch_size} × accum {plan.grad_accum_steps} × "
        f"world {plan.world_size}"
    )


def _check_batch(cfg: Config, world_size: int) -> tuple[BatchPlan | None, list[Problem]]:
    """Batch arithmetic for this world size, and the checks the config alone could not make because the micro
    batch is derived from the global batch only once the world size is known."""
    try:
        plan = resolve_batch(cfg.optim, world_size)
    except ConfigError as exc:
        return None, [Problem("optim.global_batch_size", str(exc))]
    problems = []
    # Config.__post_init__ checks chunk_size against an explicit micro batch; a derived one is checked here.
    rows = plan.micro_batch_size * (plan.grad_accum_steps if cfg.optim.grad_cache else 1)
    if cfg.optim.micro_batch_size is None and cfg.loss.chunk_size is not None and cfg.loss.chunk_size > rows:
        problems.append(
            Problem.of(
                "loss.chunk_size",
                cfg.loss.chunk_size,
                f"is larger than the loss's local batch ({rows} rows: the micro batch derived from "
                f"optim.global_batch_size={plan.global_batch_size} over {world_size} ranks"
                + (" × grad_accum_steps with grad_cache)" if cfg.optim.grad_cache else ")"),
                f"use loss.chunk_size <= {rows}, or null for the default",
            )
        )
    data = cfg.data
    # A virtual epoch shorter than one step gives the loader no batch (it refuses only once it is built).
    if (
        data.mode == "resampled"
        and data.samples_per_epoch is not None
        and data.samples_per_epoch < plan.global_batch_size
    ):
        problems.append(
            Problem.of(
                "data.samples_per_epoch",
                data.samples_per_epoch,
                f"is less than one optimizer step ({_batch_text(plan)})",
                f"use data.samples_per_epoch >= {plan.global_batch_size}, or a smaller batch",
            )
        )
    return plan, problems


# ------------------------------------------------------------------------------------------------ DeepSpeed
def _check_deepspeed(
    cfg: Config, ds_json: dict[str, Any], world_size: int, plan: BatchPlan | None, source: str
) -> list[Problem]:
    """The JSON, reconciled with the config and validated by DeepSpeed itself (no process group needed)."""
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
    probe_cfg, probe_world = cfg, world_size
    if plan is None:
        # The batch does not resolve (reported above), so the JSON's batch fields cannot be compared; check the
        # rest of the JSON against a one-rank probe batch instead of hiding its mistakes until the batch is fixed.
        ds = {k: v for k, v in ds.items() if k not in BATCH_FIELDS}
        optim = dataclasses.replace(cfg.optim, micro_batch_size=1, grad_accum_steps=1, global_batch_size=None)
        probe_cfg = dataclasses.replace(cfg, optim=optim, loss=dataclasses.replace(cfg.loss, chunk_size=None))
        probe_world = 1
    try:
        resolved = build_deepspeed_config(ds, probe_cfg, probe_world, source=source)
    except ConfigError as exc:
        problems.append(Problem(_json_field(str(exc), source), str(exc)))
        return problems
    try:
        validate_with_deepspeed(resolved, source=source)
    except ConfigError as exc:
        problems.extend(_deepspeed_rejections(exc, resolved, source))
    return problems


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


# ------------------------------------------------------------------------------------------------ model
def _check_image_tower(cfg: Config) -> list[Problem]:
    """The timm architecture (and pretrained tag) exists, and a weights file, if named, is there."""
    import timm

    image = cfg.model.image
    problems = []
    arch, _, tag = image.name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        if not close:
            close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        problems.append(
            Problem(
                "model.image.name",
                f"model.image.name={image.name!r} is not a timm model. Fix: pick one from timm.list_models()"
                + (f"; did you mean {', '.join(close)}?" if close else ""),
            )
        )
    elif tag:
        tags = [name.partition(".")[2] for name in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            problems.append(
                Problem.of(
                    "model.image.name",
                    image.name,
                    f"timm knows no tag {tag!r} for {arch!r} (the tag selects its preprocessing config; "
                    "nothing is downloaded)",
                    f"use the bare name {arch!r}"
                    + (f" or one of {', '.join(f'{arch}.{t}' for t in tags[:4])}" if tags else ""),
                )
            )
    if image.weights and not Path(image.weights).is_file():
        problems.append(
            Problem.of(
                "model.image.weights",
                image.weights,
                "no such file",
                "give a local .safetensors/.pth/.bin file, or null to train the image tower from scratch",
                machine=True,
            )
        )
    return problems


def _check_text_tower(cfg: Config) -> list[Problem]:
    """The text model resolves offline, its config takes the overrides, and the tokenizer (and the weights,
    when pretrained) are in its folder. Reads config.json only; nothing is built."""
    from .model.towers import BUILTIN_TEXT_MODELS, ModelConfigError, resolve_text_path

    text = cfg.model.text
    field = "model.text.name_or_path"
    if text.name_or_path not in BUILTIN_TEXT_MODELS:
        path = Path(text.name_or_path).expanduser()
        if not path.exists():
            return [
                Problem.of(
                    field,
                    text.name_or_path,
                    "no such folder on this machine (Hugging Face hub names are never downloaded)",
                    "save the model and its tokenizer there first (save_pretrained), or use "
                    + " / ".join(BUILTIN_TEXT_MODELS),
                )
            ]
    try:
        folder = Path(resolve_text_path(text.name_or_path))
    except ModelConfigError as exc:
        return [Problem(field, str(exc))]

    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # any failure to read config.json: JSON, unknown model_type, ...
        detail = " ".join(str(exc).split())
        problem = f"its config.json cannot be read ({detail})"
        return [Problem.of(field, text.name_or_path, problem, "re-save the model with save_pretrained")]
    problems = []
    known = sorted(hf_config.to_dict())
    for key, value in text.overrides.items():
        if not hasattr(hf_config, key):
            problems.append(
                Problem.of(
                    f"model.text.overrides.{key}",
                    value,
                    f"{type(hf_config).__name__} has no field {key!r}",
                    "use a field of its config.json" + (suggest(key, known) or ", e.g. num_hidden_layers"),
                )
            )
        else:
            setattr(hf_config, key, value)
    max_positions = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and text.max_length > max_positions:
        problems.append(
            Problem.of(
                "model.text.max_length",
                text.max_length,
                f"exceeds the text model's max_position_embeddings={max_positions}: longer token sequences "
                "have no position embedding",
                f"use model.text.max_length <= {max_positions}",
            )
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        problems.append(
            Problem.of(
                field,
                text.name_or_path,
                f"the folder {str(folder)!r} has no tokenizer file",
                "save the tokenizer there too (tokenizer.save_pretrained)",
                machine=True,
            )
        )
    if text.pretrained and not any((folder / name).is_file() for name in _WEIGHT_FILES):
        problems.append(
            Problem.of(
                "model.text.pretrained",
                True,
                f"the folder {str(folder)!r} has no weights ({' / '.join(_WEIGHT_FILES[::2])})",
                "save the weights there (save_pretrained), or set model.text.pretrained=false to train the "
                "text tower from scratch",
                machine=True,
            )
        )
    return problems


# ------------------------------------------------------------------------------------------------ data
def _check_train_data(cfg: Config, plan: BatchPlan | None) -> list[Problem]:
    """The shard spec parses and matches files; in epoch mode, when the shards' sample counts are known without
    reading them (manifests), one epoch holds at least one optimizer step and the warm-up fits the run."""
    from .data.decode import parse_caption_key
    from .data.records import is_local
    from .data.sources import check_sources_exist, parse_spec, shard_count

    data = cfg.data
    problems = []
    try:
        parse_caption_key(data.caption_key)
    except ValueError:
        problems.append(
            Problem.of(
                "data.caption_key",
                data.caption_key,
                "is neither a member extension (such as 'txt') nor 'json:FIELD'",
                "use 'txt', or 'json:FIELD' to read the caption from a field of the .json member",
            )
        )
    try:
        sources = parse_spec(data.train_data)
    except ValueError as exc:
        fix = "write brace expressions joined with '::', each optionally '@WEIGHT' (see docs/data.md)"
        problems.append(Problem.of("data.train_data", data.train_data, str(exc), fix))
        return problems
    try:
        check_sources_exist(sources)
    except FileNotFoundError as exc:
        problems.append(
            Problem.of(
                "data.train_data",
                data.train_data,
                str(exc).split("; ", 1)[0],
                "check the path and the brace range (e.g. '/data/cc3m/{00000..00331}.tar'), or write the shards first",
                machine=True,
            )
        )
        return problems
    if data.mode != "epoch" or plan is None:
        return problems
    cache: dict = {}
    counts = [shard_count(u, cache=cache, scan=False) for s in sources for u in s.urls if is_local(u)]
    remote = any(not is_local(u) for s in sources for u in s.urls)
    if remote or any(c is None for c in counts):
        return problems  # counting would read tar headers (slow for big datasets); the loader checks later
    total = sum(c for c in counts if c is not None)
    per_step = plan.world_size * plan.micro_batch_size
    steps_per_epoch = total // per_step // plan.grad_accum_steps
    if steps_per_epoch < 1:
        problems.append(
            Problem.of(
                "data.train_data",
                data.train_data,
                f"holds {total} samples, less than one optimizer step ({_batch_text(plan)})",
                "add data, or lower optim.micro_batch_size / optim.grad_accum_steps",
                machine=True,
            )
        )
    elif cfg.schedule.epochs is not None:
        total_steps = cfg.schedule.epochs * steps_per_epoch
        if cfg.schedule.warmup_steps >= total_steps:
            problems.append(
                Problem.of(
                    "schedule.warmup_steps",
                    cfg.schedule.warmup_steps,
                    f"is as long as or longer than the whole run: schedule.epochs={cfg.schedule.epochs} × "
                    f"{steps_per_epoch} steps per epoch ({total} samples) = {total_steps} steps",
                    f"use schedule.warmup_steps < {total_steps}, or train longer",
                    machine=True,
                )
            )
    return problems


def _check_eval(cfg: Config) -> list[Problem]:
    """The zero-shot data, its class names and the templates exist: otherwise the run fails at its first
    evaluation, possibly hours in."""
    ev = cfg.eval
    if not ev.zeroshot_data:
        return []
    from .evaluate.datasets import resolve_classnames
    from .evaluate.templates import resolve_templates

    problems = []
    try:
        names = resolve_classnames(ev.zeroshot_data, ev.classnames)
    except (OSError, ValueError) as exc:
        if ev.classnames and "classnames file" in str(exc):
            field, value = "eval.classnames", ev.classnames
            fix = "write that file (one class name per line, line i = label i), or set eval.classnames=null"
        else:
            field, value = "eval.zeroshot_data", ev.zeroshot_data
            fix = (
                "point it at labelled shards (.cls) or an ImageFolder directory, with a classnames file (one name "
                "per line, line i = label i), or set eval.zeroshot_data=null"
            )
        problems.append(
            Problem.of(
                field,
                value,
                str(exc).split("; ", 1)[0].split(". Fix:", 1)[0],
                fix,
                machine=True,
            )
        )
    else:
        if names is None:
            problems.append(
                Problem.of(
                    "eval.classnames",
                    ev.classnames,
                    f"zero-shot classification needs class names, and there is no classnames.txt beside the "
                    f"shards of eval.zeroshot_data={ev.zeroshot_data!r}",
                    "set eval.classnames=FILE (one name per line, line i = label i)",
                    machine=True,
                )
            )
    try:
        resolve_templates(ev.templates)
    except (OSError, ValueError) as exc:
        problems.append(
            Problem.of(
                "eval.templates",
                ev.templates,
                str(exc).split(". Fix:", 1)[0],
                "use 'openai', one template with {} (e.g. 'a photo of a {}.'), or an existing file",
                machine=True,
            )
        )
    return problems


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
def find_problems(cfg: Config, ds_json: dict[str, Any], world_size: int, *, ds_source: str) -> list[Problem]:
    """Every problem the pre-flight finds, in config order; empty when the run may start."""
    plan, problems = _check_batch(cfg, world_size)
    checks: list[Callable[[], list[Problem]]] = [
        lambda: _check_deepspeed(cfg, ds_json, world_size, plan, ds_source),
        lambda: _check_precision(cfg),
        lambda: _check_fused_optimizer(cfg, ds_json, ds_source),
        lambda: _check_image_tower(cfg),
        lambda: _check_text_tower(cfg),
        lambda: _check_train_data(cfg, plan),
        lambda: _check_eval(cfg),
        lambda: _check_resume(cfg),
        lambda: _check_output_dir(cfg),
    ]
    for check in checks:
        problems.extend(check())
    return problems


def run_preflight(cfg: Config, ds_json: dict[str, Any], world_size: int, *, ds_source: str) -> None:
    """Raise one :class:`ConfigError` listing every problem of this run, or return silently.

    Needs no process group, builds no model and decodes no data; call it before anything heavy, on every rank
    (each rank checks the files it will read itself)."""
    problems = find_problems(cfg, ds_json, world_size, ds_source=ds_source)
    if problems:
        raise ConfigError(format_problems(problems))
