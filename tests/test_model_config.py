"""The model's schema lives in ``rankclip_ds.model``: the config package imports it (and stays light), the model
package imports nothing of the config package, ``architecture_only`` and the tower checks take the sections."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import rankclip_ds.config
import rankclip_ds.model
from conftest import REPO_ROOT, clean_launcher_env
from rankclip_ds.config import ConfigError, field_docs, load_config
from rankclip_ds.model import ImageTowerConfig, ModelConfig, TextTowerConfig, architecture_only
from rankclip_ds.model.checks import check_image_tower, check_text_tower

MODEL_PACKAGE = Path(rankclip_ds.model.__file__).parent


def test_the_config_package_re_exports_the_model_schema():
    assert rankclip_ds.config.ModelConfig is ModelConfig
    assert rankclip_ds.config.ImageTowerConfig is ImageTowerConfig
    assert rankclip_ds.config.TextTowerConfig is TextTowerConfig
    cfg = load_config(None, ["--model.image.image_size", "160", "--model.text.pooling", "cls"])
    assert isinstance(cfg.model, ModelConfig) and cfg.model.image.image_size == 160 and cfg.model.text.pooling == "cls"
    assert field_docs(ModelConfig)["embed_dim"].startswith("Shared embedding size")


def _imported_modules(path: Path) -> list[str]:
    """The absolute names of the modules ``path`` (a module of rankclip_ds.model) imports from this package."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = "rankclip_ds.model" if node.level == 1 else "rankclip_ds"
            names.append(f"{base}.{node.module}" if node.module else base)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rankclip_ds"):
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.startswith("rankclip_ds")]
    return names


@pytest.mark.parametrize("module", sorted(p.name for p in MODEL_PACKAGE.glob("*.py")))
def test_the_model_package_imports_nothing_of_the_config_package(module):
    imported = _imported_modules(MODEL_PACKAGE / module)
    offending = [m for m in imported if m == "rankclip_ds.config" or m.startswith("rankclip_ds.config.")]
    assert not offending, f"rankclip_ds/model/{module} imports the config package: {offending}"


def test_loading_the_config_does_not_import_torch():
    code = "import sys, rankclip_ds.config, rankclip_ds.model.checks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_launcher_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_help_config_prints_the_model_fields_with_their_docs():
    cmd = [sys.executable, "rankclip_ds/train.py", "--help-config"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=clean_launcher_env(), cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for key, doc in [
        ("--model.image.name", "Any timm model name"),
        ("--model.text.pooling", "How token states become one vector"),
        ("--model.embed_dim", "Shared embedding size"),
    ]:
        i = next(i for i, line in enumerate(lines) if line.startswith(key + " "))
        assert lines[i + 1].strip().startswith(doc), lines[i : i + 2]


def test_architecture_only_switches_off_weight_loading_and_compile():
    model_cfg = ModelConfig(
        image=ImageTowerConfig(weights="/somewhere/vit.safetensors", model_kwargs={"depth": 2}),
        text=TextTowerConfig(overrides={"num_hidden_layers": 2}),
        embed_dim=64,
        compile=True,
    )
    arch = architecture_only(model_cfg)
    assert arch.image.weights is None and arch.text.pretrained is False and arch.compile is False
    assert (
        arch.embed_dim == 64
        and arch.image.model_kwargs == {"depth": 2}
        and arch.text.overrides == model_cfg.text.overrides
    )
    # The original is untouched and shares no mutable state with the copy.
    assert model_cfg.image.weights == "/somewhere/vit.safetensors" and model_cfg.text.pretrained and model_cfg.compile
    arch.image.model_kwargs["depth"] = 3
    assert model_cfg.image.model_kwargs == {"depth": 2}


def test_the_sections_validate_themselves():
    with pytest.raises(ConfigError, match=r"model\.embed_dim=0: must be > 0"):
        ModelConfig(embed_dim=0)
    with pytest.raises(ConfigError, match=r"model\.text\.overrides=.*change tensor shapes"):
        TextTowerConfig(overrides={"hidden_size": 64})


def test_the_tower_checks_take_their_section_alone(tmp_path):
    assert check_image_tower(ImageTowerConfig()) == []
    assert check_text_tower(TextTowerConfig()) == []
    (problem,) = check_image_tower(ImageTowerConfig(name="vit_tiny_patch16_24"))
    assert problem.field == "model.image.name" and "did you mean vit_tiny_patch16_224" in problem.message
    (problem,) = check_image_tower(ImageTowerConfig(weights=str(tmp_path / "missing.pth")))
    assert problem.field == "model.image.weights" and problem.machine
    problems = check_text_tower(TextTowerConfig(overrides={"num_layerz": 2}, max_length=4096))
    assert [p.field for p in problems] == ["model.text.overrides.num_layerz", "model.text.max_length"]
    (problem,) = check_text_tower(TextTowerConfig(name_or_path=str(tmp_path / "nowhere")))
    assert problem.field == "model.text.name_or_path" and "no such folder on this machine" in problem.message
