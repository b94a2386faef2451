"""The house's import rules (docs/architecture.md), read from the source: which package may import which."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGE = Path(REPO_ROOT) / "rankclip_ds"
ENTRY = {"trainer", "preflight", "dry_run", "train"}
LIBRARIES = ("config", "model", "losses", "data", "evaluate")


def imported_parts(path: Path) -> set[str]:
    """The top-level parts of ``rankclip_ds`` that module ``path`` imports (absolute or relative imports)."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("rankclip_ds", "model", "towers")
    parts: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module[: len(module) - node.level]  # the module's package, then up (``__init__`` too)
                target = ".".join(base + ((node.module,) if node.module else ()))
                names = [target] + ([f"{target}.{a.name}" for a in node.names] if not node.module else [])
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            bits = name.split(".")
            if bits[0] == "rankclip_ds" and len(bits) > 1:
                parts.add(bits[1])
    return parts


def modules_of(part: str) -> list[Path]:
    path = PACKAGE / part
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


@pytest.mark.parametrize("library", LIBRARIES)
def test_libraries_never_import_the_entry_level(library):
    for path in modules_of(library):
        bad = imported_parts(path) & ENTRY
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


def test_the_model_never_imports_the_config_and_the_loss_nothing_else():
    for path in modules_of("model"):
        assert "config" not in imported_parts(path), path
    for path in modules_of("losses"):
        assert imported_parts(path) <= {"losses"}, (path, imported_parts(path))
    assert imported_parts(PACKAGE / "problems.py") == set()


def test_the_trainer_never_imports_the_entry_points():
    for path in modules_of("trainer"):
        bad = imported_parts(path) & {"preflight", "dry_run", "train"}
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


def test_the_rule_checker_sees_relative_and_absolute_imports(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import is found in both forms."""
    (tmp_path / "rankclip_ds" / "model").mkdir(parents=True)
    planted = tmp_path / "rankclip_ds" / "model" / "planted.py"
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "rankclip_ds")
    planted.write_text("from ..trainer.setup import start_process\nimport rankclip_ds.config\n")
    assert imported_parts(planted) == {"trainer", "config"}
    init = tmp_path / "rankclip_ds" / "model" / "__init__.py"
    init.write_text("from ..preflight import run_preflight\nfrom .towers import TextTower\n")
    assert imported_parts(init) == {"preflight", "model"}
