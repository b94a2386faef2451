"""Shared test set-up: offline Hugging Face, quiet tokenizers, a free-port helper for multi-process tests."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from typing import NoReturn

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A dual encoder small enough for multi-process CPU tests: a 1-block ViT at 32 px and a 1-layer BERT from scratch.
TINY_MODEL = [
    "--model.image.image_size", "32",
    "--model.image.model_kwargs", "{patch_size: 8, depth: 1}",
    "--model.text.pretrained", "false",
    "--model.text.overrides", "{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}",
    "--model.embed_dim", "16",
]  # fmt: skip


def skip_unless_ci(reason: str) -> NoReturn:
    """Skip the test because a service or tool it needs is missing here, or, under ``CI=true``, fail it: CI installs
    every one of them (Slurm, munge, shellcheck, ...), so a missing one there is a broken set-up that a skip would
    hide, with the test it guards silently not run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing requirement is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def openai_clip_tokenizer():
    """OpenAI's CLIP tokenizer as transformers' ``CLIPTokenizer``, built from open_clip's ``SimpleTokenizer`` tables
    (the same vocabulary and merges, named the Hugging Face way): the tests' independent reference, not the
    product's builder (``rankclip_ds.model.clip_source``)."""
    import open_clip
    import transformers

    simple = open_clip.SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): i for token, i in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77
    return tokenizer


def tiny_clip_config(*, intermediate: int, projection: int, image_size: int = 32):
    """A tiny ``transformers.CLIPConfig`` (width 32, 2 layers, 4 heads, 8-px patches; OpenAI's 49408-token
    vocabulary, so the real CLIP tokenizer applies)."""
    import transformers

    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=intermediate)
    return transformers.CLIPConfig(
        text_config=tower,
        vision_config=dict(tower, image_size=image_size, patch_size=8),
        projection_dim=projection,
    )


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


def run_ranks(
    argv: Callable[[int], list[str]], *, world: int = 2, env: dict | None = None, timeout: float = 240
) -> list[str]:
    """Runs ``argv(rank)`` for every rank as a separate process with the env:// launcher variables (a fresh port),
    waits for all of them (killing the rest after ``timeout``) and fails the test unless every one exited 0;
    returns their combined stdout/stderr, by rank."""
    base = {**clean_launcher_env(), **(env or {}), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1"}
    base["MASTER_PORT"] = str(free_port())
    procs = [
        subprocess.Popen(
            argv(rank), env={**base, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for rank in range(world)
    ]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return logs


@pytest.fixture
def launcher_env() -> dict[str, str]:
    return clean_launcher_env()


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """A small embedded synthetic dataset (256 training scenes, 64 held-out, 32 px) shared by the tests that run
    the real entry point: ``train/synth-train-{000000..000003}.tar``, ``zeroshot/synth-zs-000000.tar``."""
    from rankclip_ds.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(out, num_train=256, num_zeroshot=64, image_size=32, samples_per_shard=64, seed=0)
    return out
