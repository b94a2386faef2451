"""Launcher environment parsing (torchrun, DeepSpeed, SLURM) and a real 2-process rendezvous."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import free_port
from rankclip_ds.dist import DistEnvError, DistInfo, expand_slurm_nodelist, read_dist_env, setup_logging

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


def test_deepspeed_launcher_env():
    info = read_dist_env(DEEPSPEED_ENV, device_type="cuda")
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (3, 4, 1, 2, 1)
    assert info.launcher == "deepspeed" and info.backend == "nccl"
    # local rank modulo the visible devices (one per task on sites that bind GPUs to tasks)
    assert info.device == f"cuda:{1 % max(1, torch.cuda.device_count())}"
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 29500)


def test_slurm_env():
    info = read_dist_env(SLURM_ENV, device_type="cuda")
    assert info.launcher == "slurm"
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (6, 8, 2, 4, 1)
    assert info.master_addr == "gpu007"
    assert info.master_port == 20000 + 123456 % 20000  # derived from the job id
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
