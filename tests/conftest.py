"""Shared test set-up: offline Hugging Face, quiet tokenizers, a free-port helper for multi-process tests."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port that is free right now on the loopback interface (never a fixed port: tests run in parallel)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_launcher_env() -> dict[str, str]:
    """The current environment without any launcher variables, with the repo importable."""
    prefixes = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "MASTER_", "TORCHELASTIC", "CROSS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def launcher_env() -> dict[str, str]:
    return clean_launcher_env()
