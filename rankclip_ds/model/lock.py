"""Locked towers (LiT and its partial variants): freeze a tower, optionally keeping its last blocks and/or its norm
layers trainable, and run the frozen modules in eval mode during training.

A frozen parameter has ``requires_grad=False``: it gets no gradient, the optimizer's parameter groups leave it out
(:func:`rankclip_ds.trainer.optim.param_groups`), so DeepSpeed keeps no fp32 master copy and no Adam moments of it
under any ZeRO stage (its optimizers own only ``requires_grad`` parameters), and it stays bit-identical through
training (DeepSpeed's checkpoints store it with the frozen parameters, and ``zero_to_fp32`` restores it).

Eval mode: the maximal subtrees of a locked tower whose every parameter is frozen are put back in eval mode each
time the model enters train mode (:meth:`DualEncoder.train`): no dropout, no BatchNorm statistics updates. timm's
``PatchDropout`` stays in train mode: patch dropout is an explicit option of its own (``model.image.patch_dropout``),
not a side effect of the tower being trainable. ``lock.train_mode`` keeps the frozen modules in train mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..problems import Problem, problem_message
from .config import LockConfig, ModelConfig

if TYPE_CHECKING:
    from torch import nn

    from .dual_encoder import DualEncoder

__all__ = ["apply_locks", "check_locks", "frozen_subtrees", "lock_tower"]

TOWERS = (("image", "image_tower"), ("text", "text_tower"))


def _model_config_error():
    from .towers import ModelConfigError

    return ModelConfigError


def _lock_error(field: str, value: object, problem: str, fix: str) -> Exception:
    """A ModelConfigError that carries the field it is about (for the pre-flight's problem list)."""
    error = _model_config_error()(problem_message(field, value, problem, fix))
    error.field = field  # type: ignore[attr-defined]
    return error


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's LayerNorm / GroupNorm / RMSNorm / BatchNorm family and their subclasses
    (timm's LayerNorm2d, BatchNormAct2d), or any class whose name says it is one (``...LayerNorm``, ``RMSNorm``)."""
    from torch import nn

    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, norms) or type(module).__name__.lower().endswith("norm")


def lock_tower(tower: nn.Module, lock: LockConfig, field: str, tower_name: str) -> None:
    """Freeze ``tower`` per ``lock`` (``field``: ``model.image.lock``), in place: everything frozen, then the last
    ``unlocked_blocks`` blocks with what follows them, and with ``unlocked_norms`` every norm layer's affine
    parameters, made trainable again."""
    from .layers import tower_layers

    tower.requires_grad_(False)
    n = lock.unlocked_blocks
    if n:
        layers = tower_layers(tower)
        if layers.blocks is None:
            raise _lock_error(
                f"{field}.unlocked_blocks",
                n,
                f"{tower_name} has no block list (no 'blocks' / 'layers' / 'layer' / 'stages' container or "
                "numbered stages), so its last blocks cannot be told apart",
                f"use {field}.unlocked_blocks=0 (lock the whole tower), optionally with {field}.unlocked_norms=true",
            )
        if n > layers.depth:
            raise _lock_error(
                f"{field}.unlocked_blocks",
                n,
                f"{tower_name} has only {layers.depth} blocks ({layers.blocks})",
                f"use at most {layers.depth} (all blocks unlocked), or fewer",
            )
        params = dict(tower.named_parameters())
        for name, layer in layers.layer_of.items():
            if layer > layers.depth - n:
                params[name].requires_grad_(True)
    if lock.unlocked_norms:
        for module in tower.modules():
            if _is_norm(module):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)


def frozen_subtrees(tower: nn.Module, prefix: str) -> list[str]:
    """The maximal submodules of ``tower`` with at least one parameter, all of them frozen (dotted names under
    ``prefix``); the tower itself when it is frozen whole."""

    def frozen(module: nn.Module) -> bool:
        params = list(module.parameters())
        return bool(params) and not any(p.requires_grad for p in params)

    if frozen(tower):
        return [prefix]
    roots: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        for name, child in module.named_children():
            child_path = f"{path}.{name}"
            if frozen(child):
                roots.append(child_path)
            else:
                visit(child, child_path)

    visit(tower, prefix)
    return roots


def apply_locks(model: DualEncoder, model_cfg: ModelConfig) -> None:
    """Apply ``model.image.lock`` and ``model.text.lock`` to ``model`` (end of :func:`build_model`) and tell it
    which modules run in eval mode during training. Raises ModelConfigError for an impossible lock (a depth beyond
    the tower's, blocks of a tower without any)."""
    eval_when_training: list[str] = []
    for short, attr in TOWERS:
        lock = getattr(model_cfg, short).lock
        if not lock.enabled:
            continue
        tower = getattr(model, attr)
        lock_tower(tower, lock, f"model.{short}.lock", f"the {short} tower")
        if not lock.train_mode:
            eval_when_training += frozen_subtrees(tower, attr)
    model.set_eval_when_training(eval_when_training)
    model.train(model.training)


def check_locks(model_cfg: ModelConfig) -> list[Problem]:
    """The locks' problems, for the pre-flight: lock settings without ``enabled``, and a lock deeper than its tower
    (found by building the model on the meta device: no memory, no weights read). A model that cannot be built for
    another reason gives no problem here (the tower checks report it)."""
    problems = []
    needs_depth = False
    for short, _ in TOWERS:
        lock, field = getattr(model_cfg, short).lock, f"model.{short}.lock"
        if not lock.enabled and (lock.unlocked_blocks or lock.unlocked_norms or lock.train_mode):
            problems.append(
                Problem.of(
                    f"{field}.enabled",
                    False,
                    f"{field} sets unlocked_blocks / unlocked_norms / train_mode, which only apply to a locked tower",
                    f"set {field}.enabled=true to lock the tower, or remove the other {field} settings",
                )
            )
        needs_depth = needs_depth or (lock.enabled and lock.unlocked_blocks > 0)
    if not needs_depth:
        return problems
    from . import build_model

    try:
        build_model(model_cfg, device="meta")
    except _model_config_error() as exc:
        field = getattr(exc, "field", None)
        if field is not None:
            problems.append(Problem(field, str(exc)))
    except Exception:  # not a lock problem: the tower checks name why the model cannot be built
        pass
    return problems
