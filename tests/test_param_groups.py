"""Per-part learning rates and layer-wise lr decay: which parameter gets which lr and weight decay, for a ViT image
tower and a BERT-style text tower, the schedule scaling every group's own rate, and the dry run's table.

Every expected value is computed here from the parameter's name by the formula of ``optim.image_layer_decay``'s
docstring (lr × decay^(depth + 1 − layer); layer 0 the embeddings, 1..depth the blocks, depth + 1 what follows),
written out independently of ``rankclip_ds/model/layers.py`` and ``trainer/optim.py``.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from rankclip_ds.config import ConfigError, load_config
from rankclip_ds.model import build_model
from rankclip_ds.trainer.optim import build_lr_lambda, build_optimizer, param_groups, param_groups_from_config

MODEL = [
    "--model.image.name", "vit_tiny_patch16_224",
    "--model.image.image_size", "32",
    "--model.image.model_kwargs", "{patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
    "--model.text.name_or_path", "builtin:minilm",
    "--model.text.pretrained", "false",
    "--model.text.overrides", "{num_hidden_layers: 3, hidden_size: 32, num_attention_heads: 2, intermediate_size: 37}",
    "--model.embed_dim", "16",
]  # fmt: skip
RATES = [
    "--optim.lr", "1e-3",
    "--optim.image_lr", "2e-3",
    "--optim.text_lr", "5e-4",
    "--optim.proj_lr", "3e-3",
    "--optim.image_layer_decay", "0.5",
    "--optim.text_layer_decay", "0.8",
    "--optim.weight_decay", "0.1",
]  # fmt: skip


def expected_layer(name: str) -> tuple[str, int, int]:
    """(part, layer, depth) of a parameter of the MODEL above, from its name alone."""
    if name.startswith("image_tower."):
        if m := re.match(r"image_tower\.trunk\.blocks\.(\d+)\.", name):
            return "image", int(m[1]) + 1, 2
        if re.match(r"image_tower\.trunk\.(cls_token|pos_embed|patch_embed\.)", name):
            return "image", 0, 2
        assert name.startswith("image_tower.trunk.norm."), name  # the final norm: after the 2 blocks
        return "image", 3, 2
    if name.startswith("text_tower."):
        if m := re.match(r"text_tower\.encoder\.encoder\.layer\.(\d+)\.", name):
            return "text", int(m[1]) + 1, 3
        assert name.startswith("text_tower.encoder.embeddings."), name  # BERT: nothing after the layers
        return "text", 0, 3
    assert name in ("image_proj.weight", "text_proj.weight", "logit_scale"), name
    return "proj", 0, 0


def expected_lr_wd(name: str, p: torch.Tensor) -> tuple[float, float]:
    part, layer, depth = expected_layer(name)
    base = {"image": 2e-3, "text": 5e-4, "proj": 3e-3}[part]
    decay = {"image": 0.5, "text": 0.8, "proj": 1.0}[part]
    lr = base * decay ** (depth + 1 - layer)
    no_decay = p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() or name == "logit_scale"
    return lr, 0.0 if no_decay else 0.1


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_config(None, MODEL).model)


def test_every_parameter_gets_its_parts_rate_decayed_by_depth_and_its_weight_decay(model):
    optim = load_config(None, MODEL + RATES).optim
    opt = build_optimizer(model, lr=optim.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                          groups=param_groups_from_config(model, optim))  # fmt: skip
    groups = group_of(opt)
    params = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)  # each parameter exactly once
    assert all(g["params"] for g in opt.param_groups)  # no empty group
    for name, p in params.items():
        lr, wd = expected_lr_wd(name, p)
        assert groups[id(p)]["lr"] == pytest.approx(lr, rel=1e-12), name
        assert groups[id(p)]["weight_decay"] == wd, name

    # A few written out in full.
    def lr(name: str) -> float:
        return groups[id(params[name])]["lr"]

    assert lr("image_tower.trunk.patch_embed.proj.weight") == pytest.approx(2e-3 * 0.5**3)
    assert lr("image_tower.trunk.blocks.1.mlp.fc1.weight") == pytest.approx(2e-3 * 0.5)
    assert lr("image_tower.trunk.norm.weight") == pytest.approx(2e-3)
    assert lr("text_tower.encoder.embeddings.word_embeddings.weight") == pytest.approx(5e-4 * 0.8**4)
    assert lr("text_tower.encoder.encoder.layer.2.output.dense.weight") == pytest.approx(5e-4 * 0.8)
    assert lr("logit_scale") == 3e-3 and groups[id(params["logit_scale"])]["weight_decay"] == 0
    # One group per distinct (lr, weight decay).
    distinct = {expected_lr_wd(n, p) for n, p in params.items()}
    assert len(opt.param_groups) == len(distinct)


def test_one_rate_keeps_the_two_groups_decay_then_no_decay(model):
    """Checkpoints of runs at one rate hold two groups in this order; a resume must find the same."""
    optim = load_config(None, MODEL).optim
    groups = param_groups_from_config(model, optim)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["lr"] for g in groups] == [optim.lr, optim.lr]
    assert [g["weight_decay"] for g in groups] == [optim.weight_decay, 0.0]


def test_the_schedule_scales_each_groups_own_rate(model):
    optim = load_config(None, MODEL + RATES).optim
    opt = build_optimizer(model, lr=optim.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                          groups=param_groups_from_config(model, optim))  # fmt: skip
    base = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, build_lr_lambda(10, 3, 0.1))
    for step in range(10):
        warm = (step + 1) / 3
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 3) / 7))
        factor = warm if step < 3 else cosine
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * factor for b in base], rel=1e-12)
        opt.step()
        sched.step()


def test_frozen_parameters_are_in_no_group():
    cfg = load_config(None, MODEL + RATES + ["--model.image.lock.enabled", "true"])
    model = build_model(cfg.model)
    grouped = {id(p) for g in param_groups_from_config(model, cfg.optim) for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in grouped) == (not name.startswith("image_tower.")), name


def test_layer_decay_on_a_tower_without_blocks_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.image_tower = nn.Linear(4, 4)
            self.image_proj = nn.Linear(4, 2)

    with pytest.raises(ConfigError, match=r"optim\.image_layer_decay=0\.5.*no block list"):
        param_groups(Flat(), 0.1, lr=1e-3, image_layer_decay=0.5)
    assert len(param_groups(Flat(), 0.1, lr=1e-3, image_lr=2e-3)) == 4  # rates work; no depth needed


def test_the_dry_run_prints_the_groups():
    from rankclip_ds.dry_run import dry_run

    cfg = load_config(None, MODEL + RATES + ["--optim.micro_batch_size", "4", "--data.train_data", "/nonexistent"])
    report = dry_run(cfg, {}, 1)
    rows = {(r["part"], r["layers"], r["weight_decay"]): r for r in report.param_groups}
    assert rows[("image", "2", 0.1)]["lr"] == pytest.approx(2e-3 * 0.5)
    assert rows[("text", "0", 0.1)]["lr"] == pytest.approx(5e-4 * 0.8**4)
    model = build_model(cfg.model)
    assert sum(r["params"] for r in report.param_groups) == sum(p.numel() for p in model.parameters())
    text = report.format(cfg)
    assert "parameter groups" in text and "image  2 (of 2)" in text, text
