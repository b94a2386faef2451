"""Batched embedding extraction on one process or on every rank of a process group, gathered in input order.

When ``torch.distributed`` is initialised, every rank must call the same functions with the same arguments: each
rank embeds its own contiguous slice (images: see :mod:`.datasets`; texts: ``texts[r·M/W : (r+1)·M/W]``), and the
slices are all-gathered and put back in input order, so every rank returns the same tensors.

The ranks run their forward passes **in lockstep**: before each batch they agree (one all-reduce of a flag) whether
any rank still has data, and a rank that has run out runs a one-sample dummy forward instead. Uneven slices, or
samples skipped on one rank only, therefore never leave a rank waiting in a collective that the others never reach,
and ZeRO-3 (whose forward gathers parameters with collectives) works unchanged.

The model is put in eval mode for the extraction and given back in the mode it had; gradients are off. Inputs are
cast to the floating dtype of the model's parameters (bf16/fp16 engines), embeddings come back as float32 on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "ImageFeatures",
    "dist_rank_world",
    "encode_texts",
    "extract_image_features",
    "same_on_every_rank",
    "unwrap_model",
]


@dataclass
class ImageFeatures:
    """Gathered image embeddings in input order (identical on every rank)."""

    features: torch.Tensor
    """(N, D) float32, CPU; L2-normalised when asked for."""
    index: torch.Tensor
    """(N,) long sort keys (see :mod:`.datasets`), increasing."""
    keys: list[str]
    labels: torch.Tensor | None = None
    """(N,) long, when the data had labels."""
    captions: list[list[str]] | None = None
    """One list of captions per image, when asked for."""
    skipped: dict[str, int] | None = None
    """Samples (and ignored members) skipped while reading, by reason, summed over ranks."""
    metadata: list[dict] | None = None
    """The parsed ``.json`` member of each image's sample, when asked for (``open_eval_data(metadata=True)``)."""


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The dual encoder inside a DeepSpeed engine or DDP wrapper (anything with ``.module``), or ``model`` itself."""
    while not hasattr(model, "encode_image") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "encode_image") or not hasattr(model, "encode_text"):
        raise TypeError(
            f"{type(model).__name__} has no encode_image/encode_text: pass the DualEncoder, its DeepSpeed engine, "
            "or the model returned by rankclip_ds.load_model"
        )
    return model


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _float_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _comm_device(device: torch.device) -> torch.device:
    """Where collective buffers live: the CPU for gloo; for NCCL (CUDA tensors only) the data's device ``device``,
    which is this rank's GPU (the trainer evaluates on it), or the current CUDA device when the data is elsewhere."""
    if dist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather_rows(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """All-gather tensors whose first dimension differs between ranks; concatenated in rank order, on the CPU."""
    _, world = dist_rank_world()
    if world == 1:
        return t.cpu()
    comm = _comm_device(device)
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=comm)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=comm)  # (max_n, ...)
    padded[: t.shape[0]] = t.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s].cpu() for p, s in zip(parts, sizes, strict=True)])


def _gather_objects(obj):
    _, world = dist_rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def extract_image_features(
    model: nn.Module,
    data,
    *,
    device: str | torch.device = "cpu",
    normalize: bool = True,
    feature: str = "embedding",
    progress: bool = True,
    desc: str = "images",
) -> ImageFeatures:
    """Embed every image of ``data`` (an :class:`~.datasets.EvalData` opened for this rank) and gather the results.

    Args:
        feature: ``"embedding"`` (``model.encode_image``: the projected embedding) or ``"tower"`` (the image tower's
            pooled features, before the projection).
        normalize: L2-normalise each row (in float32).
        progress: a tqdm bar on rank 0.
    """
    if feature not in ("embedding", "tower"):
        raise ValueError(f"feature={feature!r}: choose 'embedding' (projected) or 'tower' (before the projection)")
    model = unwrap_model(model)
    device = torch.device(device)
    rank, world = dist_rank_world()
    encode = model.encode_image if feature == "embedding" else model.image_tower
    dtype = _float_dtype(model.image_tower)
    feats, index, labels, captions, keys, metas = [], [], [], [], [], []
    bar = tqdm(total=data.num_batches, desc=desc, disable=not progress or rank != 0, leave=False)
    with _eval_mode(model):
        batches = iter(data.loader)
        while True:
            batch = next(batches, None)
            if world > 1 and not _any_rank(batch is not None, device):
                break
            if batch is None:
                if world == 1:
                    break
                encode(torch.zeros(1, 3, *data.image_size, dtype=dtype, device=device))  # lockstep dummy forward
                continue
            emb = encode(batch["image"].to(device=device, dtype=dtype, non_blocking=True)).float()  # (B, D)
            feats.append(F.normalize(emb, dim=-1) if normalize else emb)
            index.append(batch["index"])
            keys.extend(batch["key"])
            if "label" in batch:
                labels.append(batch["label"])
            if "captions" in batch:
                captions.extend(batch["captions"])
            metas.extend(batch.get("json", ()))
            bar.update(1)
    bar.close()
    dim = _feature_dim(model, feature)
    local = {
        "features": torch.cat(feats) if feats else torch.zeros(0, dim, device=device),
        "index": torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
    }
    gathered = {name: _gather_rows(t, device) for name, t in local.items()}
    all_keys = [k for part in _gather_objects(keys) for k in part]
    all_captions = [c for part in _gather_objects(captions) for c in part] if data.caption_key else None
    all_metas = [m for part in _gather_objects(metas) for m in part] if data.has_metadata else None
    skipped: dict[str, int] = {}
    for part in _gather_objects(data.skips.counts()):
        for reason, n in part.items():
            skipped[reason] = skipped.get(reason, 0) + n
    # Workers interleave their batches: restore input order with the sort keys (unique per sample).
    order = torch.argsort(gathered["index"], stable=True)
    return ImageFeatures(
        features=gathered["features"][order],
        index=gathered["index"][order],
        keys=[all_keys[i] for i in order.tolist()],
        labels=gathered["labels"][order] if data.has_labels else None,
        captions=[all_captions[i] for i in order.tolist()] if all_captions is not None else None,
        metadata=[all_metas[i] for i in order.tolist()] if all_metas is not None else None,
        skipped=skipped,
    )


def _feature_dim(model: nn.Module, feature: str) -> int:
    return int(model.embed_dim) if feature == "embedding" else int(model.image_tower.num_features)


def encode_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    max_length: int = 32,
    device: str | torch.device = "cpu",
    normalize: bool = True,
    progress: bool = True,
    desc: str = "texts",
) -> torch.Tensor:
    """Embed ``texts`` (same list on every rank) → (M, D) float32 on the CPU, rows in the order of ``texts``.

    Tokenisation matches training: ``padding="max_length"``, ``truncation=True`` at ``max_length`` tokens, so a
    text's embedding does not depend on its batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    model = unwrap_model(model)
    device = torch.device(device)
    rank, world = dist_rank_world()
    total = len(texts)
    lo, hi = rank * total // world, (rank + 1) * total // world
    mine = list(texts[lo:hi])
    # every rank runs as many forwards as the largest slice needs (lockstep; see the module doc)
    steps = max(-(-((r + 1) * total // world - r * total // world) // batch_size) for r in range(world))
    out = []
    with _eval_mode(model):
        for step in tqdm(range(steps), desc=desc, disable=not progress or rank != 0, leave=False):
            chunk = mine[step * batch_size : (step + 1) * batch_size]
            # an empty chunk is the lockstep dummy forward of a rank whose slice is used up
            tok = tokenizer(
                chunk or [""], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
            )
            ids, mask = tok["input_ids"].long().to(device), tok["attention_mask"].long().to(device)  # (b, L)
            emb = model.encode_text(ids, mask).float()  # (b, D)
            if chunk:
                out.append(F.normalize(emb, dim=-1) if normalize else emb)
    local = torch.cat(out) if out else torch.zeros(0, int(model.embed_dim), device=device)
    return _gather_rows(local, device)


def same_on_every_rank(obj, device: str | torch.device = "cpu"):
    """Rank 0's ``obj`` on every rank (a broadcast; identity without a process group).

    Every rank computes the metrics from the same gathered embeddings; broadcasting rank 0's copy makes the returned
    numbers identical even where floating-point reductions could differ between devices. ``device``: the device the
    evaluation ran on (the broadcast's buffer goes there under NCCL).
    """
    _, world = dist_rank_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device(torch.device(device)))
    return box[0]
