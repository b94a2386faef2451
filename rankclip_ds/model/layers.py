"""Where each parameter of a tower sits in its depth: the layer ids that locking and layer-wise learning-rate decay
share.

A tower is a stack of blocks between what comes before them (the embeddings: patch/position/class tokens, token
embeddings, a pre-norm) and what comes after them (the final norm, a pooling head). Layer 0 is everything before
the first block, layers 1..depth are the blocks, layer depth+1 is everything after the last block.

The block list is found by its structure, not by the model's class: the container (``nn.ModuleList`` /
``nn.Sequential``) named ``blocks``, ``layers``, ``layer`` or ``stages`` holding the most parameters (timm ViTs and
the CLIP family: ``trunk.blocks``; ConvNeXt: ``stages``; Swin: ``layers``; BERT-style encoders: ``encoder.layer``;
the CLIP text transformer: ``encoder.layers``), or else numbered children such as a ResNet's ``layer1..layer4``
(its stages). "Before" and "after" follow the order in which parameters are registered, which is the forward
order of every such model (timm and transformers register the embeddings first and the final norm last).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

__all__ = ["TowerLayers", "tower_layers"]

BLOCK_LIST_NAMES = ("blocks", "layers", "layer", "stages")
_NUMBERED = re.compile(r"^(.*?)(\d+)$")


@dataclass(frozen=True)
class TowerLayers:
    """The layer structure of one tower (names relative to the tower module)."""

    blocks: str | None
    """Dotted path of the block container (``trunk.blocks``, ``encoder.encoder.layer``), or for numbered children
    their common prefix (``trunk.layer`` for ``trunk.layer1..4``); None when the tower has no block structure."""
    depth: int
    """Number of blocks (0 when none was found)."""
    layer_of: dict[str, int]
    """Parameter name → layer id: 0 before the blocks, 1..depth the blocks, depth+1 after them."""


def _block_containers(tower: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Every candidate block list of ``tower``: named containers, and runs of numbered siblings (``layer1..4``)."""
    found = []
    for path, module in tower.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and path.rpartition(".")[2] in BLOCK_LIST_NAMES:
            found.append((path, list(module)))
        numbered: dict[str, list[tuple[int, nn.Module]]] = {}
        for name, child in module.named_children():
            match = _NUMBERED.match(name)
            if match and match[1] and not match[1].endswith("_"):
                numbered.setdefault(match[1], []).append((int(match[2]), child))
        for stem, children in numbered.items():
            indices = sorted(i for i, _ in children)
            if len(children) >= 2 and indices == list(range(indices[0], indices[0] + len(indices))):
                prefix = f"{path}.{stem}" if path else stem
                found.append((prefix, [c for _, c in sorted(children, key=lambda ic: ic[0])]))
    return found


def _count(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _block_names(path: str, blocks: list[nn.Module], tower: nn.Module) -> list[str]:
    """The dotted name of each block (``trunk.blocks.3``, ``trunk.layer2``)."""
    by_module = {id(m): name for name, m in tower.named_modules()}
    return [by_module[id(b)] for b in blocks]


def tower_layers(tower: nn.Module) -> TowerLayers:
    """The layer id of every parameter of ``tower`` (works on the meta device: nothing is read).

    The block list is the candidate holding the most parameters (ties: the shallowest), so a ConvNeXt's
    ``stages`` wins over each stage's own ``blocks``."""
    candidates = [(path, blocks) for path, blocks in _block_containers(tower) if _count(blocks) > 0]
    names = [n for n, _ in tower.named_parameters()]
    if not candidates:
        return TowerLayers(None, 0, dict.fromkeys(names, 0))
    path, blocks = max(candidates, key=lambda c: (_count(c[1]), -c[0].count(".")))
    block_names = _block_names(path, blocks, tower)
    layer_of: dict[str, int] = {}
    seen_block = False
    for name in names:
        block = next((i for i, b in enumerate(block_names) if name.startswith(b + ".")), None)
        if block is not None:
            layer_of[name], seen_block = block + 1, True
        else:
            layer_of[name] = len(blocks) + 1 if seen_block else 0
    return TowerLayers(path, len(blocks), layer_of)
