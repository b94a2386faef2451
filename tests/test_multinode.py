"""Faults of scale: several nodes, a lost node, an in-job restart, and the bad inputs of a multi-node launch.

"Nodes" here are torchrun agents on one machine: two ``torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d``
processes with one rendezvous endpoint, each starting two ranks of the real entry point (gloo on the CPU), exactly
as on two hosts except that the host name and the file system are shared. Each rank records its node (torchrun's
``GROUP_RANK``) in its heartbeat, so a lost node is named as a node even where every host has the same name.

The reference is one node of four ranks running the same config: the two-node job must train on the same samples
with the same losses; a node killed (``kill -9`` of its launcher and ranks) or stopped (``SIGSTOP``) mid-step must
make the survivors leave with a message that names it, and the relaunch resume from the newest complete checkpoint
on the reference samples; under ``--max-restarts`` the elastic agent restarts the group itself.
``docs/reliability.md`` lists each fault with its outcome and the command that reproduces it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _multinode import (
    agent_of,
    complete_steps,
    keys_by_step,
    ranks_by_node,
    run_dir,
    signal_node,
    start_deepspeed_node,
    start_node,
    tensorboard_losses,
    wait_for_file,
)

from conftest import REPO_ROOT, TINY_MODEL, clean_launcher_env, free_port

pytestmark = [pytest.mark.distributed]

ZERO2 = str(Path(REPO_ROOT, "ds_configs", "zero2.json"))
STEPS, EVERY, MICRO = 8, 2, 8  # 256 samples / (4 ranks × 8) = 8 steps: one epoch
# dist.timeout_minutes of the runs. It bounds the process group's formation too, and the start-up of 4 ranks on a
# loaded 2-core machine (DeepSpeed may JIT-build its shared-memory op first) can take minutes: generous everywhere but
# in the stopped-node test, which waits for it.
TIMEOUT_MIN = 5.0
STOPPED_TIMEOUT_MIN = 1.5


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--deepspeed", ZERO2,
        "--config", str(Path(REPO_ROOT, "configs", "demo_cpu.yaml")),
        "--run.output_dir", str(out),
        "--run.name", "mn",
        *TINY_MODEL,
        "--data.train_data", str(shards / "train" / "synth-train-{000000..000003}.tar"),
        "--data.num_workers", "1",
        "--optim.micro_batch_size", str(MICRO),
        "--schedule.total_steps", str(STEPS),
        "--schedule.warmup_steps", "1",
        "--logging.log_every", "1",
        "--logging.sample_keys", "true",
        "--checkpoint.every_steps", str(EVERY),
        "--checkpoint.export", "false",
        "--eval.zeroshot_data", "null",
        "--dist.timeout_minutes", str(TIMEOUT_MIN),  # the last value of a field wins: *extra may raise it
        "--dist.heartbeat_seconds", "1",
        *extra,
    ]  # fmt: skip


def node_env(**extra: str) -> dict[str, str]:
    return {**clean_launcher_env(), "OMP_NUM_THREADS": "1", **extra}


def two_nodes(
    shards: Path, out: Path, tag: str, *extra: str, env: dict[str, str] | None = None, torchrun: tuple[str, ...] = ()
) -> list[subprocess.Popen]:
    """Node 0 and node 1 of one job (one c10d rendezvous endpoint, hosted by node 0's agent)."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"{tag}-{time.time_ns()}"
    args = train_args(shards, out, *extra)
    return [start_node(out, f"{tag}_node{i}.txt", args, nproc=2, env=node_env(**(env or {})),
                       rdzv=(2, i, endpoint, run_id), torchrun=torchrun) for i in (0, 1)]  # fmt: skip


def finish(procs: list[subprocess.Popen], timeout: float = 420) -> list[tuple[int, str]]:
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        kill_all(procs)
        logs = "\n".join(p.log_path.read_text()[-3000:] for p in procs)
        pytest.fail(f"the job did not finish within {timeout} s:\n{logs}")
    return [(p.returncode, p.log_path.read_text()) for p in procs]


def kill_all(procs: list[subprocess.Popen], out: Path | None = None) -> None:
    """SIGKILL every agent and rank (stopped ones included) of the job in ``out``."""
    ranks = [pid for node in ranks_by_node(out).values() for pid in node.values()] if out else []
    for p in procs:
        signal_node(p, ranks, signal.SIGKILL)
        p.wait()


@pytest.fixture(autouse=True)
def reap(tmp_path):
    """No rank of a test's jobs outlives the test, whatever happened in it (stopped ones included)."""
    yield
    for node in ranks_by_node(tmp_path).values():
        for pid in node.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def one_node(shards, tmp_path_factory) -> dict:
    """The reference: one node of four ranks, uninterrupted; its sample keys per rank and step, and its losses."""
    out = tmp_path_factory.mktemp("one_node")
    args = train_args(shards, out, "--dist.timeout_minutes", "5")
    [(rc, log)] = finish([start_node(out, "log.txt", args, nproc=4, env=node_env())])
    assert rc == 0, log[-4000:]
    keys = {r: keys_by_step(out, r) for r in range(4)}
    assert all(sorted(keys[r]) == list(range(1, STEPS + 1)) for r in range(4))
    seen = [k for r in range(4) for step in keys[r].values() for k in step]
    assert len(set(seen)) == len(seen) == 256  # one epoch, every sample once
    return {"keys": keys, "losses": tensorboard_losses(out)}


def resume_two_nodes(shards: Path, out: Path, reference: dict, expect_from: int) -> None:
    """Relaunch both nodes with ``--checkpoint.resume latest``: they restart at ``expect_from`` and, with what the
    interrupted run logged, every rank trains every step on exactly the reference samples."""
    results = finish(two_nodes(shards, out, "resume", "--checkpoint.resume", "latest"))
    logs = "\n".join(log for _, log in results)
    assert [rc for rc, _ in results] == [0, 0], logs[-4000:]
    assert re.search(rf"resumed from \S+step_{expect_from:08d} at step {expect_from} ", logs), logs[-3000:]
    for r in range(4):
        assert keys_by_step(out, r) == reference["keys"][r], f"rank {r}: the resumed run trained on other samples"
    assert complete_steps(out)[-1] == STEPS


# ------------------------------------------------------------------------------------------------ two nodes
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_of_two_ranks_train_like_one_node_of_four(shards, tmp_path, one_node):
    results = finish(two_nodes(shards, tmp_path, "job", "--dist.timeout_minutes", "5"))
    logs = [log for _, log in results]
    assert [rc for rc, _ in results] == [0, 0], "\n".join(x[-3000:] for x in logs)
    # The same samples on every global rank and the same losses, step for step.
    for r in range(4):
        assert keys_by_step(tmp_path, r) == one_node["keys"][r], f"rank {r} trained on other samples"
    losses = tensorboard_losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in one_node["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=0), f"step {step}"
    # Each rank knows its node: ranks 0-1 on one agent, 2-3 on the other (torchrun's GROUP_RANK).
    beats = {r: json.loads((run_dir(tmp_path) / "heartbeats" / f"rank{r:05d}.json").read_text())
             for r in range(4)}  # fmt: skip
    assert {r: b["node"] for r, b in beats.items()} == {0: 0, 1: 0, 2: 1, 3: 1}
    # Once per job, not once per node: one summary, one TensorBoard writer, one run folder, one checkpoint series.
    assert sum(log.count("RankCLIP-DS run finished") for log in logs) == 1
    assert len(list((run_dir(tmp_path) / "tb").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["mn"]
    assert complete_steps(tmp_path) == [6, 8]  # checkpoint.keep_last 2 of the demo recipe
    assert (run_dir(tmp_path) / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert sum(log.count("init process group: backend=gloo rank=0/4") for log in logs) == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_under_the_deepspeed_launcher_without_ssh_train_like_one_node(shards, tmp_path, one_node):
    # The DeepSpeed launcher's multi-node path with --no_ssh: a hostfile of two (fictitious) hosts, one launcher per
    # node given its --node_rank, as a scheduler would start them; the ranks read CROSS_RANK as their node.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    port, args = free_port(), train_args(shards, tmp_path, "--dist.timeout_minutes", "5")
    procs = [start_deepspeed_node(tmp_path, f"ds_node{i}.txt", args, hostfile=hostfile, node_rank=i, master_port=port,
                                  env=node_env()) for i in (0, 1)]  # fmt: skip
    results = finish(procs)
    logs = "\n".join(log for _, log in results)
    assert [rc for rc, _ in results] == [0, 0], logs[-4000:]
    assert "launcher=deepspeed" in logs
    for r in range(4):
        assert keys_by_step(tmp_path, r) == one_node["keys"][r], f"rank {r} trained on other samples"
    losses = tensorboard_losses(tmp_path)
    for step, loss in one_node["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=0), f"step {step}"
    beats = {r: json.loads((run_dir(tmp_path) / "heartbeats" / f"rank{r:05d}.json").read_text()) for r in range(4)}
    assert {r: b["node"] for r, b in beats.items()} == {0: 0, 1: 0, 2: 1, 3: 1}


# ------------------------------------------------------------------------------------------------ a lost node
def lose_a_node(shards: Path, out: Path, sig: int, timeout_min: float) -> tuple[int, str, float, int]:
    """Runs two nodes until rank 2 sits in a pause after step 3 (the others go on into step 4 and wait for it), then
    sends ``sig`` to its whole node (agent and ranks). Returns the surviving agent's exit code, the survivors' log,
    the seconds from the signal to the surviving agent's exit, and the lost node's number."""
    procs = two_nodes(shards, out, "crash", "--dist.timeout_minutes", str(timeout_min),
                      env={"RANKCLIP_TEST_PAUSE": f"2:{EVERY + 1}:600"})  # fmt: skip
    try:
        return _lose_a_node(procs, out, sig, timeout_min)
    except BaseException:
        kill_all(procs, out)  # whatever failed, no agent or rank is left behind
        raise


def _lose_a_node(procs: list[subprocess.Popen], out: Path, sig: int, timeout_min: float) -> tuple[int, str, float, int]:
    pid = wait_for_file(run_dir(out) / "paused_rank2", procs, timeout=300)
    if not pid:
        kill_all(procs, out)
        pytest.fail("rank 2 did not reach its pause:\n" + "\n".join(p.log_path.read_text()[-3000:] for p in procs))
    lost_agent = agent_of(procs, int(pid))
    [survivor] = [p for p in procs if p is not lost_agent]
    nodes = ranks_by_node(out)
    [lost] = [n for n, ranks in nodes.items() if 2 in ranks]
    assert sorted(nodes[lost]) == [2, 3] and sorted(nodes[1 - lost]) == [0, 1]
    start = time.time()
    signal_node(lost_agent, list(nodes[lost].values()), sig)
    try:
        rc = survivor.wait(timeout=3 * 60 * timeout_min)  # not a hang: well within 3 × the timeout
    except subprocess.TimeoutExpired:
        kill_all(procs, out)
        pytest.fail(f"the surviving node did not exit:\n{survivor.log_path.read_text()[-4000:]}")
    detection = time.time() - start
    kill_all([lost_agent], out)  # the stopped node (SIGKILL ends stopped processes too)
    print(f"signal {sig}: the surviving node exited {detection:.1f} s after the signal")
    return rc, survivor.log_path.read_text(), detection, lost


def check_lost_node_message(log: str, lost: int, what: str) -> None:
    """Both survivors (ranks 0 and 1) print the named error and exit 1; the message names the lost node's ranks."""
    for rank in (0, 1):
        assert re.search(rf"error \(rank {rank}\): rank {rank} of 4 {what} in the collective '[^']+' at step \d+\.",
                         log), log[-4000:]  # fmt: skip
    assert re.search(rf"Lost node: node {lost} \(host \S+\), ranks 2, 3: every one of its ranks went silent", log), log[
        -4000:
    ]
    for rank in (2, 3):
        assert re.search(rf"  rank {rank} on host \S+ pid \d+: last heartbeat [\d.]+ s ago, .*node {lost}", log)
    assert "exitcode  : 1 " in log  # torchrun's summary of the survivors: our exit code 1, no signal


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_of_a_node_names_it_and_the_relaunch_resumes(shards, tmp_path, one_node):
    rc, log, _, lost = lose_a_node(shards, tmp_path, signal.SIGKILL, TIMEOUT_MIN)
    assert rc == 1, log[-4000:]  # torchrun's agent: 1 when a worker failed (ChildFailedError)
    check_lost_node_message(log, lost, "lost a peer")
    assert complete_steps(tmp_path) == [EVERY]
    resume_two_nodes(shards, tmp_path, one_node, expect_from=EVERY)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stopped_node_times_out_names_it_and_the_relaunch_resumes(shards, tmp_path, one_node):
    rc, log, detection, lost = lose_a_node(shards, tmp_path, signal.SIGSTOP, STOPPED_TIMEOUT_MIN)
    assert rc == 1, log[-4000:]
    check_lost_node_message(log, lost, f"timed out after {STOPPED_TIMEOUT_MIN:g} min \\(dist.timeout_minutes\\)")
    assert detection >= 60 * STOPPED_TIMEOUT_MIN  # it waited for the timeout: a stopped node does not close its sockets
    assert complete_steps(tmp_path) == [EVERY]
    resume_two_nodes(shards, tmp_path, one_node, expect_from=EVERY)


def test_the_message_names_a_node_whose_every_rank_went_silent(tmp_path):
    # Heartbeats as the kill -9 test leaves them: node 1's ranks stopped writing 8 s ago (their thread writes every
    # second), rank 1 on node 0 failed with its own error, rank 3 was even in the same collective.
    from rankclip_ds.trainer.heartbeat import FAILED_PHASE
    from rankclip_ds.trainer.watchdog import collective_timeout_error

    now = 1000.0
    beats = {1: (0, 3, f"{FAILED_PHASE} rank 1 of 4 lost a peer", now - 1), 2: (1, 3, "data loading", now - 8),
             3: (1, 3, "stop-flag all_reduce", now - 8)}  # fmt: skip
    for rank, (node, step, phase, t) in beats.items():
        record = {"rank": rank, "node": node, "host": "h", "pid": 100 + rank, "step": step, "phase": phase,
                  "time": t, "since": t - 1, "interval_s": 1.0, "alive_interval_s": 1.0}  # fmt: skip
        (tmp_path / f"rank{rank:05d}.json").write_text(json.dumps(record))
    gloo = "[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:4000"
    msg = str(collective_timeout_error(RuntimeError(gloo), collective="stop-flag all_reduce", rank=0, world_size=4,
                                       step=3, timeout_minutes=5, heartbeat_dir=tmp_path, now=now))  # fmt: skip
    assert (
        "Lost node: node 1 (host h), ranks 2, 3: every one of its ranks went silent (newest heartbeat 8.0 s ago)" in msg
    )
    assert "Lost node: node 0" not in msg  # rank 1 failed with its own error: gone, but not silently
    assert "  rank 3 on host h pid 103: last heartbeat 8.0 s ago, at step 3 in 'stop-flag all_reduce' for 9.0 s, " \
           "node 1" in msg  # fmt: skip
    assert "rank 0 of 4 lost a peer in the collective 'stop-flag all_reduce' at step 3." in msg


# ------------------------------------------------------------------------------------------------ in-job restart
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_max_restarts_restarts_the_group_which_resumes_from_the_newest_checkpoint(shards, tmp_path, one_node):
    # One node of four ranks under the elastic agent with one restart allowed; rank 1 is killed once after step 3
    # (checkpoint 2 is complete). The agent restarts the group by itself; the new group resumes from checkpoint 2.
    args = train_args(shards, tmp_path, "--checkpoint.resume", "latest")
    proc = start_node(tmp_path, "elastic.txt", args, nproc=4, torchrun=("--max-restarts", "1"),
                      env=node_env(RANKCLIP_TEST_PAUSE=f"1:{EVERY + 1}:600"))  # fmt: skip
    pid = wait_for_file(run_dir(tmp_path) / "paused_rank1", [proc], timeout=300)
    assert pid, proc.log_path.read_text()[-4000:]
    os.kill(int(pid), signal.SIGKILL)
    [(rc, log)] = finish([proc])
    assert rc == 0, log[-4000:]
    # Two attempts of the group inside one torchrun job (the agent's own "will restart" line is at INFO, not shown).
    assert log.count("init process group: backend=gloo rank=0/4") == 2, log[-4000:]
    assert re.search(rf"resumed from \S+step_{EVERY:08d} at step {EVERY} ", log), log[-4000:]
    assert "RankCLIP-DS run finished" in log
    for r in range(4):
        assert keys_by_step(tmp_path, r) == one_node["keys"][r], f"rank {r}: the restarted group trained on others"
    # No leftover trips the new group: the checkpoints are complete, TensorBoard shows one value per step (the
    # crashed attempt's step 3 replaced) equal to the uninterrupted run's, the heartbeats are the new processes'.
    assert complete_steps(tmp_path) == [6, 8]
    losses = tensorboard_losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in one_node["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=2e-5, abs=0), f"step {step}"
    beat = json.loads((run_dir(tmp_path) / "heartbeats" / "rank00001.json").read_text())
    assert beat["pid"] != int(pid)  # written by the restarted rank 1


# ------------------------------------------------------------------------------------------------ bad input
def test_a_rendezvous_endpoint_that_never_answers_is_a_clear_error(shards, tmp_path):
    # Rank 1 of 2, launched by hand, pointed at a port where nothing listens: within the timeout (6 s) it exits 2
    # with the endpoint, the timeout and the fix instead of a stack trace (torch retries the connection until then).
    port = free_port()
    env = {**node_env(), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    cmd = [sys.executable, str(Path(REPO_ROOT, "rankclip_ds", "train.py")),
           *train_args(shards, tmp_path, "--dist.timeout_minutes", "0.1")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert (f"launcher environment error (rank 1): rank 1 of 2 (node 0, launcher env) could not form the process "
            f"group at the rendezvous endpoint 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) within 0.1 min "
            "(dist.timeout_minutes): ") in err, err[-3000:]  # fmt: skip
    assert "Fix: check that 127.0.0.1:" in err and "all 2 ranks (1 node(s) × 2 ranks) were started" in err
    assert "Traceback" not in err


def test_a_node_count_that_does_not_divide_the_global_batch_names_the_nodes(shards, tmp_path, monkeypatch, capsys):
    # Rank 0 of 2 nodes × 4 ranks (torchrun's variables), global batch 36: the real entry point stops in the
    # pre-flight, before any process group exists, naming the nodes, the batch and the fix.
    from rankclip_ds.train import main

    torchrun = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "0",
                "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}  # fmt: skip
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    args = train_args(shards, tmp_path, "--optim.global_batch_size", "36", "--optim.micro_batch_size", "null")
    assert main(args) == 2
    assert (
        "config error: optim.global_batch_size=36: is not divisible by grad_accum_steps × world_size = 1 × 8 = 8. "
        "Fix: use a global batch that is a multiple of 8, or change grad_accum_steps. The world is 2 nodes × 4 ranks "
        "per node = 8 ranks: launch a node count (of 4 ranks) that divides it (up to 8 nodes: 1, 3), or keep 2 nodes "
        "with a global batch of 32 or 40 (a multiple of grad_accum_steps × nodes × ranks per node = 1 × 2 × 4 = 8)."
    ) in capsys.readouterr().err
    assert not (tmp_path / "mn").exists()  # stopped before the run folder
