"""Launcher environment parsing (torchrun, DeepSpeed, SLURM), a real 2-process rendezvous, and the NCCL flight
recorder's variables (set before the NCCL group exists, never for gloo, the user's values kept, the same in the
Slurm scripts)."""

from __future__ import annotations

import logging
import mmap
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_slurm_scripts import GPU_JOB_ENV

from conftest import REPO_ROOT, clean_launcher_env, free_port, skip_unless_ci
from rankclip_ds.dist import (
    DistEnvError,
    DistInfo,
    expand_slurm_nodelist,
    init_distributed,
    read_dist_env,
    setup_logging,
)
from rankclip_ds.nccl_diagnostics import nccl_diagnostics_env

TORCHRUN_ENV = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "node-a",
    "MASTER_PORT": "29511",
    "TORCHELASTIC_RUN_ID": "abc",
}
DEEPSPEED_ENV = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_SIZE": "2",
    "CROSS_RANK": "1",
    "CROSS_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}
SLURM_ENV = {
    "SLURM_PROCID": "6",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "2",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_JOB_ID": "123456",
}


def test_torchrun_env():
    info = read_dist_env(TORCHRUN_ENV, device_type="cpu")
    assert info == DistInfo(5, 8, 1, 4, 1, "node-a", 29511, "torchrun", "cpu")
    assert info.backend == "gloo" and info.device == "cpu" and info.distributed and not info.is_main


def test_deepspeed_launcher_env(monkeypatch):
    info = read_dist_env(DEEPSPEED_ENV, device_type="cuda")
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (3, 4, 1, 2, 1)
    assert info.launcher == "deepspeed" and info.backend == "nccl"
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 29500)
    # The device is the local rank modulo the GPUs this process sees: one per task on sites that bind GPUs to
    # tasks (CUDA_VISIBLE_DEVICES), all of the node's otherwise.
    for visible, device in ((8, "cuda:1"), (2, "cuda:1"), (1, "cuda:0"), (0, "cuda:0")):
        monkeypatch.setattr(torch.cuda, "device_count", lambda visible=visible: visible)
        assert read_dist_env(DEEPSPEED_ENV, device_type="cuda").device == device, visible
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert read_dist_env({**DEEPSPEED_ENV, "LOCAL_RANK": "3", "LOCAL_SIZE": "4"}, "cuda").device == "cuda:1"


def test_slurm_env():
    info = read_dist_env(SLURM_ENV, device_type="cuda")
    assert info.launcher == "slurm"
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (6, 8, 2, 4, 1)
    assert info.master_addr == "gpu007"
    assert info.master_port == 23456  # 20000 + job id 123456 mod 20000
    info = read_dist_env({**SLURM_ENV, "MASTER_PORT": "1234", "MASTER_ADDR": "x"}, "cpu")
    assert (info.master_addr, info.master_port) == ("x", 1234)


def test_slurm_ntasks_per_node_and_plain_tasks_per_node():
    env = {**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "4"}
    env.pop("SLURM_TASKS_PER_NODE")
    assert read_dist_env(env, "cpu").local_world_size == 4
    env = {**SLURM_ENV, "SLURM_TASKS_PER_NODE": "2,2,2,2", "SLURM_JOB_NUM_NODES": "4", "SLURM_LOCALID": "0"}
    assert read_dist_env(env, "cpu").local_world_size == 2


def test_openmpi_env():
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29400",
    }
    info = read_dist_env(env, "cpu")
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (
        "openmpi",
        5,
        8,
        1,
        4,
        1,
    )
    assert (info.master_addr, info.master_port) == ("n1", 29400)
    with pytest.raises(DistEnvError, match="without MASTER_ADDR"):
        read_dist_env({k: v for k, v in env.items() if k != "MASTER_ADDR"}, "cpu")


def test_launcher_variables_win_over_slurm():
    # sbatch + `deepspeed --launcher` or `srun torchrun`: SLURM's single task per node is not the process layout.
    env = {**SLURM_ENV, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", **TORCHRUN_ENV}
    info = read_dist_env(env, "cpu")
    assert info.launcher == "torchrun" and info.rank == 5 and info.world_size == 8


def test_single_task_slurm_is_single_process():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}
    info = read_dist_env(env, "cpu")
    assert info.launcher == "single" and info.world_size == 1 and not info.distributed


def test_no_launcher():
    info = read_dist_env({}, "cpu")
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single") and info.is_main


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("gpu[007-009,012]", ["gpu007", "gpu008", "gpu009", "gpu012"]),
        ("a[1-2],b3,c[09-10]", ["a1", "a2", "b3", "c09", "c10"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("login-a1.cluster", ["login-a1.cluster"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 is outside world size 4"),
        ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST is not"),
        ({**SLURM_ENV, "SLURM_JOB_NODELIST": "gpu[1-2"}, "unbalanced brackets"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "local rank 3 is outside"),
    ],
)
def test_bad_env(env, match):
    with pytest.raises(DistEnvError, match=match):
        read_dist_env(env, "cpu")


def test_rank_filtered_logging(capfd):
    logger = logging.getLogger("rankclip_ds.test_logging")
    setup_logging(read_dist_env({"RANK": "1", "WORLD_SIZE": "2"}, "cpu"))
    logger.info("hidden on rank 1")
    logger.warning("shown on rank 1")
    setup_logging(read_dist_env({}, "cpu"))
    logger.info("shown on rank 0")
    err = capfd.readouterr().err
    assert "hidden on rank 1" not in err
    assert "[rank 1] WARNING" in err and "shown on rank 1" in err
    assert "[rank 0] INFO" in err and "shown on rank 0" in err
    assert sum(1 for h in logging.getLogger().handlers if getattr(h, "_rankclip", False)) == 1


PROBE = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from rankclip_ds.dist import read_dist_env, init_distributed
    info = read_dist_env()
    init_distributed(info, timeout_minutes=2, use_deepspeed=False)
    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t)
    print(f"PROBE rank={info.rank} world={info.world_size} local={info.local_rank} launcher={info.launcher} "
          f"backend={dist.get_backend()} sum={t.item():g}", flush=True)
    dist.destroy_process_group()
    """
)


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_torchrun_two_processes_rendezvous(tmp_path, launcher_env):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run([*cmd, str(script)], capture_output=True, text=True, timeout=170, env=launcher_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Both ranks share one stdout, so their lines may interleave: pick the records out by pattern.
    lines = sorted(re.findall(r"PROBE [^P]*?sum=\d+", proc.stdout))
    assert lines == [
        "PROBE rank=0 world=2 local=0 launcher=torchrun backend=gloo sum=3",
        "PROBE rank=1 world=2 local=1 launcher=torchrun backend=gloo sum=3",
    ]


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_slurm_style_env_two_processes_rendezvous(tmp_path, launcher_env):
    """Two processes given only SLURM's variables (as `srun --ntasks 2` would) find each other."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    port, base = free_port(), launcher_env
    procs = []
    for rank in range(2):
        env = {
            **base,
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_NODEID": "0",
            "SLURM_JOB_NUM_NODES": "1",
            "SLURM_TASKS_PER_NODE": "2",
            "SLURM_JOB_NODELIST": "localhost",
            "MASTER_PORT": str(port),
        }
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=170)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "PROBE rank=0 world=2 local=0 launcher=slurm backend=gloo sum=3" in outs[0]
    assert "PROBE rank=1 world=2 local=1 launcher=slurm backend=gloo sum=3" in outs[1]


# ------------------------------------------------------------------------------------------------ NCCL diagnostics
# Every name PyTorch 2.14 reads for the settings nccl_diagnostics_env makes, the older aliases included.
NCCL_DIAGNOSTIC_NAMES = (
    "TORCH_FR_BUFFER_SIZE",
    "TORCH_NCCL_TRACE_BUFFER_SIZE",
    "TORCH_NCCL_DUMP_ON_TIMEOUT",
    "TORCH_NCCL_ENABLE_MONITORING",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "NCCL_ASYNC_ERROR_HANDLING",
    "TORCH_FR_DUMP_TEMP_FILE",
    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
)


def expected_nccl_env(run_dir: Path | str) -> dict[str, str]:
    return {
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_FR_DUMP_TEMP_FILE": f"{run_dir}/nccl_dumps/rank_",
    }


def without_nccl_diagnostics(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in NCCL_DIAGNOSTIC_NAMES}


def test_nccl_diagnostics_env_dumps_into_the_run_folder(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "cc3m"
    assert nccl_diagnostics_env(run, {}) == expected_nccl_env(run)
    # A relative run folder becomes absolute: a rank's working directory need not be the caller's.
    monkeypatch.chdir(tmp_path)
    assert nccl_diagnostics_env("runs/cc3m", {})["TORCH_FR_DUMP_TEMP_FILE"] == f"{run}/nccl_dumps/rank_"
    assert not (tmp_path / "runs").exists()  # pure: nothing created


@pytest.mark.parametrize(
    ("user_set", "same_setting"),
    [
        ({"TORCH_FR_BUFFER_SIZE": "5000"}, "TORCH_FR_BUFFER_SIZE"),
        ({"TORCH_NCCL_TRACE_BUFFER_SIZE": "0"}, "TORCH_FR_BUFFER_SIZE"),  # the older name of the same setting
        ({"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}, "TORCH_NCCL_DUMP_ON_TIMEOUT"),
        ({"TORCH_NCCL_ENABLE_MONITORING": "0"}, "TORCH_NCCL_ENABLE_MONITORING"),
        ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, "TORCH_NCCL_ASYNC_ERROR_HANDLING"),  # as torchrun's agent sets it
        ({"NCCL_ASYNC_ERROR_HANDLING": "2"}, "TORCH_NCCL_ASYNC_ERROR_HANDLING"),
        ({"TORCH_FR_DUMP_TEMP_FILE": "/scratch/me/fr_"}, "TORCH_FR_DUMP_TEMP_FILE"),
        ({"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/me/fr_"}, "TORCH_FR_DUMP_TEMP_FILE"),
    ],
)
def test_nccl_diagnostics_env_keeps_what_the_user_set(tmp_path, user_set, same_setting):
    got = nccl_diagnostics_env(tmp_path, user_set)
    assert same_setting not in got and not set(user_set) & set(got)
    assert got == {k: v for k, v in expected_nccl_env(tmp_path).items() if k != same_setting}
    # An empty value is no setting (torch would reject it), as `${VAR:=value}` treats it in the Slurm scripts.
    assert nccl_diagnostics_env(tmp_path, dict.fromkeys(user_set, "")) == expected_nccl_env(tmp_path)


def test_the_nccl_variables_are_read_by_this_torch():
    """The names and the error-handling value exist in the installed PyTorch (its C++ headers, and the dump file's
    names in libtorch_cpu.so, where the flight recorder's writer reads them): nothing invented, nothing renamed by
    an upgrade without this failing."""
    torch_dir = Path(torch.__file__).parent
    headers = torch_dir / "include" / "torch" / "csrc" / "distributed" / "c10d"
    if not (headers / "ProcessGroupNCCL.hpp").is_file():
        skip_unless_ci(f"this torch ships no C++ headers in {headers}")
    pg_nccl = (headers / "ProcessGroupNCCL.hpp").read_text()
    for name in ("TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_ENABLE_MONITORING", "TORCH_NCCL_TRACE_BUFFER_SIZE"):
        assert f'"{name}"' in pg_nccl, name
    assert '"TORCH_NCCL_ASYNC_ERROR_HANDLING",\n    "NCCL_ASYNC_ERROR_HANDLING"' in pg_nccl
    assert "SkipCleanUp = 3" in pg_nccl
    recorder = (headers / "FlightRecorder.hpp").read_text()
    assert '{"TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"}' in recorder
    with open(torch_dir / "lib" / "libtorch_cpu.so", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for name in (b"TORCH_FR_DUMP_TEMP_FILE", b"TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
            assert m.find(name + b"\0") != -1, name


@pytest.fixture
def group_creation(monkeypatch):
    """init_distributed with the process group (plain or through DeepSpeed) and the CUDA device stubbed: records the
    backend, os.environ and the run folder's contents at the moment the group would be created. The environment is
    restored afterwards."""
    import deepspeed
    import torch.distributed as dist

    written = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for name in (*written, *NCCL_DIAGNOSTIC_NAMES):
        # setenv first so that monkeypatch removes at teardown what init_distributed writes during the test.
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    seen: dict = {}

    def init_process_group(backend, timeout):
        seen["backend"], seen["env"] = backend, dict(os.environ)
        seen["files"] = sorted(str(p.relative_to(seen["run"])) for p in seen["run"].rglob("*"))

    def deepspeed_init_distributed(dist_backend, timeout, auto_mpi_discovery):
        init_process_group(dist_backend, timeout)

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(deepspeed, "init_distributed", deepspeed_init_distributed)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    return seen


def one_process(device_type: str) -> DistInfo:
    return DistInfo(0, 1, 0, 1, 0, "127.0.0.1", free_port(), "single", device_type)


@pytest.mark.parametrize("use_deepspeed", [True, False], ids=["deepspeed", "torch"])
def test_init_distributed_sets_the_nccl_variables_before_the_group_exists(
    tmp_path, group_creation, monkeypatch, use_deepspeed
):
    run = group_creation["run"] = tmp_path / "run"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # exported by the user (or torchrun's agent)
    init_distributed(one_process("cuda"), use_deepspeed=use_deepspeed, single_process=True, diagnostics_dir=run)
    assert group_creation["backend"] == "nccl"
    env = group_creation["env"]
    assert {k: env.get(k) for k in expected_nccl_env(run)} == {
        **expected_nccl_env(run),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }
    assert group_creation["files"] == ["nccl_dumps"]  # the writer creates no folder; it existed in time


def test_an_unwritable_dump_folder_is_a_warning_not_a_failure(tmp_path, group_creation, caplog):
    run = group_creation["run"] = tmp_path / "run"
    run.write_text("a file where the run folder should be")
    with caplog.at_level(logging.WARNING, logger="rankclip_ds.dist"):
        init_distributed(one_process("cuda"), use_deepspeed=False, single_process=True, diagnostics_dir=run)
    assert group_creation["backend"] == "nccl"  # the group is created all the same
    assert f"cannot create the NCCL flight recorder's dump folder {run}/nccl_dumps" in caplog.text
    assert "point TORCH_FR_DUMP_TEMP_FILE at a writable folder" in caplog.text


def test_init_distributed_sets_nothing_nccl_for_gloo(tmp_path, group_creation):
    run = group_creation["run"] = tmp_path / "run"
    run.mkdir()
    init_distributed(one_process("cpu"), use_deepspeed=False, single_process=True, diagnostics_dir=run)
    assert group_creation["backend"] == "gloo"
    assert not set(group_creation["env"]) & set(NCCL_DIAGNOSTIC_NAMES)
    assert group_creation["files"] == []


def test_the_trainer_passes_its_run_folder(tmp_path, monkeypatch):
    """The Trainer hands init_distributed its run folder, so that the dumps land in the run."""
    from rankclip_ds.config import load_config
    from rankclip_ds.trainer import trainer as trainer_module

    calls = []

    class Stop(Exception):
        pass

    def init_distributed_stub(info, **kwargs):
        calls.append(kwargs)
        raise Stop

    from rankclip_ds.resolved import resolve_run
    from rankclip_ds.trainer import setup as setup_module

    monkeypatch.setattr(setup_module, "init_distributed", init_distributed_stub)
    cfg = load_config(None, ["--run.output_dir", str(tmp_path), "--run.name", "r1", "--optim.micro_batch_size", "8"])
    with pytest.raises(Stop):
        trainer_module.Trainer(cfg, resolve_run(cfg, {"zero_optimization": {"stage": 2}}, 1), one_process("cpu"))
    assert calls and Path(calls[0]["diagnostics_dir"]) == tmp_path / "r1"


SLURM_GPU_JOB = {
    **GPU_JOB_ENV,  # a 2-node job with 4 GPUs a node, as the Slurm script tests use
    "MASTER_ADDR": "gpu007",  # no scontrol needed
    "PYTHON": "python3",
}


def slurm_exports(extra: dict[str, str | None]) -> tuple[str, dict[str, str]]:
    """Sources slurm/lib/train_job.sh and runs its settings as a job start does (``extra`` over a 2-node GPU job,
    None removes a variable); returns the run folder and the NCCL variables exported to the job step."""
    script = """
set -euo pipefail
DEFAULT_CONFIG=configs/cc3m_vitb32_paper.yaml
source slurm/lib/train_job.sh
train_job_settings
echo "RUN_DIR=$RUN_DIR"
env
"""
    env = {**without_nccl_diagnostics(clean_launcher_env()), **SLURM_GPU_JOB, **extra}
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return lines["RUN_DIR"], {k: v for k, v in lines.items() if k in NCCL_DIAGNOSTIC_NAMES}


def test_slurm_gpu_job_exports_what_dist_py_sets(tmp_path):
    run_dir, exported = slurm_exports({"OUTPUT_DIR": str(tmp_path / "runs")})
    assert run_dir == f"{tmp_path}/runs/rankclip-123456"
    assert exported == nccl_diagnostics_env(run_dir, {}) == expected_nccl_env(run_dir)
    # OUTPUT_DIR defaults to runs/, relative to the checkout: the dump path is made absolute.
    _, exported = slurm_exports({"RUN_NAME": "rel"})
    assert exported["TORCH_FR_DUMP_TEMP_FILE"] == f"{REPO_ROOT}/runs/rel/nccl_dumps/rank_"
    assert not Path(REPO_ROOT, "runs", "rel").exists()  # the ranks create the folder, not the settings


def test_slurm_gpu_job_keeps_what_the_user_set(tmp_path):
    user = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/me/fr_"}
    run_dir, exported = slurm_exports({"OUTPUT_DIR": str(tmp_path), **user})
    assert exported == {**user, **nccl_diagnostics_env(run_dir, user)}
    assert "TORCH_FR_DUMP_TEMP_FILE" not in exported


def test_slurm_cpu_job_exports_nothing_nccl(tmp_path):
    cpu = {"SLURM_GPUS_ON_NODE": None, "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": "1"}
    _, exported = slurm_exports({**cpu, "OUTPUT_DIR": str(tmp_path)})
    assert exported == {}


@pytest.mark.timeout(120)
def test_deepspeed_launcher_hands_the_variables_to_the_ranks(tmp_path):
    """slurm/lib/ds_node.sh -> DeepSpeed's runner (--no_ssh) -> launch.py -> the rank: the exported variables arrive."""
    probe = tmp_path / "probe.py"
    names = sorted(expected_nccl_env(tmp_path))
    probe.write_text(f"import os\nfor n in {names!r}:\n    print(f'PROBE {{n}}={{os.environ.get(n)}}')\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    env = {
        **without_nccl_diagnostics(clean_launcher_env()),
        **expected_nccl_env(tmp_path),
        "PYTHON": sys.executable,
        "DS_HOSTFILE": str(hostfile),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "SLURM_NODEID": "0",
    }
    cmd = ["bash", "slurm/lib/ds_node.sh", str(probe)]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    arrived = dict(line.removeprefix("PROBE ").split("=", 1) for line in proc.stdout.splitlines() if "PROBE " in line)
    assert arrived == expected_nccl_env(tmp_path)
