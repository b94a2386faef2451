"""The dry run: what a configuration will build, computed without a process group or real allocations.

``train.py --dry-run`` (torchtitan's habit): the pre-flight, then the model built on the meta device, then a report
of everything a real run would use (batch sizes, DeepSpeed config, parameter counts, FLOPs, the loss's memory).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .config import Config, ModelConfig
from .data.plan import default_streams
from .data.redact import redact
from .preflight import preflight
from .problems import ConfigError, format_problems
from .resolved import ResolvedRun
from .trainer.durable import format_bytes

__all__ = ["DryRunReport", "dry_run"]


@dataclass
class DryRunReport:
    """Everything the dry run reports."""

    run: ResolvedRun
    param_counts: dict[str, int]
    image_model: str
    text_model: str
    loss_memory_bytes: int | None
    loss_memory_note: str
    flops_per_sample: int | None = None
    notes: list[str] = field(default_factory=list)
    param_groups: list[dict] = field(default_factory=list)
    """The optimizer's parameter groups as rows: part, layers, lr, weight decay, parameter count
    (:func:`rankclip_ds.trainer.optim.param_group_table`)."""
    model: ModelConfig | None = None
    """The model section that was built: with ``model.init_from``, the one derived from the CLIP checkpoint."""

    def format(self, cfg: Config) -> str:
        pc, run = self.param_counts, self.run
        if self.model is not None:
            cfg = dataclasses.replace(cfg, model=self.model)
        lines = [
            "RankCLIP-DS plan (dry run: no process group, model built on the meta device)",
            f"  world size        {run.world_size}",
            f"  batch             {run.batch.describe()}",
            f"  DeepSpeed         ZeRO stage {run.zero_stage}, precision {cfg.run.precision}, "
            f"gradient_clipping {run.deepspeed['gradient_clipping']}",
            f"  image tower       {self.image_model}: {pc['image_tower'] / 1e6:.2f} M parameters"
            + _locked(pc["image_tower"], pc.get("image_tower_trainable", pc["image_tower"])),
            f"  text tower        {self.text_model}: {pc['text_tower'] / 1e6:.2f} M parameters"
            + _locked(pc["text_tower"], pc.get("text_tower_trainable", pc["text_tower"])),
            f"  projections       {pc['projections'] / 1e6:.3f} M parameters (embed dim {cfg.model.embed_dim})",
            f"  total             {pc['total'] / 1e6:.2f} M parameters, {pc.get('trainable', pc['total']) / 1e6:.2f} M "
            "trainable",
        ]
        if self.flops_per_sample is not None:
            lines.append(
                f"  model FLOPs       {self.flops_per_sample / 1e9:.2f} GFLOP per sample (forward + backward of the "
                f"towers and projections at {cfg.model.image.image_size} px, {cfg.model.text.max_length} tokens)"
            )
        lines.append(f"  GPU speed         {_speed_settings(cfg)}")
        if cfg.loss.ranking:
            loss = (
                f"RankCLIP ({cfg.loss.impl}, comm {cfg.loss.comm}, λ_cross {cfg.loss.lambda_cross}, "
                f"λ_in {cfg.loss.lambda_in}, top_k {cfg.loss.top_k}, w_max {cfg.loss.rank_weight_max})"
            )
        else:
            loss = "plain CLIP (ranking terms off)"
        lines.append(f"  loss              {loss}")
        lines.append(
            f"  loss list         N = {run.batch.loss_list_length}, local rows b = {run.batch.loss_local_rows}"
        )
        mem = format_bytes(self.loss_memory_bytes) if self.loss_memory_bytes is not None else "n/a"
        lines.append(f"  loss memory/rank  {mem} ({self.loss_memory_note})")
        sched = cfg.schedule
        length = f"{sched.total_steps} steps" if sched.total_steps is not None else f"{sched.epochs} epochs"
        lines.append(
            f"  schedule          {length}, warm-up {sched.warmup_steps}, AdamW lr {cfg.optim.lr} "
            f"betas {tuple(cfg.optim.betas)} wd {cfg.optim.weight_decay}, cosine to {sched.min_lr_ratio}×lr"
        )
        lines.extend(_group_lines(self.param_groups))
        lines.append(f"  data              {redact(cfg.data.train_data)} ({cfg.data.mode} mode)")
        batch = run.batch
        streams = default_streams(batch.world_size, cfg.data.num_workers, batch.global_batch_size, cfg.data.streams)
        lines.append(
            f"  data order        {streams} streams{'' if cfg.data.streams else ' (one per rank and worker)'}, "
            f"{batch.global_batch_size // streams}+ samples each per step; a resume keeps the checkpoint's"
        )
        lines.append(f"  run folder        {cfg.run.output_dir}/{cfg.run.name}")
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.append("DeepSpeed config (resolved):")
        lines.append(json.dumps(run.deepspeed, indent=2, sort_keys=True))
        return "\n".join(lines)


def _locked(total: int, trainable: int) -> str:
    if trainable == total:
        return ""
    return f" (locked: {trainable / 1e6:.2f} M trainable)" if trainable else " (locked)"


def _group_lines(rows: list[dict]) -> list[str]:
    """The parameter-group table: one row per part, learning rate and weight decay (layer 0: embeddings,
    1..depth: blocks, depth+1: after the blocks)."""
    if not rows:
        return []
    lines = ["  parameter groups  part   layers (of depth)   lr (peak)    weight decay  parameters"]
    for r in rows:
        layers = f"{r['layers']} (of {r['depth']})" if r["part"] != "proj" else "-"
        lines.append(
            f"                    {r['part']:<6} {layers:<19} {r['lr']:<12.4g} {r['weight_decay']:<13g} {r['params']:,}"
        )
    return lines


def _speed_settings(cfg: Config) -> str:
    """The GPU speed switches as a CUDA run applies them (on the CPU, fused AdamW follows optim.fused and the
    rest is left alone)."""
    fused = {"auto": "auto (fused on CUDA)", True: "fused", False: "not fused"}[cfg.optim.fused]
    image_attn = "sdpa" if cfg.model.image.fused_attn else "eager"
    return (
        f"AdamW {fused}, model.compile {'on' if cfg.model.compile else 'off'}, attention image {image_attn} / text "
        f"{cfg.model.text.attn_implementation}, TF32 {'on' if cfg.run.tf32 else 'off'}, pinned memory "
        f"{'on' if cfg.data.pin_memory else 'off'}"
    )


def _loss_memory(cfg: Config, run: ResolvedRun) -> tuple[int, str]:
    import torch

    from .losses import default_chunk_size, memory_model

    n, world, b = run.batch.loss_list_length, run.world_size, run.batch.loss_local_rows
    chunk = cfg.loss.chunk_size or default_chunk_size(n, b)
    dtype = torch.float32  # the loss computes in float32 whatever the training precision
    impl = cfg.loss.impl
    est = memory_model(n, world, cfg.model.embed_dim, chunk, top_k=cfg.loss.top_k, dtype=dtype, impl=impl)
    return est, f"memory_model: impl {impl}, N {n}, P {world}, D {cfg.model.embed_dim}, chunk {chunk}"


def dry_run(cfg: Config, ds_json: dict[str, Any], world_size: int, *, source: str = "DeepSpeed JSON") -> DryRunReport:
    """Run the pre-flight, then build the model on the meta device and report.

    Configuration problems fail (all of them in one :class:`ConfigError`, before the model is built). Problems of
    this machine (missing shards, weights, checkpoint; an unwritable run folder; an unsupported precision) become
    notes: a dry run may plan on a machine that is not the one that trains."""
    from .model import build_model
    from .model.clip_init import resolve_init_from
    from .model.flops import train_flops_per_sample
    from .model.hub import fetch_model_files
    from .trainer.optim import param_group_table, param_rules_from_config

    run, problems = preflight(cfg, ds_json, world_size, ds_source=source)
    fatal = [p for p in problems if not p.machine]
    if fatal:
        raise ConfigError(format_problems(fatal))
    assert run is not None  # the batch and the JSON resolved: their problems are never machine problems
    fetched = fetch_model_files(cfg.model, weights=False)  # online: a text hub id's config and tokenizer, no weights
    if cfg.model.init_from:
        # The towers come from the CLIP checkpoint: read from this machine (a local file or folder, or the hub
        # cache) and converted once into the cache the run reuses; never downloaded by a dry run.
        cfg = dataclasses.replace(cfg, model=resolve_init_from(cfg.model, local_files_only=True))
    model = build_model(cfg.model, device="meta")
    mem, note = _loss_memory(cfg, run)
    notes = [f"not ready on this machine (training here would refuse to start): {p.message}" for p in problems]
    notes += [f"fetched {f} (config and tokenizer: the architecture; training fetches the weights)" for f in fetched]
    try:
        flops: int | None = train_flops_per_sample(cfg.model)
    except Exception as exc:  # the count is informative; the plan must still print
        flops = None
        notes.append(f"model FLOPs could not be counted ({type(exc).__name__}: {exc}); perf/mfu would not be logged")
    if not cfg.optim.grad_cache and run.batch.grad_accum_steps > 1 and cfg.loss.ranking:
        notes.append(
            "gradient accumulation without optim.grad_cache: each micro-step's ranking list is only "
            f"micro × world = {run.batch.loss_list_length} items; enable optim.grad_cache for the whole global batch"
        )
    counts = {name: p.numel() for name, p in model.named_parameters()}
    groups = param_group_table(param_rules_from_config(model, cfg.optim), counts)
    return DryRunReport(
        run=run,
        param_groups=groups,
        param_counts=model.param_counts(),
        image_model=cfg.model.image.name,
        text_model=cfg.model.text.name_or_path,
        model=cfg.model,
        loss_memory_bytes=mem,
        loss_memory_note=note,
        flops_per_sample=flops,
        notes=notes,
    )
