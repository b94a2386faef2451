"""The SLURM scripts without a cluster (fast): shellcheck, the settings they derive from a SLURM environment
(checked against rankclip_ds/dist.py), the job step they build, and the requeue decisions of the batch script with
stand-ins for srun and scontrol. The same scripts run on a real cluster in tests/test_slurm.py (slow tier)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, clean_launcher_env, skip_unless_ci

pytestmark = [pytest.mark.timeout(120)]

SCRIPTS = [
    "slurm/train.sbatch",
    "slurm/train_cpu.sbatch",
    "slurm/chain.sh",
    "slurm/lib/train_job.sh",
    "slurm/lib/ds_node.sh",
    "tests/slurm/cluster.sh",
]

GPU_JOB_ENV = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NAME": "rankclip",
    "SLURM_SUBMIT_DIR": REPO_ROOT,
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_NTASKS": "8",
    "SLURM_GPUS_ON_NODE": "4",
    "SLURM_CPUS_PER_TASK": "8",
    "SLURM_CPUS_ON_NODE": "64",  # the whole node (--exclusive); the job asked for 4 ranks × 8 CPUs
}


def write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """Stand-ins for scontrol (hostnames, requeue: recorded), srun and sbatch, first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(
        bin_dir / "scontrol",
        """#!/usr/bin/env bash
echo "scontrol $*" >>"$FAKE_RECORD"
case "$1 $2" in
  "show hostnames")
    code="import sys; from rankclip_ds.dist import expand_slurm_nodelist as expand"
    "$FAKE_PYTHON" -c "$code; print(*expand(sys.argv[1]), sep='\\n')" "$3" ;;
  "requeue "*) exit 0 ;;
  *) exit 1 ;;
esac
""",
    )
    # FAKE_SRUN: "exit:N" exits with N; "wait" waits for SIGUSR1 or SIGTERM, then exits 75 (as the ranks do);
    # "wait-die" dies of SIGUSR1 (as ranks still starting up do: 128 + 10).
    write_exe(
        bin_dir / "srun",
        """#!/usr/bin/env bash
echo "srun $*"
echo "srun $*" >>"$FAKE_RECORD"
case "$FAKE_SRUN" in
  exit:*) exit "${FAKE_SRUN#exit:}" ;;
  wait)
    trap 'echo "step got USR1" >>"$FAKE_RECORD"; exit 75' USR1
    trap 'echo "step got TERM" >>"$FAKE_RECORD"; exit 75' TERM
    echo $$ >"$FAKE_RECORD.step_pid"
    for _ in $(seq 1 300); do sleep 0.1; done
    exit 0 ;;
  wait-die)
    trap 'exit 138' USR1
    echo $$ >"$FAKE_RECORD.step_pid"
    for _ in $(seq 1 300); do sleep 0.1; done
    exit 0 ;;
esac
""",
    )
    write_exe(
        bin_dir / "sbatch",
        """#!/usr/bin/env bash
echo "sbatch $*" >>"$FAKE_RECORD"
n=$(grep -c '^sbatch' "$FAKE_RECORD")
echo "$((1000 + n));cluster"
""",
    )
    return bin_dir


def job_env(fake_bin: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = clean_launcher_env()
    env.update(GPU_JOB_ENV)
    env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    env["FAKE_RECORD"] = str(tmp_path / "record.txt")
    env["OUTPUT_DIR"] = str(tmp_path / "runs")
    env["PYTHON"] = "python3"
    env["FAKE_PYTHON"] = sys.executable
    env.update(extra)
    return env


def settings(env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Runs train_job_settings + train_job_step_command in bash; returns the process and the printed variables."""
    script = """
set -euo pipefail
DEFAULT_CONFIG=configs/cc3m_vitb32_paper.yaml
source slurm/lib/train_job.sh
train_job_settings --optim.lr 1e-3
mkdir -p "$LOG_DIR"
train_job_step_command
for v in MASTER_ADDR MASTER_PORT PROCS_PER_NODE WORLD_SIZE_PLANNED RUN_DIR LOG_DIR OMP_NUM_THREADS; do
  echo "$v=${!v}"
done
echo "TRAIN_ARGS=${TRAIN_ARGS[*]}"
echo "STEP_CMD=${STEP_CMD[*]}"
echo "DS_HOSTFILE=${DS_HOSTFILE:-}"
"""
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60)
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return proc, values


# ------------------------------------------------------------------------------------------------ static checks
def test_scripts_parse():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True, cwd=REPO_ROOT)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        skip_unless_ci("shellcheck not installed (apt-get install -y shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_requeue_exit_code_matches_the_trainer():
    from rankclip_ds.trainer.signals import REQUEUE_EXIT_CODE

    text = Path(REPO_ROOT, "slurm", "lib", "train_job.sh").read_text()
    assert int(re.search(r"^REQUEUE_EXIT_CODE=(\d+)", text, re.M).group(1)) == REQUEUE_EXIT_CODE


def test_sbatch_headers_ask_for_the_signal_and_requeue():
    for script in ("slurm/train.sbatch", "slurm/train_cpu.sbatch"):
        text = Path(REPO_ROOT, script).read_text()
        for line in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
            assert line in text, f"{script} lacks {line}"


# ------------------------------------------------------------------------------------------------ settings
def test_settings_from_a_two_node_gpu_job(fake_bin, tmp_path):
    from rankclip_ds.dist import read_dist_env

    proc, v = settings(job_env(fake_bin, tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The rendezvous the script exports is the one dist.py derives from the same SLURM variables.
    info = read_dist_env({**GPU_JOB_ENV, "SLURM_PROCID": "0"}, device_type="cuda")
    assert (v["MASTER_ADDR"], int(v["MASTER_PORT"])) == (info.master_addr, info.master_port) == ("gpu007", 23456)
    assert (v["PROCS_PER_NODE"], v["WORLD_SIZE_PLANNED"], v["OMP_NUM_THREADS"]) == ("4", "8", "8")
    assert v["RUN_DIR"] == f"{tmp_path}/runs/rankclip-123456"
    assert v["TRAIN_ARGS"] == (
        "rankclip_ds/train.py --deepspeed ds_configs/zero2.json --config configs/cc3m_vitb32_paper.yaml "
        f"--run.output_dir {tmp_path}/runs --run.name rankclip-123456 --checkpoint.resume latest --optim.lr 1e-3"
    )
    cmd = v["STEP_CMD"].split()
    assert cmd[0] == "srun" and cmd[cmd.index("python3") :][:3] == ["python3", "-u", "rankclip_ds/train.py"]
    for flag in ("--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=8", "--gpu-bind=none"):
        assert flag in cmd
    assert "--kill-on-bad-exit=0" in cmd  # a site's KillOnBadExit=1 would turn exit 75 into 143


def test_settings_for_the_deepspeed_launcher(fake_bin, tmp_path):
    proc, v = settings(job_env(fake_bin, tmp_path, LAUNCHER="deepspeed", RUN_NAME="run-a", TRAIN_DATA="/d/{0..9}.tar"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmd = v["STEP_CMD"].split()
    for flag in ("--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=32"):
        assert flag in cmd
    assert cmd[cmd.index("bash") + 1] == "slurm/lib/ds_node.sh"
    assert "--run.name run-a" in v["STEP_CMD"] and "--data.train_data /d/{0..9}.tar" in v["STEP_CMD"]
    assert Path(v["DS_HOSTFILE"]).read_text() == "gpu007 slots=4\ngpu008 slots=4\n"


def test_settings_without_gpus_take_the_tasks_per_node(fake_bin, tmp_path):
    env = job_env(fake_bin, tmp_path, SLURM_TASKS_PER_NODE="2", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="cpu1")
    del env["SLURM_GPUS_ON_NODE"]
    proc, v = settings(env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (v["PROCS_PER_NODE"], v["WORLD_SIZE_PLANNED"], v["MASTER_ADDR"]) == ("2", "2", "cpu1")
    assert "--gpu-bind=none" not in v["STEP_CMD"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"NODES": "4"}, "NODES=4 but the job has 2 node(s): submit with sbatch --nodes=4"),
        ({"PROCS_PER_NODE": "8"}, "PROCS_PER_NODE=8 but 4 GPUs per node are allocated"),
        ({"LAUNCHER": "pdsh"}, "LAUNCHER=pdsh: use srun or deepspeed"),
        ({"CONFIG": "configs/nope.yaml"}, "CONFIG=configs/nope.yaml does not exist"),
        ({"SLURM_SUBMIT_DIR": "/"}, "REPO_DIR=/ is not a RankCLIP-DS checkout"),
    ],
)
def test_settings_refuse_inconsistent_jobs(fake_bin, tmp_path, extra, message):
    proc, _ = settings(job_env(fake_bin, tmp_path, **extra))
    assert proc.returncode == 2
    assert message in proc.stdout


def test_ds_node_starts_the_deepspeed_runner_with_sigusr1_ignored(tmp_path):
    """The per-node wrapper runs `deepspeed --hostfile H --no_ssh --node_rank $SLURM_NODEID ...` with SIGUSR1
    ignored, a disposition the runner, launch.py (neither installs a handler) and the ranks inherit."""
    fake_python = tmp_path / "python"
    write_exe(
        fake_python,
        """#!/usr/bin/env bash
printf '%s\\n' "$@" >"$OUT.args"
grep '^SigIgn' /proc/$$/status >"$OUT.sigign"
""",
    )
    env = {
        **clean_launcher_env(),
        "PYTHON": str(fake_python),
        "OUT": str(tmp_path / "out"),
        "DS_HOSTFILE": "/runs/x/logs/hostfile",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": "23456",
        "SLURM_NODEID": "1",
        "DS_LAUNCHER_ARGS": "--bind_cores_to_rank --enable_each_rank_log=/tmp/r",
    }
    proc = subprocess.run(
        ["bash", "slurm/lib/ds_node.sh", "rankclip_ds/train.py", "--run.name", "a b"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.args").read_text().splitlines() == [
        "-u", "-m", "deepspeed.launcher.runner", "--hostfile", "/runs/x/logs/hostfile", "--no_ssh",
        "--node_rank", "1", "--master_addr", "gpu007", "--master_port", "23456",
        "--bind_cores_to_rank", "--enable_each_rank_log=/tmp/r", "rankclip_ds/train.py", "--run.name", "a b",
    ]  # fmt: skip
    ignored = int((tmp_path / "out.sigign").read_text().split()[1], 16)
    assert ignored & (1 << (signal.SIGUSR1 - 1)), "SIGUSR1 is not ignored in the launched process"
    assert not ignored & (1 << (signal.SIGTERM - 1))


# ------------------------------------------------------------------------------------------------ the batch script
def run_batch(env: dict[str, str], send: signal.Signals | None = None, to_step_too: bool = False):
    """Runs slurm/train.sbatch as Slurm would (bash, the job's environment); optionally signals it (and the step)
    once the stand-in step is running. Returns the process and the record of srun/scontrol calls."""
    record = Path(env["FAKE_RECORD"])
    proc = subprocess.Popen(
        ["bash", "slurm/train.sbatch"], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if send is not None:
        pid_file = Path(f"{record}.step_pid")
        deadline = time.monotonic() + 30
        while not pid_file.is_file() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline and proc.poll() is None, "the stand-in step did not start"
            time.sleep(0.05)
        proc.send_signal(send)
        if to_step_too:  # Slurm signals the steps itself on cancellation and time limits
            os.kill(int(pid_file.read_text()), send)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out.decode(), record.read_text() if record.is_file() else ""


def test_batch_script_finishes_without_requeue(fake_bin, tmp_path):
    rc, out, record = run_batch(job_env(fake_bin, tmp_path, FAKE_SRUN="exit:0", PREFLIGHT="0"))
    assert rc == 0, out
    assert "training step exited with code 0" in out and "done:" in out
    assert "scontrol requeue" not in record


def test_batch_script_requeues_on_exit_75(fake_bin, tmp_path):
    rc, out, record = run_batch(job_env(fake_bin, tmp_path, FAKE_SRUN="exit:75", PREFLIGHT="0"))
    assert rc == 0, out
    assert "scontrol requeue 123456" in record
    assert "requeueing: no complete checkpoint yet" in out
    log = tmp_path / "runs" / "rankclip-123456" / "logs" / "job123456-restart0.log"
    assert log.read_text().startswith("srun --nodes=2")  # the training output goes to the per-restart log


def test_batch_script_forwards_usr1_once_and_requeues(fake_bin, tmp_path):
    rc, out, record = run_batch(job_env(fake_bin, tmp_path, FAKE_SRUN="wait", PREFLIGHT="0"), send=signal.SIGUSR1)
    assert rc == 0, out
    assert "received SIGUSR1" in out and "forwarding SIGUSR1 to the training step" in out
    assert record.count("step got USR1") == 1
    assert "scontrol requeue 123456" in record


def test_batch_script_requeues_a_signal_death_but_not_forever(fake_bin, tmp_path):
    """A forwarded SIGUSR1 that kills the ranks (still starting up) is requeued, but the third time in a row the
    script gives up: the time limit is too short for start-up plus the signal's lead time."""
    env = job_env(fake_bin, tmp_path, FAKE_SRUN="wait-die", PREFLIGHT="0")
    record = Path(env["FAKE_RECORD"])
    count = tmp_path / "runs" / "rankclip-123456" / "logs" / "stops-without-checkpoint-in-a-row"
    for attempt in (1, 2, 3):
        record.unlink(missing_ok=True)
        Path(f"{record}.step_pid").unlink(missing_ok=True)
        rc, out, calls = run_batch(env | {"SLURM_RESTART_COUNT": str(attempt - 1)}, send=signal.SIGUSR1)
        assert "training step exited with code 138" in out
        if attempt < 3:
            assert rc == 0 and "scontrol requeue 123456" in calls, out
            assert f"did not stop gracefully (exit code 138; {attempt} time(s) in a row)" in out
            assert count.read_text().strip() == str(attempt)
        else:
            assert rc == 138 and "scontrol requeue" not in calls, out
            assert "killed the ranks before they could checkpoint 3 times in a row" in out
            assert not count.exists()  # a resubmission starts afresh
    # A graceful stop resets the count.
    count.write_text("2\n")
    run_batch(env | {"FAKE_SRUN": "exit:75"})
    assert not count.exists()


def test_batch_script_does_not_requeue_after_sigterm(fake_bin, tmp_path):
    env = job_env(fake_bin, tmp_path, FAKE_SRUN="wait", PREFLIGHT="0")
    rc, out, record = run_batch(env, send=signal.SIGTERM, to_step_too=True)
    assert rc == 75, out
    assert record.count("step got TERM") == 1  # from "Slurm", not forwarded a second time by the script
    assert "not requeueing after SIGTERM" in out and "scontrol requeue" not in record


def test_batch_script_reports_a_failure(fake_bin, tmp_path):
    rc, out, record = run_batch(job_env(fake_bin, tmp_path, FAKE_SRUN="exit:3", PREFLIGHT="0"))
    assert rc == 3
    assert "training failed (exit code 3); last lines of" in out and "srun --nodes=2" in out
    assert "scontrol requeue" not in record


def test_batch_script_stops_on_a_bad_recipe_before_launching(fake_bin, tmp_path):
    env = job_env(fake_bin, tmp_path, FAKE_SRUN="exit:0", PYTHON=str(Path(REPO_ROOT, ".venv", "bin", "python")))
    if not Path(env["PYTHON"]).is_file():
        skip_unless_ci("no .venv in the checkout (make setup)")
    proc = subprocess.run(
        ["bash", "slurm/train.sbatch", "--optim.no_such_key", "1"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "config error" in proc.stderr and "the recipe does not validate" in proc.stdout
    assert not Path(env["FAKE_RECORD"]).is_file() or "srun" not in Path(env["FAKE_RECORD"]).read_text()


# ------------------------------------------------------------------------------------------------ chain.sh
def test_chain_links_each_job_to_the_previous(fake_bin, tmp_path):
    env = job_env(fake_bin, tmp_path, RUN_NAME="cc3m-b32")
    proc = subprocess.run(
        ["bash", "slurm/chain.sh", "3", "--nodes=4", "--", "--optim.lr", "1e-3"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["1001", "1002", "1003"]
    calls = [line for line in Path(env["FAKE_RECORD"]).read_text().splitlines() if line.startswith("sbatch")]
    assert calls == [
        "sbatch --parsable --nodes=4 slurm/train.sbatch --optim.lr 1e-3",
        "sbatch --parsable --dependency=afterany:1001 --nodes=4 slurm/train.sbatch --optim.lr 1e-3",
        "sbatch --parsable --dependency=afterany:1002 --nodes=4 slurm/train.sbatch --optim.lr 1e-3",
    ]


def test_chain_needs_a_run_name(fake_bin, tmp_path):
    env = job_env(fake_bin, tmp_path)
    env.pop("RUN_NAME", None)
    proc = subprocess.run(["bash", "slurm/chain.sh", "2"], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "set RUN_NAME" in proc.stderr
