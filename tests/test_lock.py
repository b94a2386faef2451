"""Locked towers (``model.image.lock`` / ``model.text.lock``): which parameters are frozen, frozen modules in eval
mode during training (dropout off, BatchNorm statistics kept), the depth checks of the build and the pre-flight,
and, in the slow tier, real 2-rank DeepSpeed runs under ZeRO-2 and ZeRO-3: frozen parameters bit-identical after
the steps, no optimizer state for them, and every group stepped at its own learning rate (through a resume).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import clean_launcher_env, free_port
from rankclip_ds.config import load_config
from rankclip_ds.model import ModelConfigError, build_model
from rankclip_ds.model.lock import check_locks

VIT = [
    "--model.image.name", "vit_tiny_patch16_224",
    "--model.image.image_size", "32",
    "--model.image.model_kwargs", "{patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
    "--model.text.pretrained", "false",
    "--model.text.overrides", "{num_hidden_layers: 2, hidden_size: 32, num_attention_heads: 2, intermediate_size: 37}",
    "--model.embed_dim", "16",
]  # fmt: skip


def build(*overrides: str, base=VIT):
    torch.manual_seed(0)
    return build_model(load_config(None, [*base, *overrides]).model)


def trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tokens(n=2):
    ids = torch.randint(1000, 2000, (n, 8), generator=torch.Generator().manual_seed(2))
    return ids, torch.ones_like(ids)


# ------------------------------------------------------------------------------------------------ which parameters
def test_a_locked_tower_is_frozen_whole_and_nothing_else_is():
    model = build("--model.image.lock.enabled", "true")
    assert trainable(model.image_tower) == set()
    assert trainable(model.text_tower) == {n for n, _ in model.text_tower.named_parameters()}
    assert {"image_proj.weight", "text_proj.weight", "logit_scale"} <= trainable(model)  # never locked
    counts = model.param_counts()
    assert counts["image_tower_trainable"] == 0 and counts["trainable"] == counts["total"] - counts["image_tower"]


def test_unlocked_blocks_keep_the_last_blocks_and_what_follows_them():
    model = build("--model.image.lock.enabled", "true", "--model.image.lock.unlocked_blocks", "1",
                  "--model.text.lock.enabled", "true", "--model.text.lock.unlocked_blocks", "1")  # fmt: skip
    image = {n for n, _ in model.image_tower.named_parameters()}
    assert trainable(model.image_tower) == {n for n in image if re.match(r"trunk\.(blocks\.1\.|norm\.)", n)}
    text = {n for n, _ in model.text_tower.named_parameters()}
    assert trainable(model.text_tower) == {n for n in text if n.startswith("encoder.encoder.layer.1.")}
    all_blocks = build("--model.image.lock.enabled", "true", "--model.image.lock.unlocked_blocks", "2")
    assert trainable(all_blocks.image_tower) == {n for n in image if not re.match(r"trunk\.(cls|pos|patch)", n)}


def test_unlocked_norms_keep_every_norm_layer():
    model = build("--model.image.lock.enabled", "true", "--model.image.lock.unlocked_norms", "true",
                  "--model.text.lock.enabled", "true", "--model.text.lock.unlocked_norms", "true")  # fmt: skip
    image = {n for n, _ in model.image_tower.named_parameters()}
    assert trainable(model.image_tower) == {n for n in image if re.search(r"\.norm\d?\.", n)}
    text = {n for n, _ in model.text_tower.named_parameters()}
    assert trainable(model.text_tower) == {n for n in text if ".LayerNorm." in n}


# ------------------------------------------------------------------------------------------------ eval mode
TEXT_DROPOUT = [
    "--model.text.overrides", "{num_hidden_layers: 2, hidden_size: 32, num_attention_heads: 2, intermediate_size: 37, "
    "hidden_dropout_prob: 0.5, attention_probs_dropout_prob: 0.5}",
]  # fmt: skip


def test_a_locked_tower_runs_without_dropout_in_train_mode():
    ids, mask = tokens()
    locked = build(*TEXT_DROPOUT, "--model.text.lock.enabled", "true").train()
    assert locked.training and not locked.text_tower.training
    assert torch.equal(locked.encode_text(ids, mask), locked.encode_text(ids, mask))
    # The control: the same tower unlocked drops out, and so does a lock with train_mode.
    for extra in ([], ["--model.text.lock.enabled", "true", "--model.text.lock.train_mode", "true"]):
        model = build(*TEXT_DROPOUT, *extra).train()
        assert model.text_tower.training
        assert not torch.equal(model.encode_text(ids, mask), model.encode_text(ids, mask))
    locked.eval()
    assert not any(m.training for m in locked.modules())
    locked.train()
    assert locked.image_tower.training and locked.text_proj.training


def test_only_the_frozen_blocks_of_a_partly_locked_tower_run_in_eval_mode():
    model = build("--model.image.lock.enabled", "true", "--model.image.lock.unlocked_blocks", "1").train()
    trunk = model.image_tower.trunk
    assert not trunk.blocks[0].training and not trunk.patch_embed.training
    assert trunk.blocks[1].training and trunk.norm.training and trunk.training


def test_patch_dropout_stays_on_in_a_locked_tower():
    model = build("--model.image.patch_dropout", "0.5", "--model.image.lock.enabled", "true").train()
    seen = []
    model.image_tower.trunk.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    model.encode_image(images())
    model.eval().encode_image(images())
    assert seen == [1 + 8, 1 + 16]  # class token + half of the 4×4 patches in training; all of them in eval


CNN = ["--model.image.name", "resnet18", *VIT[2:4], *VIT[6:]]  # no model_kwargs: a stock resnet18 at 32 px


def test_a_locked_cnn_keeps_its_batchnorm_statistics():
    locked = build("--model.image.lock.enabled", "true", base=CNN).train()
    free = build(base=CNN).train()
    bn = "image_tower.trunk.layer1.0.bn1"
    before = {k: v.clone() for k, v in locked.get_submodule(bn).state_dict().items()}
    locked.encode_image(images(4))
    free.encode_image(images(4))
    after = locked.get_submodule(bn).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(free.get_submodule(bn).running_mean, before["running_mean"])  # the control moves
    # Stages of a CNN count as its blocks.
    stage = build("--model.image.lock.enabled", "true", "--model.image.lock.unlocked_blocks", "1", base=CNN)
    assert trainable(stage.image_tower) == {n for n, _ in stage.image_tower.named_parameters() if ".layer4." in n}


def test_grad_checkpointing_trains_the_unlocked_block_only():
    model = build("--model.image.lock.enabled", "true", "--model.image.lock.unlocked_blocks", "1",
                  "--model.grad_checkpointing", "true").train()  # fmt: skip
    model.encode_image(images()).sum().backward()
    trunk = model.image_tower.trunk
    assert all(p.grad is None for p in trunk.blocks[0].parameters())
    assert all(p.grad is not None for p in trunk.blocks[1].mlp.parameters())


# ------------------------------------------------------------------------------------------------ depth checks
@pytest.mark.parametrize("tower,depth", [("image", 2), ("text", 2)])
def test_a_lock_deeper_than_the_tower_is_refused_at_build_and_in_the_preflight(tower, depth):
    from rankclip_ds.preflight import preflight

    field = f"model.{tower}.lock.unlocked_blocks"
    overrides = [*VIT, f"--model.{tower}.lock.enabled", "true", f"--{field}", "3", "--optim.micro_batch_size", "4"]
    cfg = load_config(None, overrides)
    with pytest.raises(ModelConfigError, match=rf"{re.escape(field)}=3: the {tower} tower has only {depth} blocks"):
        build_model(cfg.model)
    problems = check_locks(cfg.model)
    assert [p.field for p in problems] == [field] and f"only {depth} blocks" in problems[0].message
    assert field in [p.field for p in preflight(cfg, {}, 1, ds_source="ds.json")[1]]
    cfg.model.__dict__[tower].lock.unlocked_blocks = depth  # at the depth: fine
    assert check_locks(cfg.model) == []


def test_lock_settings_without_a_lock_are_a_problem():
    cfg = load_config(None, [*VIT, "--model.text.lock.unlocked_blocks", "1"])
    assert [p.field for p in check_locks(cfg.model)] == ["model.text.lock.enabled"]


# ------------------------------------------------------------------------------------------------ DeepSpeed runs
LOCKED_RUN = [
    "--model.image.model_kwargs", "{patch_size: 8, depth: 2}",
    "--model.image.lock.enabled", "true",
    "--optim.micro_batch_size", "8",
    "--optim.image_lr", "4e-3",
    "--optim.proj_lr", "1e-3",
    "--optim.text_layer_decay", "0.5",
]  # fmt: skip


GRAD_CACHE = ("--optim.grad_cache", "true", "--optim.micro_batch_size", "4", "--optim.grad_accum_steps", "2")


def expected_trainable(name: str, unlocked: int) -> bool:
    if not name.startswith("image_tower."):
        return True
    return unlocked == 1 and bool(re.match(r"image_tower\.trunk\.(blocks\.1\.|norm\.)", name))


def schedule_factor(step: int, total: int = 6, warmup: int = 1) -> float:
    """The TINY runs' warm-up + cosine (0-based optimizer step), written out."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def run_locked(out: Path, overrides: list[str], stage: int) -> dict:
    """tests/_train_harness.py under torchrun on 2 ranks with ``lock_report`` (as test_trainer.run_harness)."""
    from test_trainer import HARNESS, TINY, ZERO

    spec = {"overrides": [*TINY, "--run.output_dir", str(out / "runs"), *overrides], "out": str(out), "pool": 64,
            "ds": {"zero_optimization": ZERO[stage]}, "lock_report": True}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           HARNESS, str(out / "spec.json")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=clean_launcher_env())
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"harness exit {proc.returncode} ({out}):\n{proc.stderr[-4000:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {"ranks": ranks, "records": ranks[0]["records"], "dir": out, "run": Path(ranks[0]["summary"]["run_dir"])}


def locked_overrides(unlocked: int) -> list[str]:
    return [*LOCKED_RUN, "--model.image.lock.unlocked_blocks", str(unlocked)]


@pytest.fixture(scope="module")
def lock_runs(tmp_path_factory):
    base, cache = tmp_path_factory.mktemp("lock"), {}

    def get(stage: int, unlocked: int, extra: tuple[str, ...] = ()) -> dict:
        if (stage, unlocked, extra) not in cache:
            out = base / f"z{stage}_u{unlocked}_{len(cache)}"
            cache[stage, unlocked, extra] = run_locked(out, [*locked_overrides(unlocked), *extra], stage)
        return cache[stage, unlocked, extra]

    return get


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "stage,unlocked,extra", [(1, 0, ()), (2, 0, ()), (3, 0, ()), (2, 1, ()), (3, 1, ()), (3, 1, GRAD_CACHE)]
)
def test_frozen_parameters_stay_bit_identical_and_have_no_optimizer_state(lock_runs, stage, unlocked, extra):
    from safetensors.torch import load_file

    run = lock_runs(stage, unlocked, extra)
    assert [r["step"] for r in run["records"]] == [1, 2, 3, 4, 5, 6]
    initial = torch.load(run["dir"] / "initial.pt", weights_only=True)
    live = torch.load(run["dir"] / "probe_emb.pt", weights_only=True)["live"]
    # From the checkpoint, by zero_to_fp32 (ZeRO-1: the frozen tensors from the module weights, which it skips).
    export = load_file(str(run["run"] / "export" / "model.safetensors"))
    frozen = [k for k in initial if not expected_trainable(k, unlocked)]
    train = [k for k in initial if expected_trainable(k, unlocked)]
    assert frozen and train
    for k in frozen:
        assert torch.equal(live[k], initial[k]) and torch.equal(export[k], initial[k]), k
    for k in train:
        if initial[k].ndim >= 2:  # weights: every one moved (a bias with a zero gradient may not)
            assert not torch.equal(live[k], initial[k]), k
    # DeepSpeed's optimizer owns exactly the trainable parameters, and its Adam state covers only them.
    trainable_numel = sum(initial[k].numel() for k in train)
    world = len(run["ranks"])
    for rank in run["ranks"]:
        assert set(rank["optimizer_owned"]) == set(train)
    state = sum(r["optimizer_state_numel"] for r in run["ranks"])
    if stage in (1, 2):  # flat groups partitioned over the ranks, padded at the end
        assert state - sum(r["optimizer_padding"] for r in run["ranks"]) == trainable_numel
    else:  # every parameter partitioned on its own, padded to a multiple of the world size
        assert state == sum(math.ceil(initial[k].numel() / world) * world for k in train)


def expected_group_lrs(unlocked: int) -> list[float]:
    """The base lr of each optimizer group, in the optimizer's order, for LOCKED_RUN on the TINY model."""
    from test_trainer import TINY

    from rankclip_ds.trainer.optim import param_groups_from_config

    cfg = load_config(None, [*TINY, *LOCKED_RUN, "--model.image.lock.unlocked_blocks", str(unlocked)])
    return [g["lr"] for g in param_groups_from_config(build_model(cfg.model), cfg.optim)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3])
def test_every_group_steps_at_its_own_scheduled_rate_through_a_resume(lock_runs, stage, tmp_path):
    full = lock_runs(stage, 1)
    base = expected_group_lrs(1)
    # The image tower's last block and norm at image_lr 4e-3 (no image decay); the 1-layer text tower at lr 2e-3
    # decayed by 0.5 per layer (its layer 1: 1e-3, embeddings: 5e-4); projections 1e-3. Equal rates share a group.
    assert sorted(set(base)) == pytest.approx([5e-4, 1e-3, 4e-3]) and len(base) == 6
    for record in full["records"]:
        factor = schedule_factor(record["step"] - 1)
        assert record["group_lrs"] == pytest.approx([b * factor for b in base], rel=1e-9), record["step"]
    # The step-3 checkpoint copied into a fresh run folder, resumed there.
    src = full["run"] / "checkpoints" / "step_00000003"
    shutil.copytree(src, tmp_path / "shared" / full["run"].name / "checkpoints" / src.name)
    resume = ["--checkpoint.resume", "latest", "--run.output_dir", str(tmp_path / "shared")]
    resumed = run_locked(tmp_path / "b", [*locked_overrides(1), *resume], stage)
    assert [r["step"] for r in resumed["records"]] == [4, 5, 6]
    assert [r["group_lrs"] for r in resumed["records"]] == [r["group_lrs"] for r in full["records"][3:]]
    losses = [torch.tensor([r["loss"] for r in run["records"][-3:]]) for run in (resumed, full)]
    torch.testing.assert_close(*losses, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ layer ids
def test_layer_ids_of_the_clip_text_transformer_and_a_clip_vit():
    import timm
    from transformers import CLIPTextConfig, CLIPTextModel

    from rankclip_ds.model.layers import tower_layers

    text = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))  # fmt: skip
    layers = tower_layers(text)
    assert (layers.blocks, layers.depth) == ("encoder.layers", 3)
    for name, layer in layers.layer_of.items():
        if m := re.match(r"encoder\.layers\.(\d+)\.", name):
            assert layer == int(m[1]) + 1, name
        else:
            assert layer == (0 if name.startswith("embeddings.") else 4), name
    assert layers.layer_of["final_layer_norm.weight"] == 4
    vit = timm.create_model("vit_base_patch16_clip_224", num_classes=0, img_size=32, patch_size=8, depth=2,
                            embed_dim=32, num_heads=2)  # fmt: skip
    layers = tower_layers(vit)
    assert layers.layer_of["norm_pre.weight"] == 0 and layers.layer_of["blocks.1.attn.qkv.weight"] == 2
    assert layers.layer_of["norm.weight"] == 3
