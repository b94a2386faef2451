"""The real entry point, ``rankclip_ds/train.py``, under the DeepSpeed launcher and under torchrun, on real
synthetic shards through the WebDataset pipeline, with zero-shot evaluation, checkpoint and export."""

from __future__ import annotations

import json
import math
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


PROGRESS = re.compile(
    r"step (?P<step>\d+)/4 \| loss (?P<loss>\S+) \(clip (?P<clip>\S+) cross (?P<cross>\S+) in (?P<inmodal>\S+)\) "
    r"w (?P<w>\S+) \| scale (?P<scale>\S+) \| lr (?P<lr>\S+) \|"
)
SUMMARY = re.compile(r"zero-shot +top-1 (?P<top1>\S+)% \(chance 12\.5%\), top-5 (?P<top5>\S+)%")
GLOBAL_BATCH = 32  # 2 ranks × micro batch 16


def check_run(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "RankCLIP-DS run finished" in out
    # The console's numbers are plausible, not just numbers: a 4-step run on 32-sample global batches, logged at
    # steps 2 and 4 (window means).
    lines = [m.groupdict() for m in PROGRESS.finditer(out)]
    assert [int(m["step"]) for m in lines] == [2, 4], out[-3000:]
    for m in lines:
        v = {k: float(x) for k, x in m.items()}
        assert all(math.isfinite(x) for x in v.values()), m
        # InfoNCE of 32 pairs: ln 32 = 3.47 for uninformative embeddings; a few steps change it by a fraction.
        assert 0.5 * math.log(GLOBAL_BATCH) < v["clip"] < 2 * math.log(GLOBAL_BATCH), m
        assert v["cross"] > 0 and v["inmodal"] > 0, m  # ListMLE terms are positive (their items are not tied)
        assert 0 <= v["w"] <= 2, m  # the ranking weight ramps from 0 to w_max = 2
        # loss = clip + w (cross + inmodal) / (32 N) with 0 <= w <= 2: the printed terms add up, to their printed
        # rounding (these are means over the logging window, where w changes, so only the bounds hold exactly)
        ranking = v["loss"] - v["clip"]
        assert -1e-3 < ranking < 2 * (v["cross"] + v["inmodal"]) / (32 * GLOBAL_BATCH) + 1e-3, m
        assert 10 < v["scale"] < 20, m  # starts at 1/0.07 = 14.3 and moves by ~lr per step
        assert 0 <= v["lr"] <= 5e-4, m  # up to the recipe's peak, down to 0 at the last step
    summary = SUMMARY.search(out)
    assert summary, out[-3000:]
    top1, top5 = float(summary["top1"]), float(summary["top5"])
    assert 0 <= top1 <= top5 <= 100
    record = json.loads((run_dir / "entry" / "eval.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 4 and record["task"] == "zeroshot" and record["num_classes"] == 8
    assert record["num_samples"] == 64  # the held-out images
    assert top1 == pytest.approx(100 * record["top1"], abs=0.05)  # the console shows what eval.jsonl holds
    assert top5 == pytest.approx(100 * record["top5"], abs=0.05)
    run = run_dir / "entry"
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (run / "export" / "model.safetensors").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
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
