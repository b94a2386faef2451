"""The real entry point, ``rankclip_ds/train.py``, under the DeepSpeed launcher and under torchrun, on real
synthetic shards through the WebDataset pipeline, with zero-shot evaluation, checkpoint and export."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY_MODEL, clean_launcher_env, free_port

pytestmark = [pytest.mark.distributed]

TRAIN = str(Path(REPO_ROOT, "rankclip_ds", "train.py"))
ZERO2 = str(Path(REPO_ROOT, "ds_configs", "zero2.json"))


def overrides(shards: Path, run_dir: Path) -> list[str]:
    return [
        "--config", str(Path(REPO_ROOT, "configs", "demo_cpu.yaml")),
        "--run.output_dir", str(run_dir),
        "--run.name", "entry",
        *TINY_MODEL,
        "--data.train_data", str(shards / "train" / "synth-train-{000000..000003}.tar"),
        "--data.num_workers", "1",
        "--optim.micro_batch_size", "16",
        "--schedule.total_steps", "4",
        "--schedule.warmup_steps", "1",
        "--logging.log_every", "2",
        "--checkpoint.every_steps", "2",
        "--eval.every_steps", "0",
        "--eval.zeroshot_data", str(shards / "zeroshot" / "synth-zs-{000000..000000}.tar"),
        "--eval.templates", str(shards / "zeroshot" / "templates.txt"),
        "--eval.batch_size", "32",
    ]  # fmt: skip


def check_run(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "RankCLIP-DS run finished" in out
    assert re.search(r"step 4/4 \| loss \d", out)
    assert re.search(r"zero-shot +top-1 \d+\.\d% \(chance 12\.5%\)", out), out[-3000:]
    run = run_dir / "entry"
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (run / "export" / "model.safetensors").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    record = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 4 and record["task"] == "zeroshot" and record["num_classes"] == 8


@pytest.mark.timeout(600)
def test_train_py_under_the_deepspeed_launcher(shards, tmp_path):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           TRAIN, "--deepspeed", ZERO2, *overrides(shards, tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=580, env=clean_launcher_env(), cwd=REPO_ROOT)
    check_run(proc, tmp_path)
    assert "launcher=deepspeed" in proc.stdout + proc.stderr


@pytest.mark.timeout(600)
def test_train_py_under_torchrun(shards, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           TRAIN, "--deepspeed", ZERO2, *overrides(shards, tmp_path), "--logging.profile_loss", "true"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=580, env=clean_launcher_env(), cwd=REPO_ROOT)
    check_run(proc, tmp_path)
    assert "launcher=torchrun" in proc.stdout + proc.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "entry" / "tb"))
    acc.Reload()
    fractions = [e.value for e in acc.Scalars("perf/loss_time_fraction")]
    assert fractions and all(0.0 < f < 1.0 for f in fractions)


def test_training_without_deepspeed_json_is_refused(capsys):
    from rankclip_ds.train import main

    assert main(["--optim.lr", "1e-3"]) == 2
    assert "--deepspeed JSON is required" in capsys.readouterr().err
