"""DeepSpeed's universal checkpoint form: how a checkpoint written by one world size (or ZeRO stage 1/2) is loaded
by another. Rank 0 converts it once, in this process (``ds_to_universal``), into ``<tag>/universal``, kept for later
resumes and pruned with its checkpoint; ``tools/convert_checkpoint.py`` does it ahead of time."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from .checkpoint import COMPLETE, UNIVERSAL, LoadTarget, barrier_if_distributed, read_meta
from .durable import describe, fsync_tree, fsync_write
from .errors import TrainingError

__all__ = ["convert_to_universal", "ensure_universal", "repair_zero3_universal_load"]

log = logging.getLogger("rankclip_ds.trainer.checkpoint")


def ensure_universal(target: LoadTarget, rank: int, *, poll_s: float = 2.0, max_wait_s: float = 12 * 3600) -> None:
    """Rank 0 converts the checkpoint into DeepSpeed's universal form once (``<tag>/universal``, kept for
    later resumes and pruned with its checkpoint); every rank calls this. The other ranks wait by watching
    for the result on disk, not in a collective: the conversion of a large model may outlast
    ``dist.timeout_minutes`` (``tools/convert_checkpoint.py`` does it ahead of time)."""
    out = target.path / UNIVERSAL
    failed = target.path / f"{UNIVERSAL}.FAILED"
    if rank == 0:
        with contextlib.suppress(FileNotFoundError):
            failed.unlink()  # left by an earlier attempt
    barrier_if_distributed()  # no rank reads a stale FAILED marker
    if rank == 0:
        if not (out / COMPLETE).is_file():
            try:
                convert_to_universal(target.path)
            except Exception as exc:
                with contextlib.suppress(OSError):
                    fsync_write(failed, describe(exc))
                raise _conversion_error(target, describe(exc)) from exc
        return
    start = last_note = time.monotonic()
    while not (out / COMPLETE).is_file():
        if failed.is_file():
            raise _conversion_error(target, failed.read_text().strip())
        now = time.monotonic()
        if now - start > max_wait_s:
            raise _conversion_error(target, f"rank 0 did not finish within {max_wait_s / 3600:.0f} h")
        if now - last_note > 300:
            log.info("rank %d: waiting for rank 0 to convert %s (%.0f min so far)", rank, target.path,
                     (now - start) / 60)  # fmt: skip
            last_note = now
        time.sleep(poll_s)


def _conversion_error(target: LoadTarget, why: str) -> TrainingError:
    return TrainingError(
        f"converting checkpoint {target.path} to DeepSpeed's universal form failed: {why}. Resume with the world "
        f"size and ZeRO stage it was written with (world_size={target.meta.get('world_size')}, ZeRO stage "
        f"{target.meta.get('zero_stage')}), or convert it first with tools/convert_checkpoint.py"
    )


def convert_to_universal(path: Path) -> Path:
    """DeepSpeed's ``ds_to_universal`` in this process: ``<path>/universal``, written to a temporary folder and
    renamed when complete. Returns the universal folder."""
    out = path / UNIVERSAL
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log.info("converting checkpoint %s to DeepSpeed's universal form (world size or ZeRO stage changed)", path)
    args = argparse.Namespace(
        input_folder=str(path),
        output_folder=str(partial),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with contextlib.redirect_stdout(_LogWriter()):
        ds_to_universal(args)
    with contextlib.suppress(FileNotFoundError):
        (path / "latest_universal").unlink()  # written by the converter next to its output; we do not use it
    fsync_tree(partial)
    fsync_write(partial / COMPLETE, json.dumps(read_meta(path), sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    log.info("universal checkpoint written: %s", out)
    return out


def repair_zero3_universal_load(engine, target: LoadTarget) -> None:
    """After a ZeRO-3 load of the universal form, undo two things DeepSpeed 0.19.8's loader
    (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) gets wrong; ZeRO-1/2's loader does neither.

    * It hands every ZeRO-3 sub-group's Adam state the same ``step`` tensor. ZeRO-3 steps its sub-groups one at a
      time and PyTorch's AdamW increments ``step`` in place, so with two sub-groups (CLIP's decay / no-decay groups)
      the count ran ahead by one per sub-group and step: wrong bias corrections. Each state gets its own copy.
    * It copies the settings of the checkpoint's first optimizer group (``lr``, ``weight_decay``, ``initial_lr``,
      ...) into every group: the no-decay group (biases, norms, the logit scale) was decayed like the weights and,
      with per-part rates, every group stepped at the first group's rate until the scheduler's next step. Each
      group gets its own saved settings back, from the same file (``<universal>/zero/optimizer_state.pt``).

    The fp32 master partitions and Adam moments are restored exactly by DeepSpeed and are not touched
    (``tools/universal_resume_diff.py`` measures all of this)."""
    if not target.universal or engine.zero_optimization_stage() != 3:
        return
    optimizer = engine.optimizer.optimizer  # the torch optimizer stepping ZeRO-3's fp32 partitions
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    path = target.path / UNIVERSAL / "zero" / "optimizer_state.pt"
    # DeepSpeed's own file (loss-scaler objects included), written by this run's conversion: not weights only.
    saved = torch.load(path, map_location="cpu", weights_only=False)["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise TrainingError(
            f"{path} holds {len(saved)} optimizer groups, this run has {len(optimizer.param_groups)}: the "
            f"optimizer's parameter groups changed (optim.*_lr, *_layer_decay, weight_decay 0 vs > 0); resume with "
            f"the settings the checkpoint was written with"
        )
    for group, settings in zip(optimizer.param_groups, saved, strict=True):
        group.update({k: v for k, v in settings.items() if k != "params"})


class _LogWriter:
    """File-like sink that sends the converter's prints to the log at DEBUG level."""

    def write(self, text: str) -> int:
        if text.strip():
            log.debug("ds_to_universal: %s", text.rstrip())
        return len(text)

    def flush(self) -> None:
        pass
