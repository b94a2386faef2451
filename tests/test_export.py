"""The export format: ``config.json`` holds the model section under a format marker; old exports (the whole run
config) still load; only the model section is read and validated, from exports and from a run's ``config.yaml``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import TINY_MODEL
from rankclip_ds.config import Config, ConfigError, config_to_dict, load_config
from rankclip_ds.export import (
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_WEIGHTS,
    load_model,
    model_source_config,
    save_export,
)
from rankclip_ds.model import build_model, build_tokenizer


@pytest.fixture(scope="module")
def cfg() -> Config:
    # The data section names shards that exist nowhere: building the model must never look at them.
    return load_config(None, [*TINY_MODEL, "--data.train_data", "/nonexistent/shards/train-{000000..000099}.tar"])


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


def _embeddings(model) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokens = build_tokenizer("builtin:minilm")(["a red square", "two blue circles"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens["input_ids"], tokens["attention_mask"])


def _assert_same_model(loaded, model) -> None:
    for a, b in zip(_embeddings(loaded), _embeddings(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _write_export_config(folder, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EXPORT_CONFIG).write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------------ format 2
def test_export_holds_the_model_section_under_a_format_marker_and_loads_back(model, cfg, tmp_path):
    out = save_export(model.state_dict(), cfg.model, tmp_path / "export")
    data = json.loads((out / EXPORT_CONFIG).read_text())
    assert data == {"format": EXPORT_FORMAT, "model": config_to_dict(cfg.model)}
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_CONFIG, EXPORT_WEIGHTS]  # no temporary files left
    assert model_source_config(out) == cfg.model
    loaded, tokenizer = load_model(out, with_tokenizer=True)
    assert not loaded.training and tokenizer("a cat")["input_ids"]
    _assert_same_model(loaded, model)


def test_save_export_takes_the_model_section_not_the_run_config(model, cfg, tmp_path):
    with pytest.raises(TypeError, match=r"model_cfg is a Config, not a ModelConfig; pass .*cfg\.model"):
        save_export(model.state_dict(), cfg, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ------------------------------------------------------------------------------------------------ format 1
def test_an_old_export_with_the_whole_run_config_loads(model, cfg, tmp_path):
    """Format 1, as ``save_export(state, cfg, out)`` wrote it: the whole run config. Its other sections are not
    read: shards that do not exist here, and a key this version does not know, do not matter."""
    from safetensors.torch import save_file

    old = config_to_dict(cfg)
    old["data"]["a_removed_option"] = 3  # a field an older version had: the whole-config loader rejected it
    old["eval"]["zeroshot_data"] = "/nonexistent/eval"
    out = tmp_path / "old_export"
    _write_export_config(out, old)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / EXPORT_WEIGHTS))

    assert model_source_config(out) == cfg.model
    _assert_same_model(load_model(out), model)


def test_an_old_export_is_checked_in_its_model_section(tmp_path):
    _write_export_config(tmp_path, {"run": {"name": "x"}, "model": {"embed_dim": 0}, "data": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"config\.json: model\.embed_dim=0: must be > 0"):
        model_source_config(tmp_path)


# ------------------------------------------------------------------------------------------------ mistakes
@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"format": EXPORT_FORMAT, "model": {"embd_dim": 16}}, r"unknown config key 'model\.embd_dim': did you mean"),
        ({"format": EXPORT_FORMAT, "model": {"image": {"drop_path_rate": 2.0}}}, r"model\.image\.drop_path_rate=2"),
        ({"format": EXPORT_FORMAT, "model": []}, r"model=\[\]: must be a mapping"),
        ({"format": "rankclip_ds.export/9", "model": {}}, r"format='rankclip_ds\.export/9' is not one this version"),
        ({"format": EXPORT_FORMAT, "model": {}, "data": {}}, r"holds exactly 'format' and 'model'"),
        ({"format": EXPORT_FORMAT}, r"holds exactly 'format' and 'model'"),
        ({"architectures": ["BertModel"], "hidden_size": 384}, r"neither a 'format' marker nor a 'model' section"),
        ([1, 2], r"holds a list, not an export config"),
    ],
    ids=["unknown-key", "bad-value", "not-a-mapping", "unknown-format", "extra-key", "no-model", "hf-config", "list"],
)
def test_a_bad_export_config_names_the_file_the_key_and_the_fix(tmp_path, data, match):
    _write_export_config(tmp_path, data)
    with pytest.raises(ConfigError, match=match) as info:
        load_model(tmp_path)
    assert str(tmp_path / EXPORT_CONFIG) in str(info.value)


def test_a_damaged_or_missing_export_is_named(model, cfg, tmp_path):
    (tmp_path / EXPORT_CONFIG).write_text('{"format": ')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON .*re-export"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        load_model(tmp_path / "nowhere")
    out = save_export(model.state_dict(), cfg.model, tmp_path / "export")
    (out / EXPORT_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: missing; the export at .* is incomplete"):
        load_model(out)


# ------------------------------------------------------------------------------------------------ checkpoints
def _fake_checkpoint(run, config_data):
    """A run folder as the trainer leaves it, as far as the config lookup sees: ``config.yaml`` and a tag folder
    with a model-states file (its contents are never read here)."""
    tag = run / "checkpoints" / "step_00000006"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    (run / "config.yaml").write_text(yaml.safe_dump(config_data))
    return tag


def test_a_checkpoint_takes_the_model_section_of_its_run_config(cfg, tmp_path):
    data = config_to_dict(cfg)
    data["optim"]["lr"] = "not a number"  # the whole-config loader rejected this; building the model does not care
    data["data"]["a_removed_option"] = True
    assert model_source_config(_fake_checkpoint(tmp_path / "run", data)) == cfg.model


def test_a_checkpoint_without_a_model_section_gets_the_default_model(tmp_path):
    assert model_source_config(_fake_checkpoint(tmp_path / "run", {"run": {"name": "r"}})) == Config().model


def test_a_checkpoint_with_a_bad_model_section_names_its_run_config(cfg, tmp_path):
    data = config_to_dict(cfg)
    data["model"]["text"]["pooling"] = "max"
    with pytest.raises(ConfigError, match=r"config\.yaml: model\.text\.pooling='max': is not one of"):
        model_source_config(_fake_checkpoint(tmp_path / "run", data))
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="the run's resolved config is not beside checkpoint"):
        model_source_config(tmp_path / "run" / "checkpoints" / "step_00000006")
