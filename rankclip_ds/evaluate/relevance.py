"""Graded relevance and ranking consistency of a model on shards whose samples say how related they are.

Each sample of the shards is an image, one caption (the ``.txt`` member) and a ``.json`` member with the facts the
image shows and the part of them the caption states: ``{"image_facts": [...], "caption_facts": [...]}`` (the scenes
benchmark, :mod:`rankclip_ds.data.scenes`, writes them). The relevance of two items is the number of facts they
share (:func:`shared_fact_relevance`), or any matrix the user gives. :func:`relevance_eval` embeds every image and
caption (distributed like :func:`~rankclip_ds.evaluate.retrieval_eval`) and scores four directions — image→text,
text→image, image→image, text→text (in-modal queries never retrieve themselves) — with NDCG@k, mAP and the Spearman
and Kendall rank correlation between the model's similarity order and the relevance order
(:mod:`.relevance_metrics`), plus the modality gap, alignment and uniformity of the embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from rankclip_ds.data.transforms import build_image_transform

from .datasets import open_eval_data
from .features import dist_rank_world, encode_texts, extract_image_features, same_on_every_rank
from .metrics import DEFAULT_BLOCK
from .relevance_metrics import alignment, modality_gap, relevance_metrics, uniformity

__all__ = ["DIRECTIONS", "load_relevance", "relevance_eval", "resolve_relevance", "shared_fact_relevance"]

log = logging.getLogger(__name__)

DIRECTIONS = ("i2t", "t2i", "i2i", "t2t")
"""Query → candidate: image→text, text→image, image→image, text→text."""
RELATIONS = ("i2i", "t2t", "i2t")
"""The relevance matrices a user may give one by one (text→image is image→text transposed)."""

RelevanceInput = torch.Tensor | str | Path | Callable | Mapping


def shared_fact_relevance(facts_a: Sequence[Sequence[str]], facts_b: Sequence[Sequence[str]]) -> torch.Tensor:
    """``R[a, b]`` = the number of distinct facts item ``a`` and item ``b`` share → (len_a, len_b) float32.

    Each item is a list of fact strings (compared exactly; a fact listed twice in one item counts once).
    Image–image relevance is ``shared_fact_relevance(image_facts, image_facts)``, text–text the same with the
    caption facts, image–text ``shared_fact_relevance(image_facts, caption_facts)``.
    """
    for name, items in (("facts_a", facts_a), ("facts_b", facts_b)):
        for i, item in enumerate(items):
            if isinstance(item, str) or not all(isinstance(f, str) for f in item):
                raise ValueError(f"{name}[{i}]={item!r}: give each item a list of fact strings, e.g. ['red', 'circle']")
    vocab = {f: j for j, f in enumerate(sorted({f for items in (facts_a, facts_b) for item in items for f in item}))}

    def multi_hot(items: Sequence[Sequence[str]]) -> torch.Tensor:
        out = torch.zeros(len(items), len(vocab))  # (n, V)
        for i, item in enumerate(items):
            out[i, [vocab[f] for f in set(item)]] = 1.0
        return out

    return multi_hot(facts_a) @ multi_hot(facts_b).T


def _facts_from_metadata(metadata: list[dict], keys: list[str]) -> dict[str, torch.Tensor]:
    """The three relevance matrices of shared facts from the samples' ``.json`` members."""
    facts: dict[str, list] = {"image_facts": [], "caption_facts": []}
    for meta, key in zip(metadata, keys, strict=True):
        for field, out in facts.items():
            value = meta.get(field)
            if not isinstance(value, list):
                raise ValueError(
                    f"sample {key!r}: its .json member has no {field!r} list (got {value!r}). Fix: write "
                    '{"image_facts": [...], "caption_facts": [...]} into every sample (tools/make_scene_shards.py '
                    "does), or pass relevance= (a matrix, a .npy file or a callable)"
                )
            out.append(value)
    images, captions = facts["image_facts"], facts["caption_facts"]
    return {
        "i2i": shared_fact_relevance(images, images),
        "t2t": shared_fact_relevance(captions, captions),
        "i2t": shared_fact_relevance(images, captions),
    }


def load_relevance(value) -> torch.Tensor:
    """A relevance matrix from a tensor, a NumPy array or a ``.npy`` file (read without unpickling)."""
    if isinstance(value, (str, Path)):
        import numpy as np

        path = Path(value)
        if path.suffix != ".npy" or not path.is_file():
            raise FileNotFoundError(f"relevance file {str(value)!r}: give an existing .npy file of an (N, N) array")
        value = np.load(path, allow_pickle=False)
    return torch.as_tensor(value).float()


def resolve_relevance(
    relevance: RelevanceInput | None, *, num_items: int, keys: list[str], metadata: list[dict] | None
) -> dict[str, torch.Tensor]:
    """``{"i2i", "t2t", "i2t"}`` → (N, N) matrices, rows and columns in input order (the order of the samples in
    the shards, skipped samples left out).

    ``relevance``: None (shared facts from the ``.json`` members), one matrix (tensor, array or ``.npy`` path) used for
    every direction, a mapping with the three keys, or a callable ``f(keys, metadata)`` returning either form (it
    sees which samples were kept, so it works when some were skipped).
    """
    if relevance is None:
        return _facts_from_metadata(metadata, keys)
    if callable(relevance) and not isinstance(relevance, torch.Tensor):
        relevance = relevance(keys, metadata)
    if isinstance(relevance, Mapping):
        if set(relevance) != set(RELATIONS):
            raise ValueError(f"relevance mapping has keys {sorted(relevance)}; give exactly {list(RELATIONS)}")
        matrices = {name: load_relevance(relevance[name]) for name in RELATIONS}
    else:
        matrix = load_relevance(relevance)
        matrices = dict.fromkeys(RELATIONS, matrix)
    for name, matrix in matrices.items():
        if matrix.shape != (num_items, num_items):
            raise ValueError(
                f"relevance {name} has shape {tuple(matrix.shape)} but {num_items} samples were read: give an "
                f"({num_items}, {num_items}) matrix in input order, or a callable f(keys, metadata) when some "
                "samples are skipped"
            )
    return matrices


def _score(image_emb, text_emb, matrices: dict[str, torch.Tensor], ks, block_size: int) -> dict:
    """The four directions' metrics and the geometry, as a flat JSON-ready dict."""
    pairs = {
        "i2t": (image_emb, text_emb, matrices["i2t"], False),
        "t2i": (text_emb, image_emb, matrices["i2t"].T, False),
        "i2i": (image_emb, image_emb, matrices["i2i"], True),
        "t2t": (text_emb, text_emb, matrices["t2t"], True),
    }
    result: dict = {}
    counts: dict = {}
    for direction, (query, cand, rel, exclude_self) in pairs.items():
        got = relevance_metrics(query, cand, rel, ks=ks, exclude_self=exclude_self, block_size=block_size)
        for name in ["ndcg@" + str(k) for k in ks] + ["map", "spearman", "kendall"]:
            result[f"{direction}_{name}"] = got[name]
        counts[f"num_{direction}_no_relevant"] = got["num_no_relevant"]
        counts[f"num_{direction}_constant"] = got["num_constant"]
    geometry = torch.stack(
        [
            modality_gap(image_emb, text_emb),
            alignment(image_emb, text_emb, alpha=2.0),
            uniformity(image_emb, t=2.0, block_size=block_size),
            uniformity(text_emb, t=2.0, block_size=block_size),
        ]
    ).tolist()  # one read
    result.update(zip(("modality_gap", "alignment", "uniformity_image", "uniformity_text"), geometry, strict=True))
    result.update(counts)
    return result


def relevance_eval(
    model: nn.Module,
    tokenizer,
    *,
    data: str | list[str],
    image_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    relevance: RelevanceInput | None = None,
    batch_size: int = 64,
    text_batch_size: int = 256,
    max_length: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = DEFAULT_BLOCK,
    progress: bool = True,
) -> dict:
    """Graded-relevance retrieval and ranking consistency of ``model`` on shards (see the module doc).

    Args:
        data: shards with an image, a ``.txt`` caption and (for the default relevance) a ``.json`` member with
            ``image_facts`` and ``caption_facts`` per sample.
        relevance: None (shared facts) or the user's relevance, see :func:`resolve_relevance`.
        block_size: queries scored at a time. Other arguments as in :func:`~rankclip_ds.evaluate.retrieval_eval`.

    Returns:
        A JSON-ready dict: ``{d}_ndcg@{k}``, ``{d}_map``, ``{d}_spearman``, ``{d}_kendall`` for each direction d in
        ``i2t, t2i, i2i, t2t`` (means over the queries where defined; ``None`` when none is), ``num_{d}_no_relevant``
        (queries without a relevant candidate, left out of NDCG and mAP), ``num_{d}_constant`` (queries with a
        constant relevance or score row, left out of the correlations), ``modality_gap``, ``alignment``
        (α = 2), ``uniformity_image``, ``uniformity_text`` (t = 2), ``num_images``, ``relevance``
        (``"shared_facts"`` or ``"user"``), ``skipped``, ``task`` (``"relevance"``) and ``data``. Identical on every
        rank under ``torch.distributed``.
    """
    transform = build_image_transform(
        image_size, mean=mean, std=std, train=False, interpolation=interpolation, crop_pct=crop_pct
    )
    rank, world = dist_rank_world()
    with_metadata = relevance is None or (callable(relevance) and not isinstance(relevance, torch.Tensor))
    opened = open_eval_data(
        data,
        image_transform=transform,
        batch_size=batch_size,
        num_workers=num_workers,
        labels=False,
        captions="txt",
        rank=rank,
        world_size=world,
        metadata=with_metadata,
    )
    images = extract_image_features(model, opened, device=device, normalize=True, progress=progress)
    num_images = images.features.shape[0]
    if num_images < 3:
        raise ValueError(f"{num_images} usable samples in {data!r} (skipped: {images.skipped}); relevance needs ≥ 3")
    text_emb = encode_texts(
        model,
        tokenizer,
        [caps[0] for caps in images.captions],
        batch_size=text_batch_size,
        max_length=max_length,
        device=device,
        normalize=True,
        progress=progress,
        desc="captions",
    )  # (N, D), caption i belongs to image i
    matrices = resolve_relevance(relevance, num_items=num_images, keys=images.keys, metadata=images.metadata)
    device = torch.device(device)
    result = {"task": "relevance", "data": data if isinstance(data, str) else "::".join(data)}
    result.update(_score(images.features.to(device), text_emb.to(device), matrices, ks, block_size))
    result["num_images"] = int(num_images)
    result["relevance"] = "shared_facts" if relevance is None else "user"
    result["skipped"] = images.skipped
    if images.skipped:
        log.warning("relevance on %s: skipped input %s", result["data"], images.skipped)
    return same_on_every_rank(result, device)
