"""Every bad configuration fails before any heavy work, with a message naming the field, the value and the fix.

Each mistake goes through the real entry point, ``rankclip_ds.train.main``, in this process, with the Trainer,
``deepspeed.initialize`` and every process-group initialisation replaced by functions that fail the test: exit
code 2 then proves the mistake was caught by the config loader or the pre-flight, before the process group, the
model or the data loader existed. World-size mistakes set the launcher's environment as torchrun would.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO_ROOT, TINY_MODEL, free_port
from rankclip_ds.config import ConfigError, load_config
from rankclip_ds.ds_config import load_deepspeed_json
from rankclip_ds.preflight import preflight, run_preflight
from rankclip_ds.train import main

ZERO2 = str(Path(REPO_ROOT, "ds_configs", "zero2.json"))
LAUNCHER_PREFIXES = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "MASTER_", "TORCHELASTIC", "CROSS_", "OMPI_")
TRAIN_SHARDS = "{shards}/train/synth-train-{{000000..000003}}.tar"  # 256 samples in 4 shards, with a manifest
ZEROSHOT_SHARDS = "{shards}/zeroshot/synth-zs-{{000000..000000}}.tar"


def _fp16_supported_here() -> str | None:
    """Skip reason when this machine's DeepSpeed accelerator supports fp16 (so the mistake is not one here)."""
    import torch

    if torch.cuda.is_available():
        return "the precision check is skipped on CUDA machines (it would open a context on GPU 0)"
    from deepspeed.accelerator import get_accelerator

    return "this machine supports fp16" if get_accelerator().is_fp16_supported() else None


@dataclass(frozen=True)
class Mistake:
    """One bad configuration and what its error must say. ``{tmp}`` and ``{shards}`` in ``args`` and ``expect``
    stand for the test's folder and the synthetic dataset."""

    name: str
    args: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()
    """Fragments that must all be on stderr: the field, the bad value, a word of the fix."""
    ds: dict[str, Any] | None = None
    """A DeepSpeed JSON written to ``{tmp}/ds.json``; None: ds_configs/zero2.json."""
    world: int = 1
    make: tuple[str, ...] = ()
    """Paths created under ``{tmp}`` first: ``dir/`` a folder, anything else an empty file."""
    skip: Callable[[], str | None] | None = None


MISTAKES = [
    # --- named in the issue
    Mistake("zero learning rate", ("--optim.lr", "0"), ("optim.lr=0.0", "must be > 0", "positive")),
    Mistake("negative learning rate", ("--optim.lr", "-1e-4"), ("optim.lr=-0.0001", "must be > 0", "positive")),
    Mistake(
        "global batch not divisible by the world size",
        ("--optim.micro_batch_size", "null", "--optim.global_batch_size", "30"),
        ("optim.global_batch_size=30", "not divisible", "1 × 4 = 4", "multiple of 4"),
        world=4,
    ),
    Mistake(
        "ZeRO stage 4",
        expect=("{tmp}/ds.json: zero_optimization.stage=4", "does not exist", "zero1.json"),
        ds={"zero_optimization": {"stage": 4}},
    ),
    Mistake(
        "shard pattern that matches nothing",
        ("--data.train_data", "{tmp}/missing/shard-{{000..003}}.tar"),
        ("data.train_data='{tmp}/missing/shard-{{000..003}}.tar'", "matches no file", "brace range"),
    ),
    Mistake(
        "unknown timm model",
        ("--model.image.name", "vit_tiny_patch16_244"),
        ("model.image.name='vit_tiny_patch16_244' is not a timm model", "did you mean", "vit_tiny_patch16_224"),
    ),
    Mistake(
        "missing text model path",
        ("--model.text.name_or_path", "{tmp}/no_such_model"),
        ("model.text.name_or_path='{tmp}/no_such_model'", "no such folder", "save_pretrained"),
    ),
    Mistake(
        "DeepSpeed JSON micro batch contradicts the config",
        expect=("train_micro_batch_size_per_gpu=8", "optim.micro_batch_size (16)", "remove"),
        ds={"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8},
    ),
    Mistake(
        "DeepSpeed JSON train_batch_size contradicts micro × accum × world",
        expect=("train_batch_size=16", "micro 16 × accum 1 × world 2 (32)", "remove train_batch_size"),
        ds={"zero_optimization": {"stage": 2}, "train_batch_size": 16},
        world=2,
    ),
    Mistake(
        "fp16 and bf16 both on",
        expect=("{tmp}/ds.json", "bf16.enabled=true and fp16.enabled=true", "--run.precision"),
        ds={"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "fp16": {"enabled": True}},
    ),
    Mistake(
        "chunk size larger than the local batch",
        ("--loss.chunk_size", "32"),
        ("loss.chunk_size=32", "larger than the loss's local batch", "<= 16"),
    ),
    Mistake(
        "top-K of zero",
        ("--loss.impl", "top_k", "--loss.top_k", "0"),
        ("loss.top_k=0", "positive integer", "K >= 1"),
    ),
    # --- more batch and schedule arithmetic
    Mistake(
        "global batch contradicts micro × accum × world",
        ("--optim.global_batch_size", "32"),
        ("optim.global_batch_size=32", "16 × 1 × 4 = 64", "micro_batch_size=null"),
        world=4,
    ),
    Mistake(
        "chunk size larger than the local batch derived from the global batch",
        ("--optim.micro_batch_size", "null", "--optim.global_batch_size", "64", "--loss.chunk_size", "32"),
        ("loss.chunk_size=32", "16 rows", "over 4 ranks", "<= 16"),
        world=4,
    ),
    Mistake(
        "warm-up as long as the run",
        ("--schedule.warmup_steps", "4"),
        ("schedule.warmup_steps=4", "total_steps=4", "never decay", "< 4"),
    ),
    Mistake(
        "warm-up as long as an epochs-based run",
        ("--schedule.total_steps", "null", "--schedule.epochs", "1", "--schedule.warmup_steps", "16"),
        ("schedule.warmup_steps=16", "16 steps per epoch (256 samples)", "< 16"),
    ),
    Mistake(
        "an epoch shorter than one optimizer step",
        ("--optim.grad_accum_steps", "32"),
        ("data.train_data=", "holds 256 samples", "accum 32", "grad_accum_steps"),
    ),
    Mistake(
        "resampled virtual epoch shorter than one step",
        ("--data.mode", "resampled", "--data.samples_per_epoch", "8"),
        ("data.samples_per_epoch=8", "global batch", ">= 16"),
    ),
    Mistake(
        "more data streams than samples in a global batch",
        ("--data.streams", "17"),
        ("data.streams=17", "larger than the global batch", "data.streams <= 16"),
    ),
    Mistake("zero data streams", ("--data.streams", "0"), ("data.streams=0", "must be >= 1", "null")),
    # --- more of the DeepSpeed JSON
    Mistake(
        "optimizer block in the DeepSpeed JSON",
        expect=("{tmp}/ds.json", "'optimizer' block", "remove 'optimizer'"),
        ds={"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}},
    ),
    Mistake(
        "misspelt ZeRO key",
        expect=("zero_optimization.overlap_com=True", "DeepSpeed rejects it", "did you mean 'overlap_comm'"),
        ds={"zero_optimization": {"stage": 2, "overlap_com": True}},
    ),
    Mistake(
        "unknown offload device",
        expect=("zero_optimization.offload_optimizer.device='gpu'", "DeepSpeed rejects it", "'cpu'"),
        ds={"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}},
    ),
    # --- more of the model
    Mistake(
        "unknown timm pretrained tag",
        ("--model.image.name", "vit_tiny_patch16_224.bogus"),
        ("model.image.name='vit_tiny_patch16_224.bogus'", "no tag 'bogus'", "vit_tiny_patch16_224.augreg"),
    ),
    Mistake(
        "missing image weights file",
        ("--model.image.weights", "{tmp}/vit.safetensors"),
        ("model.image.weights='{tmp}/vit.safetensors'", "no such file", "null"),
    ),
    Mistake(
        "text model folder without config.json",
        ("--model.text.name_or_path", "{tmp}/text_model"),
        ("model.text.name_or_path='{tmp}/text_model'", "config.json", "save_pretrained"),
        make=("text_model/",),
    ),
    Mistake(
        "misspelt text config override",
        ("--model.text.overrides", "{{num_hidden_layer: 1}}"),
        ("model.text.overrides.num_hidden_layer=1", "has no field", "did you mean 'num_hidden_layers'"),
    ),
    Mistake(
        "text max_length beyond the position embeddings",
        ("--model.text.max_length", "1024"),
        ("model.text.max_length=1024", "max_position_embeddings=512", "<= 512"),
    ),
    Mistake(
        "precision the device does not support",
        ("--run.precision", "fp16"),
        ("run.precision='fp16'", "does not support fp16", "run.precision=bf16"),
        skip=_fp16_supported_here,
    ),
    # --- more of the data
    Mistake(
        "caption key that is neither an extension nor json:FIELD",
        ("--data.caption_key", "json"),
        ("data.caption_key='json'", "json:FIELD"),
    ),
    Mistake(
        "missing zero-shot data",
        ("--eval.zeroshot_data", "{tmp}/zs/zs-{{000..001}}.tar"),
        ("eval.zeroshot_data='{tmp}/zs/zs-{{000..001}}.tar'", "matches no file", "eval.zeroshot_data=null"),
    ),
    Mistake(
        "missing class names file",
        ("--eval.zeroshot_data", ZEROSHOT_SHARDS, "--eval.classnames", "{tmp}/classes.txt"),
        ("eval.classnames='{tmp}/classes.txt'", "does not exist", "one class name per line"),
    ),
    Mistake(
        "missing templates file",
        ("--eval.zeroshot_data", ZEROSHOT_SHARDS, "--eval.templates", "{tmp}/templates.txt"),
        ("eval.templates='{tmp}/templates.txt'", "neither 'openai'", "a photo of"),
    ),
    # --- the GPU speed switches
    Mistake(
        "fused AdamW with the optimizer offloaded to the CPU",
        ("--optim.fused", "true"),
        ("optim.fused=True", "offloads the optimizer to the CPU", "set optim.fused to auto or false"),
        ds={"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
    ),
    Mistake(
        "optim.fused neither auto nor a boolean",
        ("--optim.fused", "fast"),
        ("optim.fused='fast'", "is not one of ['auto', True, False]"),
    ),
    Mistake(
        "text attention implementation that is not offered",
        ("--model.text.attn_implementation", "flash_attention_2"),
        ("model.text.attn_implementation='flash_attention_2'", "is not one of ['sdpa', 'eager']"),
    ),
    Mistake(
        "peak TFLOP/s that is not positive",
        ("--logging.peak_tflops", "0"),
        ("logging.peak_tflops=0.0", "must be > 0", "positive"),
    ),
    # --- the run folder and the checkpoint
    Mistake(
        "resume from an unfinished checkpoint",
        ("--checkpoint.resume", "{tmp}/ckpt/step_00000002"),
        ("checkpoint.resume='{tmp}/ckpt/step_00000002'", "no COMPLETE marker", "'latest'"),
        make=("ckpt/step_00000002/",),
    ),
    Mistake(
        "resume from a checkpoints folder instead of one checkpoint",
        ("--checkpoint.resume", "{tmp}/ckpt"),
        ("checkpoint.resume='{tmp}/ckpt'", "checkpoints folder", "{tmp}/ckpt/step_00000002"),
        make=("ckpt/step_00000002/COMPLETE", "ckpt/latest"),
    ),
    Mistake(
        "run.output_dir is a file",
        ("--run.output_dir", "{tmp}/runs.txt"),
        ("run.output_dir='{tmp}/runs.txt'", "is a file", "choose another run.output_dir"),
        make=("runs.txt",),
    ),
]


def base_args(tmp_path: Path, shards: Path) -> list[str]:
    """A good, tiny training configuration (the mistakes' arguments come after it and win)."""
    return [
        *TINY_MODEL,
        "--run.output_dir", str(tmp_path / "runs"),
        "--data.train_data", TRAIN_SHARDS.format(shards=shards),
        "--data.num_workers", "0",
        "--optim.micro_batch_size", "16",
        "--schedule.total_steps", "4",
        "--schedule.warmup_steps", "1",
    ]  # fmt: skip


def set_launcher(monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    """This process as rank 0 of ``world`` under torchrun (only the environment: nothing rendezvous)."""
    for name in list(os.environ):
        if name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    if world > 1:
        env = {
            "RANK": 0,
            "WORLD_SIZE": world,
            "LOCAL_RANK": 0,
            "LOCAL_WORLD_SIZE": world,
            "GROUP_RANK": 0,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": free_port(),
            "TORCHELASTIC_RUN_ID": "preflight-test",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))


@pytest.fixture
def no_heavy_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt at heavy work (the Trainer, DeepSpeed's engine, a process group) fails the test."""
    import deepspeed
    import torch.distributed

    import rankclip_ds.dist
    import rankclip_ds.trainer

    def refuse(what: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{what} was called: the mistake was not caught before heavy work")

        return call

    monkeypatch.setattr(rankclip_ds.trainer, "Trainer", refuse("Trainer"))
    monkeypatch.setattr(deepspeed, "initialize", refuse("deepspeed.initialize"))
    monkeypatch.setattr(deepspeed, "init_distributed", refuse("deepspeed.init_distributed"))
    monkeypatch.setattr(torch.distributed, "init_process_group", refuse("torch.distributed.init_process_group"))
    monkeypatch.setattr(rankclip_ds.dist, "init_distributed", refuse("init_distributed"))


def _fill(text: str, tmp_path: Path, shards: Path) -> str:
    return text.format(tmp=tmp_path, shards=shards)


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_mistake_fails_before_heavy_work(mistake, tmp_path, shards, monkeypatch, capsys, no_heavy_work):
    reason = mistake.skip() if mistake.skip else None
    if reason:
        pytest.skip(reason)
    set_launcher(monkeypatch, mistake.world)
    for rel in mistake.make:
        path = tmp_path / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
    ds = ZERO2
    if mistake.ds is not None:
        ds = str(tmp_path / "ds.json")
        Path(ds).write_text(json.dumps(mistake.ds))
    args = [_fill(a, tmp_path, shards) for a in mistake.args]

    rc = main(["--deepspeed", ds, *base_args(tmp_path, shards), *args])

    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("config error: "), err
    for fragment in mistake.expect:
        assert _fill(fragment, tmp_path, shards) in err, f"{fragment!r} not in:\n{err}"
    assert not (tmp_path / "runs").exists(), "the run folder was created before the configuration was checked"


def test_the_table_covers_enough_distinct_mistakes():
    names = [m.name for m in MISTAKES]
    assert len(set(names)) == len(names) >= 18


def test_good_config_passes_preflight_silently(tmp_path, shards, monkeypatch, capsys, no_heavy_work):
    """No problem, no output, and nothing heavy: the pre-flight builds no model, tokenizer or engine, starts no
    process group (``no_heavy_work``) and opens no image or shard (it reads names, config.json files, manifests
    and folder entries only). Each of those is replaced by a function that fails the test."""
    import tarfile

    import PIL.Image
    import timm
    import transformers

    import rankclip_ds.model

    def refuse(what: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"the pre-flight called {what}: it must only read names and small files")

        return call

    args = [*base_args(tmp_path, shards), "--model.text.pretrained", "true", "--model.text.overrides", "{}",
            "--eval.zeroshot_data", ZEROSHOT_SHARDS.format(shards=shards),
            "--eval.templates", f"{shards}/zeroshot/templates.txt"]  # fmt: skip
    cfg = load_config(None, args)
    ds_json = load_deepspeed_json(ZERO2)
    from deepspeed.accelerator import get_accelerator

    get_accelerator()  # DeepSpeed prints a banner on its first call, in whichever test comes first: not ours
    capsys.readouterr()
    for target, name in [
        (timm, "create_model"),
        (transformers.AutoModel, "from_pretrained"),
        (transformers.AutoModel, "from_config"),
        (transformers.AutoTokenizer, "from_pretrained"),
        (rankclip_ds.model, "build_model"),
        (rankclip_ds.model, "build_tokenizer"),
        (PIL.Image, "open"),
        (tarfile, "open"),
    ]:
        monkeypatch.setattr(target, name, refuse(f"{getattr(target, '__name__', target)}.{name}"))
    for world in (1, 2, 4):
        assert preflight(cfg, ds_json, world, ds_source=ZERO2)[1] == []
    run = run_preflight(cfg, ds_json, 2, ds_source=ZERO2)  # what the trainer is built from
    assert (run.world_size, run.batch.global_batch_size, run.zero_stage) == (2, 32, 2)
    assert run.deepspeed["train_micro_batch_size_per_gpu"] == 16
    out = capsys.readouterr()
    assert out.out == "" and "error" not in out.err.lower()


def test_independent_mistakes_are_reported_together(tmp_path, shards, monkeypatch, capsys, no_heavy_work):
    set_launcher(monkeypatch, 2)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    (tmp_path / "ckpt").mkdir()
    rc = main([
        "--deepspeed", str(ds), *base_args(tmp_path, shards),
        "--model.image.name", "vit_bogus_patch99",
        "--data.train_data", str(tmp_path / "none-{000..003}.tar"),
        "--checkpoint.resume", str(tmp_path / "ckpt"),
        "--model.text.max_length", "1024",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "config error: 5 problems found before starting:" in err, err
    lines = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(lines) == 5, err
    for line, field in zip(
        lines,
        [f"{ds}: zero_optimization.stage=4", "model.image.name=", "model.text.max_length=", "data.train_data=",
         "checkpoint.resume="],
        strict=True,
    ):  # fmt: skip
        assert field in line and "Fix:" in line, line


def test_json_mistakes_show_even_when_the_batch_does_not_resolve(tmp_path, shards):
    """The JSON is checked against a probe batch when the real one fails, so fixing one mistake does not just
    reveal the next."""
    batch = ["--optim.micro_batch_size", "null", "--optim.global_batch_size", "30"]
    cfg = load_config(None, [*base_args(tmp_path, shards), *batch])
    ds = {"zero_optimization": {"stage": 4}, "bf16": {"enabled": True}, "fp16": {"enabled": True}}
    fields = [p.field for p in preflight(cfg, ds, 4, ds_source="x.json")[1]]
    assert fields == [
        "optim.global_batch_size",
        "bf16.enabled / fp16.enabled in x.json",
        "zero_optimization.stage in x.json",
    ]
    with pytest.raises(ConfigError) as err:
        run_preflight(cfg, ds, 4, ds_source="x.json")
    assert str(err.value).startswith("3 problems found before starting:\n  - optim.global_batch_size=30")


def test_dry_run_reports_preflight_errors_before_building_the_model(tmp_path, monkeypatch, capsys):
    import rankclip_ds.model

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the dry run built the model before checking the configuration")

    monkeypatch.setattr(rankclip_ds.model, "build_model", refuse)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_com": True}}))
    rc = main(["--dry-run", "--dry-run-world-size", "4", "--deepspeed", str(ds),
               "--model.image.name", "vit_bogus_patch99", "--model.text.max_length", "1024"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "3 problems found before starting" in err
    assert "did you mean 'overlap_comm'" in err
    assert "model.image.name='vit_bogus_patch99' is not a timm model" in err
    assert "model.text.max_length=1024" in err


def test_dry_run_notes_what_this_machine_lacks(tmp_path, monkeypatch, capsys):
    """A dry run may plan on a machine without the data: it prints the plan and notes the missing shards."""
    set_launcher(monkeypatch, 1)
    rc = main(["--dry-run", "--deepspeed", ZERO2, *TINY_MODEL, "--run.output_dir", str(tmp_path / "runs"),
               "--data.train_data", str(tmp_path / "cc3m-{0000..0331}.tar")])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "note: not ready on this machine" in out
    assert f"data.train_data='{tmp_path}/cc3m-{{0000..0331}}.tar'" in out


class _FakeMetrics:
    closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("outcome", ["training error", "config error from the trainer", "success"])
def test_trainer_failures_become_exit_codes(outcome, tmp_path, shards, monkeypatch, capsys):
    """A TrainingError exits 1 with its rank and message, and skips close()'s barrier (ranks may disagree after a
    failure); a ConfigError the trainer finds exits 2; success closes normally. Signal handlers are restored."""
    import rankclip_ds.trainer
    from rankclip_ds.trainer import errors
    from rankclip_ds.trainer.errors import CheckpointWriteError

    made: list[Any] = []

    class FakeTrainer:
        def __init__(self, cfg, run, info):
            if outcome == "config error from the trainer":
                raise ConfigError("optim.global_batch_size: the checkpoint was trained with a global batch of 64")
            self.metrics = _FakeMetrics()
            self.closed = False
            made.append(self)

        def train(self, stop):
            if outcome == "training error":
                raise CheckpointWriteError("checkpoint step_00000004: disk full on rank 0. Fix: free space")
            return {"steps": 4, "seconds": 1.0, "run_dir": "r", "checkpoint": "c", "export": None, "eval": None,
                    "stopped_by_signal": None}  # fmt: skip

        def close(self, barrier: bool = True):
            if outcome == "training error" and barrier:
                raise AssertionError("close() with its barrier called after a TrainingError")
            self.metrics.close()
            self.closed = True

    set_launcher(monkeypatch, 1)
    monkeypatch.setattr(rankclip_ds.trainer, "Trainer", FakeTrainer)
    before = signal.getsignal(signal.SIGTERM)
    rc = main(["--deepspeed", ZERO2, *base_args(tmp_path, shards)])
    captured = capsys.readouterr()
    assert signal.getsignal(signal.SIGTERM) is before
    if outcome == "training error":
        assert rc == errors.TRAINING_ERROR_EXIT_CODE == 1
        assert "error (rank 0): checkpoint step_00000004: disk full on rank 0" in captured.err
        assert made[0].metrics.closed
    elif outcome == "config error from the trainer":
        assert rc == 2
        assert "config error: optim.global_batch_size" in captured.err
    else:
        assert rc == 0, captured.err
        assert made[0].closed
        assert "RankCLIP-DS run finished" in captured.out


def test_an_inconsistent_launcher_environment_is_a_message_and_exit_code_2(tmp_path, monkeypatch, capsys):
    """A launcher environment that cannot be right (here RANK past WORLD_SIZE) is named, without a traceback."""
    for name, value in {"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    rc = main(["--deepspeed", ZERO2, "--run.output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("launcher environment error: rank 3 is outside world size 2"), err
    assert not list(tmp_path.iterdir())
