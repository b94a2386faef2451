"""Every recipe and every DeepSpeed JSON validates; the DeepSpeed batch fields come from the typed config;
the dry run of every recipe prints its plan."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from rankclip_ds.config import Config, ConfigError, load_config, resolve_batch
from rankclip_ds.ds_config import build_deepspeed_config, load_deepspeed_json, validate_with_deepspeed
from rankclip_ds.train import main

RECIPES = sorted(str(p) for p in Path(REPO_ROOT, "configs").glob("*.yaml"))
DS_CONFIGS = sorted(str(p) for p in Path(REPO_ROOT, "ds_configs").glob("*.json"))


def test_the_required_files_exist():
    names = {Path(p).name for p in RECIPES}
    assert {"demo_cpu.yaml", "cc3m_vitb32_paper.yaml", "laion_vitb16_64k.yaml"} <= names
    ds_names = {Path(p).name for p in DS_CONFIGS}
    assert {"zero1.json", "zero2.json", "zero3.json", "zero2_offload.json", "zero3_offload.json"} <= ds_names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: Path(p).name)
def test_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: Path(p).name)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_ds_config_validates_with_deepspeed(path, precision):
    cfg = load_config(None, ["--run.precision", precision])
    ds = build_deepspeed_config(load_deepspeed_json(path), cfg, resolve_batch(cfg.optim, 4), source=path)
    validate_with_deepspeed(ds, source=path)
    assert ds["train_batch_size"] == 32 * 1 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 1
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["gradient_clipping"] == 1.0


def test_paper_recipe_values():
    cfg = load_config(Path(REPO_ROOT, "configs/cc3m_vitb32_paper.yaml"))
    assert cfg.model.image.name == "vit_base_patch32_224" and cfg.model.image.weights is None
    assert (cfg.schedule.epochs, cfg.schedule.warmup_steps) == (64, 10000)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == (5e-4, (0.9, 0.999), 1e-8, 0.1)
    assert cfg.optim.global_batch_size == 128
    text = Path(REPO_ROOT, "configs/cc3m_vitb32_paper.yaml").read_text()
    assert "[paper]" in text and "[assumed]" in text


BASE = {"zero_optimization": {"stage": 2}}


def one_rank():
    return resolve_batch(Config().optim, 1)


@pytest.mark.parametrize(
    ("ds_update", "match"),
    [
        (
            {"train_batch_size": 999},
            r"train_batch_size=999 contradicts .*optim.global_batch_size = micro 32 × accum 1 × "
            r"world 2.*\(64\)",
        ),
        (
            {"train_micro_batch_size_per_gpu": 8},
            r"train_micro_batch_size_per_gpu=8 contradicts .*micro_batch_size \(32\)",
        ),
        ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps=4 contradicts .*grad_accum_steps \(1\)"),
        ({"bf16": {"enabled": True}}, r"bf16.enabled=True contradicts the config's run.precision \(False\)"),
        ({"fp16": {"enabled": True}}, r"fp16.enabled=True contradicts"),
        ({"gradient_clipping": 0.5}, r"gradient_clipping=0.5 contradicts the config's optim.grad_clip \(1.0\)"),
        ({"optimizer": {"type": "Adam"}}, r"'optimizer' block.*AdamW with parameter groups"),
        ({"scheduler": {"type": "WarmupLR"}}, r"'scheduler' block"),
        ({"zero_optimization": {"stage": 4}}, r"zero_optimization.stage=4 does not exist"),
        ({"bf16": "yes"}, r"bf16 must be an object"),
    ],
)
def test_ds_json_contradictions_are_rejected(ds_update, match):
    ds = {**copy.deepcopy(BASE), **ds_update}
    with pytest.raises(ConfigError, match=match):
        build_deepspeed_config(ds, Config(), resolve_batch(Config().optim, 2))


def test_ds_json_matching_or_auto_batch_fields_are_accepted():
    ds = {**BASE, "train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1}
    out = build_deepspeed_config(ds, Config(), resolve_batch(Config().optim, 2))
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"]) == (64, 32)


def test_deepspeed_own_validation_catches_unknown_zero_keys():
    ds = build_deepspeed_config({"zero_optimization": {"stage": 2, "overlap_com": True}}, Config(), one_rank())
    with pytest.raises(ConfigError, match=r"DeepSpeed rejects this config.*overlap_com"):
        validate_with_deepspeed(ds)


def test_unknown_top_level_key_is_reported(caplog):
    build_deepspeed_config({**BASE, "zero_optimisation": {"stage": 3}}, Config(), one_rank())
    assert "zero_optimisation" in caplog.text


def test_bad_json_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_deepspeed_json(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ // comment\n}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_deepspeed_json(bad)


DRY_RUNS = [
    ("demo_cpu.yaml", "zero2.json", 2),
    ("cc3m_vitb32_paper.yaml", "zero2.json", 8),
    ("laion_vitb16_64k.yaml", "zero2.json", 256),
    ("laion_vitb16_64k.yaml", "zero3_offload.json", 1024),
]


@pytest.mark.parametrize(("recipe", "ds", "world"), DRY_RUNS, ids=lambda x: str(x))
def test_dry_run_of_every_recipe(recipe, ds, world, capsys):
    rc = main(
        [
            "--deepspeed",
            str(Path(REPO_ROOT, "ds_configs", ds)),
            "--config",
            str(Path(REPO_ROOT, "configs", recipe)),
            "--dry-run",
            "--dry-run-world-size",
            str(world),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"world size        {world}" in out
    assert re.search(r"image tower .*: \d+\.\d+ M parameters", out)
    assert re.search(r"text tower .*: \d+\.\d+ M parameters", out)
    assert re.search(r"global batch \d+ = micro \d+ × accum \d+ × world " + str(world), out)
    assert re.search(r"loss memory/rank  \d+\.\d (KiB|MiB|GiB)", out), out
    resolved = json.loads(out[out.index("DeepSpeed config (resolved):") + len("DeepSpeed config (resolved):") :])
    assert (
        resolved["train_batch_size"]
        == resolved["train_micro_batch_size_per_gpu"] * world * resolved["gradient_accumulation_steps"]
    )


def test_dry_run_parameter_counts_match_known_sizes(capsys):
    main(["--config", str(Path(REPO_ROOT, "configs/cc3m_vitb32_paper.yaml")), "--dry-run", "--dry-run-world-size", "1"])
    out = capsys.readouterr().out
    # timm's ViT-B/32 without its head has 87.4 M parameters (87.85 M with the 1000-class head).
    assert "image tower       vit_base_patch32_224: 87.4" in out


def test_dry_run_reports_config_errors(capsys):
    rc = main(["--dry-run", "--optim.lr", "-1"])
    assert rc == 2
    assert "optim.lr=-1" in capsys.readouterr().err
    rc = main(["--dry-run", "--model.image.name", "vit_bogus_patch99"])
    assert rc == 2
    assert "model.image.name='vit_bogus_patch99' is not a timm model" in capsys.readouterr().err
    rc = main(
        [
            "--dry-run",
            "--deepspeed",
            str(Path(REPO_ROOT, "ds_configs/zero2.json")),
            "--optim.micro_batch_size",
            "null",
            "--optim.global_batch_size",
            "10",
            "--dry-run-world-size",
            "4",
        ]
    )
    assert rc == 2
    assert "not divisible" in capsys.readouterr().err


def test_continue_from_clip_recipe_derives_openai_vitb16_without_contradictions(tmp_path, monkeypatch):
    """The recipe names a hub id, which tests never download: its fields are checked against the architecture of
    openai/clip-vit-base-patch16 (its config.json's sizes), and offline with an empty cache the pre-flight's only
    init_from problem is the miss, naming the command that fills the cache."""
    from huggingface_hub import constants
    from transformers import CLIPConfig

    from rankclip_ds.model.clip_arch import arch_from_hf_config
    from rankclip_ds.model.clip_init import _contradictions, check_init_from

    cfg = load_config(Path(REPO_ROOT, "configs/continue_from_clip_vitb16.yaml"))
    assert cfg.model.init_from == "openai/clip-vit-base-patch16" and cfg.model.open_clip_name is None
    openai_vitb16 = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, patch_size=16
        ),
        projection_dim=512,
    )
    arch = arch_from_hf_config(openai_vitb16)
    assert (arch.image_name, arch.model_kwargs, arch.image_size, arch.context_length) == (
        "vit_base_patch16_clip_quickgelu_224",
        {},
        224,
        77,
    )
    assert _contradictions(cfg.model, arch, tmp_path) == []
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (problem,) = check_init_from(cfg.model)
    assert problem.machine and "hf download openai/clip-vit-base-patch16" in problem.message
