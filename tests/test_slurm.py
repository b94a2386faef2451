"""The SLURM scripts on a real Slurm cluster: munged + slurmctld + slurmd on this machine (tests/slurm/cluster.sh).

1. ``sbatch slurm/train_cpu.sbatch``: 2 tasks (srun, one rank per task), a tiny model on small synthetic shards;
   the job completes, trains the requested steps, writes a checkpoint and TensorBoard events.
2. Preemption, under each launcher (srun; one DeepSpeed launcher per node): ``scancel --batch --signal=USR1``, as
   ``#SBATCH --signal=B:USR1@...`` delivers it; the job checkpoints, requeues itself, resumes from that
   checkpoint's step and finishes.
3. A chain of two jobs (``slurm/chain.sh``, ``--dependency=afterany``) continues one run folder.

Needs root and Debian's ``slurm-wlm`` and ``munge``; skipped with the reason when the cluster cannot start, except
under ``CI=true`` (CI installs them), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY_MODEL, clean_launcher_env, free_port, skip_unless_ci

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CLUSTER_SH = Path(REPO_ROOT, "tests", "slurm", "cluster.sh")
TRAIN_CPU = "slurm/train_cpu.sbatch"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


# ------------------------------------------------------------------------------------------------ the cluster
@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> dict[str, str]:
    """Starts the one-node cluster; yields the environment for sbatch (SLURM_CONF, no launcher variables)."""
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(t) is None]
    if missing:
        skip_unless_ci(
            f"Slurm test cluster not started: {', '.join(missing)} not found (apt-get install -y slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        skip_unless_ci("Slurm test cluster not started: the daemons run as root (SlurmUser=root); run as root")
    state = tmp_path_factory.mktemp("slurm")
    ctld_port = free_port()
    slurmd_port = free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    start = subprocess.run(
        ["bash", str(CLUSTER_SH), "start", str(state), str(ctld_port), str(slurmd_port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        if start.returncode != 0:
            lines = start.stderr.strip().splitlines() or ["(no message)"]
            # The reason first (cluster.sh's last line), then the daemons' logs it printed.
            skip_unless_ci(f"Slurm test cluster did not start: {lines[-1]}\n" + "\n".join(lines[:-1])[-3000:])
        env = clean_launcher_env()
        env["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
        env["PYTHON"] = sys.executable
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(state)], capture_output=True, text=True, timeout=120)


def tiny_overrides(shards: Path, total_steps: int) -> list[str]:
    """train.py overrides: a tiny model, small batches, a handful of steps on the test's shards."""
    return [
        *TINY_MODEL,
        "--optim.micro_batch_size", "16",
        "--data.num_workers", "1",
        "--schedule.total_steps", str(total_steps),
        "--schedule.warmup_steps", "1",
        "--logging.log_every", "2",
        "--eval.every_steps", "0",
        "--eval.zeroshot_data", str(shards / "zeroshot" / "synth-zs-{000000..000000}.tar"),
        "--eval.templates", str(shards / "zeroshot" / "templates.txt"),
        "--eval.batch_size", "32",
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ helpers
def sbatch(env: dict[str, str], out_dir: Path, args: list[str], **settings: str) -> str:
    """Submits from the checkout's root (as users do); ``settings`` are the script's environment variables."""
    env = {**env, **settings}
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={out_dir}/%x-%j.out", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict[str, str], job: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def node_state(env: dict[str, str]) -> str:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=env, timeout=30)
    return proc.stdout.strip()


def wait_until(predicate, timeout: float, what: str, diagnose) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1.0)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")


def wait_for_end(env: dict[str, str], job: str, timeout: float, diagnose) -> dict[str, str]:
    info: dict[str, str] = {}

    def ended() -> bool:
        info.update(job_info(env, job))
        return info["JobState"] in TERMINAL

    wait_until(ended, timeout, f"job {job} to end", diagnose)
    return info


def diagnosis(*paths: Path) -> Callable[[], str]:
    """Returns a function that prints the tails of the given logs (globs allowed) for a failure message."""

    def show() -> str:
        parts = []
        for pattern in paths:
            for path in sorted(pattern.parent.glob(pattern.name)):
                text = path.read_text(errors="replace")
                parts.append(f"---- {path} (last 4000 characters)\n{text[-4000:]}")
        return "\n".join(parts) or "(no logs)"

    return show


def steps_logged(log: Path, total: int) -> list[int]:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [int(s) for s in re.findall(rf"\bstep (\d+)/{total} \|", text)]


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.timeout(300)
def test_cpu_job_trains_and_checkpoints(slurm_env, shards, tmp_path):
    """The CPU variant with 2 tasks: preflight dry run, srun with one rank per task, checkpoint, TensorBoard."""
    args = [TRAIN_CPU, *tiny_overrides(shards, total_steps=6), "--checkpoint.every_steps", "3"]
    job = sbatch(
        slurm_env,
        tmp_path,
        args,
        OUTPUT_DIR=str(tmp_path / "runs"),
        TRAIN_DATA=str(shards / "train" / "synth-train-{000000..000003}.tar"),
    )
    run = tmp_path / "runs" / f"rankclip-cpu-{job}"
    show = diagnosis(tmp_path / f"rankclip-cpu-{job}.out", run / "logs" / "*.log")
    info = wait_for_end(slurm_env, job, 240, show)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), show()

    batch_out = (tmp_path / f"rankclip-cpu-{job}.out").read_text()
    assert "preflight: train.py --dry-run --dry-run-world-size 2" in batch_out
    assert "RankCLIP-DS plan" in batch_out and "training step exited with code 0" in batch_out, show()
    log = run / "logs" / f"job{job}-restart0.log"
    text = log.read_text()
    # Two ranks, placed by srun and read from SLURM_* by rankclip_ds/dist.py.
    assert re.search(r"init process group: backend=gloo rank=0/2 .*launcher=slurm", text), show()
    assert steps_logged(log, 6)[-1] == 6 and "RankCLIP-DS run finished" in text, show()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (run / "checkpoints" / "step_00000006" / "COMPLETE").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "export" / "model.safetensors").is_file()


@pytest.mark.timeout(330)
@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_usr1_checkpoints_requeues_and_resumes(slurm_env, shards, tmp_path, launcher):
    """SIGUSR1 to the batch script (as ``--signal=B:USR1@T`` sends it): the ranks save and exit 75, the script
    requeues the job, the next start resumes from that checkpoint's step and finishes the run."""
    total = 120
    args = [TRAIN_CPU, *tiny_overrides(shards, total_steps=total), "--checkpoint.every_steps", "1000"]
    job = sbatch(
        slurm_env,
        tmp_path,
        args,
        OUTPUT_DIR=str(tmp_path / "runs"),
        TRAIN_DATA=str(shards / "train" / "synth-train-{000000..000003}.tar"),
        LAUNCHER=launcher,
        PREFLIGHT="0",
    )
    run = tmp_path / "runs" / f"rankclip-cpu-{job}"
    first, second = run / "logs" / f"job{job}-restart0.log", run / "logs" / f"job{job}-restart1.log"
    show = diagnosis(tmp_path / f"rankclip-cpu-{job}.out", run / "logs" / "*.log")

    # Preempt once the ranks are training (their handlers are installed by then).
    wait_until(lambda: steps_logged(first, total), 180, "the first logged training step", show)
    signal = subprocess.run(
        ["scancel", "--batch", "--signal=USR1", job], capture_output=True, text=True, env=slurm_env, timeout=30
    )
    assert signal.returncode == 0, signal.stderr

    info: dict[str, str] = {}

    def requeued() -> bool:
        info.update(job_info(slurm_env, job))
        return int(info.get("Restarts", "0")) >= 1 or info["JobState"] in TERMINAL

    wait_until(requeued, 120, "the job to requeue itself", show)
    assert int(info["Restarts"]) == 1, f"job {job} ended without a requeue: {info}\n{show()}"
    if info["JobState"] == "PENDING":
        # A requeued job becomes eligible only after Slurm's requeue delay (about two minutes); start it now. But
        # not while the node is still cleaning up the first start, nor within the second in which the first start's
        # credential was revoked: slurmd compares them in whole seconds and would refuse the launch
        # ("Killing non-startable batch job: Job credential revoked").
        wait_until(lambda: node_state(slurm_env) == "idle", 60, "the node to finish the first start", show)
        time.sleep(2.0)
        subprocess.run(
            ["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env, capture_output=True, timeout=30
        )
    info = wait_for_end(slurm_env, job, 240, show)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), show()

    before = first.read_text()
    stop = re.search(r"stopped by signal 10 at step (\d+); checkpoint \S+/step_(\d+); exit code 75", before)
    assert stop, show()
    step = int(stop.group(1))
    assert 0 < step < total and int(stop.group(2)) == step
    assert f"launcher={'slurm' if launcher == 'srun' else 'deepspeed'}" in before
    batch_out = (tmp_path / f"rankclip-cpu-{job}.out").read_text()
    assert "forwarding SIGUSR1 to the training step" in batch_out
    assert "training step exited with code 75" in batch_out
    assert f"requeueing: the next start resumes from {run}/checkpoints/step_{step:08d}" in batch_out, show()

    after = second.read_text()
    assert f"resumed from {run}/checkpoints/step_{step:08d} at step {step} " in after, show()
    assert steps_logged(second, total)[0] > step and steps_logged(second, total)[-1] == total, show()
    assert "RankCLIP-DS run finished" in after
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{total:08d}"
    assert list((run / "tb").glob("events.out.tfevents.*"))


@pytest.mark.timeout(300)
def test_chain_continues_one_run(slurm_env, shards, tmp_path):
    """``slurm/chain.sh 2``: the second job starts after the first ends and resumes the same run folder."""
    env = {
        **slurm_env,
        "RUN_NAME": "chained",
        "SCRIPT": TRAIN_CPU,
        "OUTPUT_DIR": str(tmp_path / "runs"),
        "TRAIN_DATA": str(shards / "train" / "synth-train-{000000..000003}.tar"),
        "PREFLIGHT": "0",
    }
    cmd = ["bash", "slurm/chain.sh", "2", f"--output={tmp_path}/%x-%j.out", "--", *tiny_overrides(shards, 4)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = proc.stdout.split()
    dependency = job_info(slurm_env, second)["Dependency"]
    assert dependency.startswith(f"afterany:{first}") or job_info(slurm_env, first)["JobState"] in TERMINAL, dependency
    run = tmp_path / "runs" / "chained"
    show = diagnosis(tmp_path / "*.out", run / "logs" / "*.log")
    info1 = wait_for_end(slurm_env, first, 240, show)
    info2 = wait_for_end(slurm_env, second, 240, show)
    assert info1["JobState"] == info2["JobState"] == "COMPLETED", show()
    assert info2["StartTime"] >= info1["EndTime"]  # ISO timestamps compare as strings
    assert steps_logged(run / "logs" / f"job{first}-restart0.log", 4)[-1] == 4
    later = (run / "logs" / f"job{second}-restart0.log").read_text()
    assert f"resumed from {run}/checkpoints/step_00000004 at step 4 " in later, show()
    assert "RankCLIP-DS run finished" in later
