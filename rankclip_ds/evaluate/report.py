"""Writing results: a JSON file per evaluation, ``<run>/eval.jsonl`` lines, TensorBoard scalars, a console summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["EVAL_LOG", "append_jsonl", "format_summary", "log_eval", "scalar_summary", "write_json"]

EVAL_LOG = "eval.jsonl"
_NOT_SCALARS = ("num_", "best_")


def write_json(result: dict, path: str | Path) -> Path:
    """Write ``result`` as indented JSON to ``path`` atomically (a temporary file renamed into place)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


def append_jsonl(record: dict, path: str | Path) -> Path:
    """Append ``record`` as one JSON line to ``path`` (created with its folder if needed)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=False, allow_nan=False)
    with p.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
    return p


def scalar_summary(result: dict, prefix: str | None = None) -> dict[str, float]:
    """The headline numbers of a result (accuracies, recalls) as ``{"PREFIX/name": value}``, ready for TensorBoard.

    Counts (``num_*``), lists, dicts and strings are left out. ``prefix`` defaults to ``eval/<task>``.
    """
    prefix = prefix if prefix is not None else f"eval/{result.get('task', 'eval')}"
    out = {}
    for name, value in result.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or name.startswith(_NOT_SCALARS):
            continue
        if math.isfinite(value):
            out[f"{prefix}/{name}" if prefix else name] = float(value)
    return out


# Results that are not fractions of queries (distances, log-means, correlations in [-1, 1]): printed as they are.
_RAW_VALUES = ("modality_gap", "alignment", "uniformity", "spearman", "kendall")


def _is_fraction(name: str) -> bool:
    return not any(raw in name for raw in _RAW_VALUES)


def format_summary(result: dict) -> str:
    """A few readable lines: the headline numbers (fractions in percent, distances and correlations as they are),
    the counts, skipped input."""
    task = result.get("task", "eval")
    scalars = scalar_summary(result, prefix="")
    parts = [f"{name} {100 * v:.2f}%" if _is_fraction(name) else f"{name} {v:.4g}" for name, v in scalars.items()]
    counts = [f"{k}={v}" for k, v in result.items() if k.startswith("num_")]
    lines = [f"[{task}] " + "  ".join(parts), "  " + "  ".join(counts)]
    if result.get("best_weight_decay") is not None:
        lines.append(f"  best weight decay {result['best_weight_decay']:g}")
    if result.get("skipped"):
        lines.append(f"  skipped input: {result['skipped']}")
    return "\n".join(lines)


def log_eval(result: dict, *, step: int, run_dir: str | Path | None = None, writer=None) -> dict:
    """What the trainer's periodic hook does with a result, on rank 0 only (other ranks: nothing).

    Appends ``{"step": step, **result}`` as one line to ``<run_dir>/eval.jsonl`` and adds the
    :func:`scalar_summary` to ``writer`` (a ``torch.utils.tensorboard.SummaryWriter``) at ``step``. Returns the
    record written.
    """
    from .features import dist_rank_world

    record = {"step": int(step), **result}
    if dist_rank_world()[0] != 0:
        return record
    if run_dir is not None:
        append_jsonl(record, Path(run_dir) / EVAL_LOG)
    if writer is not None:
        for tag, value in scalar_summary(result).items():
            writer.add_scalar(tag, value, int(step))
        writer.flush()
    return record
