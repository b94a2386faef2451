"""Several torchrun "nodes" on one machine, for tests/test_multinode.py; also the launch script of their ranks.

As a script (``torchrun ... tests/_multinode.py <train.py arguments>``) it is the unmodified entry point with the
pause of ``tests/_fault_launch.py`` armed (``RANKCLIP_TEST_PAUSE=<rank>:<step>:<seconds>``), but only in the first
attempt of an elastic job (``TORCHELASTIC_RESTART_COUNT`` 0): a worker group restarted by ``--max-restarts`` redoes
that step and must not pause there again.

As a module it starts a node (one torchrun agent with its ranks, in its own session), finds each node's ranks from
their heartbeat files (``node``, ``pid``), kills or stops a whole node, and reads what a run left behind: the sample
keys per rank and step, the complete checkpoints, the losses TensorBoard shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
LAUNCH = str(HERE / "_multinode.py")
RUN_NAME = "mn"


def start_node(
    out: Path,
    log_name: str,
    train_args: list[str],
    *,
    nproc: int,
    env: dict[str, str],
    rdzv: tuple[int, int, str, str] | None = None,
    torchrun: tuple[str, ...] = (),
) -> subprocess.Popen:
    """One torchrun agent running ``nproc`` ranks of the real entry point, in a session of its own (so the test
    can kill the node's launcher and ranks together). ``rdzv = (nnodes, node_rank, endpoint, run_id)`` joins a c10d
    rendezvous; node rank 0 hosts its store (``is_host``), so the store outlives the loss of the other node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *torchrun]
    if rdzv is None:
        cmd += ["--standalone"]  # one node: a c10d rendezvous on a free local port
    else:
        nnodes, node_rank, endpoint, run_id = rdzv
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                "--rdzv-conf", f"is_host={'true' if node_rank == 0 else 'false'}"]  # fmt: skip
    log = (out / log_name).open("w")
    proc = subprocess.Popen([*cmd, LAUNCH, *train_args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                            start_new_session=True, env=env)  # fmt: skip
    proc.log_path = out / log_name  # type: ignore[attr-defined]
    return proc


def start_deepspeed_node(
    out: Path,
    log_name: str,
    train_args: list[str],
    *,
    hostfile: Path,
    node_rank: int,
    master_port: int,
    env: dict[str, str],
) -> subprocess.Popen:
    """Node ``node_rank`` of the hosts in ``hostfile`` under the DeepSpeed launcher's multi-node path without ssh
    (``--no_ssh --node_rank``: each node runs its own launcher, as under a scheduler that starts one per node)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
           "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(master_port),
           LAUNCH, *train_args]  # fmt: skip
    log = (out / log_name).open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True, env=env)
    proc.log_path = out / log_name  # type: ignore[attr-defined]
    return proc


def run_dir(out: Path) -> Path:
    return out / RUN_NAME


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def ranks_by_node(out: Path) -> dict[int, dict[int, int]]:
    """``{node: {rank: pid}}`` of the live rank processes, from their heartbeats (each pid checked against /proc,
    so a reused pid is never touched)."""
    nodes: dict[int, dict[int, int]] = {}
    for f in (run_dir(out) / "heartbeats").glob("rank*.json"):
        try:
            beat = json.loads(f.read_text())
            pid = int(beat["pid"])
            if b"_multinode.py" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            node = int(beat["node"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        nodes.setdefault(node, {})[int(beat["rank"])] = pid
    return nodes


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (an agent's ranks), from /proc."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if _ppid(int(entry.name)) == pid:
                    kids.append(int(entry.name))
    return kids


def signal_node(agent: subprocess.Popen, rank_pids: list[int], sig: int) -> None:
    """``sig`` to a whole node: its agent's session and each rank's own session (torchrun starts every rank in a
    session of its own, with its data workers); ranks without a heartbeat are found as the agent's children."""
    for pid in [agent.pid, *rank_pids, *children(agent.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


def agent_of(nodes: list[subprocess.Popen], rank_pid: int) -> subprocess.Popen:
    """The node (agent process) whose child ``rank_pid`` is."""
    parent = _ppid(rank_pid)
    return next(p for p in nodes if p.pid == parent)


def wait_for_file(path: Path, procs: list[subprocess.Popen], timeout: float) -> str:
    """The content of ``path`` once it is written; ``None`` if a process ended first or the time ran out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and path.read_text():
            return path.read_text()
        if any(p.poll() is not None for p in procs):
            return ""
        time.sleep(0.05)
    return ""


def keys_by_step(out: Path, rank: int) -> dict[int, list[str]]:
    """Step → the sample keys ``rank`` trained on; a step logged twice (redone after a crash) keeps its last."""
    path = run_dir(out) / "sample_keys" / f"rank{rank:05d}.jsonl"
    steps = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            record = json.loads(line)
            steps[record["step"]] = record["keys"]
    return steps


def complete_steps(out: Path) -> list[int]:
    folder = run_dir(out) / "checkpoints"
    return sorted(int(p.name[5:]) for p in folder.glob("step_*") if (p / "COMPLETE").is_file())


def tensorboard_losses(out: Path) -> dict[int, float]:
    """Step → ``train/loss`` as TensorBoard shows it (every event file of the run, in order: a step redone after a
    resume replaces the crashed attempt's value, as TensorBoard's own reader purges the orphaned points)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir(out) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO_ROOT))
    import _fault_launch

    if os.environ.get("RANKCLIP_TEST_PAUSE") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        _fault_launch.arm_pause(os.environ["RANKCLIP_TEST_PAUSE"])
    from rankclip_ds.train import main

    sys.exit(main())
