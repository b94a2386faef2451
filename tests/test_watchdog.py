"""Heartbeats and collective-timeout diagnosis: a timeout names the collective, this rank and the stuck rank."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import REPO_ROOT, clean_launcher_env, free_port
from rankclip_ds.trainer import watchdog
from rankclip_ds.trainer.errors import CollectiveTimeoutError, TrainingError
from rankclip_ds.trainer.heartbeat import Heartbeat, read_heartbeats
from rankclip_ds.trainer.watchdog import (
    CollectiveTracker,
    collective_timeout_error,
    is_collective_failure,
    is_collective_timeout,
)

# What torch 2.14 raised on this machine (gloo, timeout 3 s, the peer asleep or SIGSTOPped; see the module docstring).
GLOO_RECV = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for "
    "recv operation to complete"
)
GLOO_SEND = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 3000ms for "
    "send operation to complete"
)
GLOO_PEER_CLOSED = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
    "[127.0.0.1]:41386. This is typically caused by a remote worker crashing. Check the logs of the remote worker "
    "before reporting an error. GLHF! \U0001f3d6\ufe0f"
)
# ProcessGroupNCCL's words (its watchdog; TORCH_NCCL_BLOCKING_WAIT=1); raised as DistBackendError.
NCCL_WATCHDOG = (
    "[Rank 6] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=57, OpType=ALLGATHER, NumelIn=191, "
    "NumelOut=1528, Timeout(ms)=200000) ran for 200059 milliseconds before timing out."
)
NCCL_BLOCKING = (
    "[Rank 0] Work WorkNCCL(SeqNum=3, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=60000) timed out in "
    "blocking wait."
)


# ------------------------------------------------------------------------------------------------ the recogniser
@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(RuntimeError(GLOO_RECV), id="gloo-recv"),
        pytest.param(RuntimeError(GLOO_SEND), id="gloo-send"),
        pytest.param(dist.DistBackendError(NCCL_WATCHDOG), id="nccl-watchdog"),
        pytest.param(dist.DistBackendError(NCCL_BLOCKING), id="nccl-blocking-wait"),
        pytest.param(RuntimeError(NCCL_WATCHDOG), id="nccl-watchdog-as-runtime-error"),
        pytest.param(dist.DistStoreError("wait timeout after 3000ms, keys: /default_pg/0//cpu//0"), id="store"),
        pytest.param(RuntimeError("Rank 1 failed to pass monitoredBarrier in 3000 ms"), id="monitored-barrier"),
    ],
)
def test_recognises_collective_timeouts(exc):
    assert is_collective_timeout(exc)
    assert is_collective_failure(exc)


def test_recognises_a_timeout_anywhere_in_the_chain():
    try:
        try:
            raise RuntimeError(GLOO_RECV)
        except RuntimeError as inner:
            raise ValueError("the loss failed") from inner
    except ValueError as outer:
        assert is_collective_timeout(outer)
    try:
        try:
            raise dist.DistBackendError(NCCL_WATCHDOG)
        except RuntimeError:
            raise KeyError("while handling it") from None  # __context__ is kept even when suppressed
    except KeyError as outer:
        assert is_collective_timeout(outer)


def test_cyclic_chain_terminates():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__context__ = b, a
    assert not is_collective_timeout(a)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("DataLoader timed out after 5 seconds"),  # not a collective: must pass through the guard
        TimeoutError("timed out"),
        RuntimeError("CUDA out of memory"),
        ValueError("Timed out waiting for the user"),
        dist.DistBackendError("NCCL error: invalid usage"),
    ],
)
def test_other_errors_are_not_collective_timeouts(exc):
    assert not is_collective_timeout(exc)
    assert not is_collective_failure(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError(GLOO_PEER_CLOSED),
        dist.DistBackendError("NCCL communicator was aborted on rank 3."),
        dist.DistBackendError("NCCL error: remote process exited or there was a network error, ncclRemoteError"),
    ],
)
def test_lost_peer_is_a_failure_not_a_timeout(exc):
    assert is_collective_failure(exc)
    assert not is_collective_timeout(exc)


# ------------------------------------------------------------------------------------------------ heartbeats
def test_heartbeat_is_throttled_unless_forced(tmp_path):
    hb = Heartbeat(tmp_path / "hb", 3, min_interval_s=3600)
    assert hb.beat(1, "forward")  # the first beat always writes (and creates the folder)
    assert not hb.beat(2, "backward")
    assert read_heartbeats(tmp_path / "hb")[3]["step"] == 1
    assert hb.beat(2, "checkpoint barrier", force=True)
    record = read_heartbeats(tmp_path / "hb")[3]
    assert record["step"] == 2 and record["phase"] == "checkpoint barrier"
    assert (hb.step, hb.phase) == (2, "checkpoint barrier")


def test_heartbeat_writes_again_after_the_interval(tmp_path):
    hb = Heartbeat(tmp_path, 0, min_interval_s=0.05)
    assert hb.beat(1, "a")
    time.sleep(0.06)
    assert hb.beat(2, "b")
    assert read_heartbeats(tmp_path)[0]["step"] == 2


def test_heartbeat_record_and_atomic_file(tmp_path):
    hb = Heartbeat(tmp_path, 12, min_interval_s=0)
    t0 = time.time()
    hb.beat(7, "loss ring exchange (forward)")
    time.sleep(0.01)
    hb.beat(7, "loss ring exchange (forward)")  # same phase: `since` stays at the first entry
    assert sorted(os.listdir(tmp_path)) == ["rank00012.json"]  # no temporary file left behind
    record = json.loads((tmp_path / "rank00012.json").read_text())
    assert {k: record[k] for k in ("rank", "host", "pid", "step", "phase")} == {
        "rank": 12,
        "host": hb.host,
        "pid": os.getpid(),
        "step": 7,
        "phase": "loss ring exchange (forward)",
    }
    assert t0 <= record["since"] < record["time"] <= time.time()
    assert record["alive_interval_s"] is None  # no thread: the file's age says nothing about liveness


def test_heartbeat_never_raises_and_warns_once(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    hb = Heartbeat(blocker / "hb", 0, min_interval_s=0)
    with caplog.at_level(logging.DEBUG, logger=watchdog.__name__):
        assert not hb.beat(1, "forward")
        assert not hb.beat(2, "forward", force=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot write heartbeat" in warnings[0].getMessage()
    assert hb.step == 2  # the state is still tracked


def test_heartbeat_thread_keeps_the_file_fresh(tmp_path):
    with Heartbeat(tmp_path, 1, min_interval_s=0.05) as hb:
        hb.beat(3, "gradient all-reduce (backward)")
        first = read_heartbeats(tmp_path)[1]["time"]
        deadline = time.time() + 5
        while read_heartbeats(tmp_path)[1]["time"] == first and time.time() < deadline:
            time.sleep(0.02)  # the main thread "blocks"; only the thread can write
        record = read_heartbeats(tmp_path)[1]
        assert record["time"] > first
        assert record["phase"] == "gradient all-reduce (backward)" and record["alive_interval_s"] == 0.05
    assert hb._thread is None


def test_read_heartbeats_skips_junk(tmp_path):
    Heartbeat(tmp_path, 2).beat(5, "forward")
    (tmp_path / "rank00003.json").write_text("{half a fi")
    (tmp_path / "rank00004.json.tmp99").write_text("{}")
    (tmp_path / "rank00005.json").write_text("[1, 2]")
    (tmp_path / "notes.txt").write_text("hello")
    assert list(read_heartbeats(tmp_path)) == [2]
    assert read_heartbeats(tmp_path / "missing") == {}
    assert read_heartbeats(None) == {}


# ------------------------------------------------------------------------------------------------ the message
def _write_beat(directory: Path, rank: int, step: int, phase: str, t: float, host: str = "node") -> None:
    record = {"rank": rank, "host": f"{host}{rank}", "pid": 1000 + rank, "step": step, "phase": phase, "time": t}
    (directory / f"rank{rank:05d}.json").write_text(json.dumps(record | {"since": t - 1}))


def test_message_names_this_rank_the_collective_and_the_silent_ranks(tmp_path):
    now = 10_000.0
    _write_beat(tmp_path, 0, 12, "gradient all-reduce (backward)", now - 1800)
    _write_beat(tmp_path, 1, 12, "gradient all-reduce (backward)", now - 2)  # waiting with us, alive
    _write_beat(tmp_path, 2, 11, "data loading", now - 1830)  # stopped first
    _write_beat(tmp_path, 3, 12, "forward", now - 1805)
    _write_beat(tmp_path, 9, 1, "forward", now)  # not part of this world
    err = collective_timeout_error(
        RuntimeError(GLOO_RECV),
        collective="gradient all-reduce (backward)",
        rank=0,
        world_size=5,
        step=12,
        timeout_minutes=30.0,
        heartbeat_dir=tmp_path,
        now=now,
    )
    assert isinstance(err, CollectiveTimeoutError) and isinstance(err, TrainingError)
    msg = str(err)
    lines = msg.splitlines()
    assert lines[0] == (
        "rank 0 of 5 timed out after 30 min (dist.timeout_minutes) in the collective "
        "'gradient all-reduce (backward)' at step 12."
    )
    listed = [line for line in lines if line.startswith("  rank ")]
    assert listed[0].startswith("  rank 2 on host node2 pid 1002: last heartbeat 30.5 min ago, at step 11 in 'data")
    assert listed[1].startswith("  rank 3 on host node3 pid 1003: last heartbeat 30.1 min ago, at step 12 in 'forw")
    assert len(listed) == 2  # rank 1 was waiting in the same collective, rank 9 is not in the world
    assert "Never reported (no heartbeat file; likely stuck at start-up or dead): ranks 4" in msg
    assert "1 other rank(s) were in this collective at step 12 as well" in msg
    assert "raise dist.timeout_minutes (now 30)" in msg
    assert lines[-1] == f"Original error: RuntimeError: {GLOO_RECV}"


def test_message_when_everyone_is_in_the_collective_and_for_an_earlier_attempt(tmp_path):
    now = 5000.0
    for r in range(3):
        _write_beat(tmp_path, r, 8, "checkpoint barrier", now - 60 - r)
    err = collective_timeout_error(
        dist.DistBackendError(NCCL_WATCHDOG * 5),
        collective="checkpoint barrier",
        rank=1,
        world_size=3,
        step=8,
        timeout_minutes=1,
        heartbeat_dir=tmp_path,
        started=now - 61.5,
        now=now,
    )
    msg = str(err)
    assert "Every rank that reported was in this collective too" in msg
    assert msg.index("  rank 2 ") < msg.index("  rank 0 ")
    assert "[heartbeat older than this process" in msg.split("  rank 2 ")[1].splitlines()[0]
    assert "[heartbeat older" not in msg.split("  rank 0 ")[1].splitlines()[0]
    last = msg.splitlines()[-1]
    assert last.startswith("Original error: DistBackendError: [Rank 6] Watchdog caught") and len(last) < 340


def test_message_without_heartbeats_and_for_a_lost_peer(tmp_path):
    err = collective_timeout_error(
        RuntimeError(GLOO_PEER_CLOSED),
        collective="loss ring exchange (forward)",
        rank=0,
        world_size=2,
        step=3,
        timeout_minutes=30,
        heartbeat_dir=None,
    )
    msg = str(err)
    assert msg.startswith("rank 0 of 2 lost a peer in the collective 'loss ring exchange (forward)' at step 3.")
    assert "No heartbeat folder was configured" in msg
    assert "a rank died" in msg
    msg = str(
        collective_timeout_error(
            RuntimeError(GLOO_SEND),
            collective="x",
            rank=0,
            world_size=3,
            step=0,
            timeout_minutes=0.5,
            heartbeat_dir=tmp_path / "empty",
        )
    )
    assert "Never reported (no heartbeat file; likely stuck at start-up or dead): ranks 1, 2" in msg


# ------------------------------------------------------------------------------------------------ the guard
def test_guard_converts_timeouts_and_passes_everything_else(tmp_path):
    hb = Heartbeat(tmp_path, 0, min_interval_s=3600)
    tracker = CollectiveTracker(rank=0, world_size=2, timeout_minutes=30, heartbeat=hb)
    tracker.enter("forward", 5)
    original = RuntimeError(GLOO_RECV)
    with pytest.raises(CollectiveTimeoutError) as info, tracker.guard("stop-flag all_reduce", 5):
        raise original
    assert info.value.__cause__ is original
    assert "'stop-flag all_reduce' at step 5" in str(info.value)
    assert (tracker.phase, tracker.step) == ("stop-flag all_reduce", 5)

    other = RuntimeError("DataLoader timed out after 5 seconds")
    with pytest.raises(RuntimeError) as info, tracker.guard("data loading", step=6):
        raise other
    assert info.value is other

    # An inner guard's error passes an outer guard unchanged.
    with pytest.raises(CollectiveTimeoutError) as info, tracker.guard(), tracker.guard("checkpoint barrier", 6):
        raise RuntimeError(GLOO_SEND)
    assert "'checkpoint barrier' at step 6" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)

    with pytest.raises(KeyboardInterrupt), tracker.guard():
        raise KeyboardInterrupt

    with tracker.guard("evaluation", 7) as t:
        assert t is tracker


def test_tracker_enter_does_no_io_within_the_interval(tmp_path):
    hb = Heartbeat(tmp_path, 0, min_interval_s=3600)
    tracker = CollectiveTracker(rank=0, world_size=2, timeout_minutes=30, heartbeat=hb)
    tracker.enter("forward", 1)
    mtime = (tmp_path / "rank00000.json").stat().st_mtime_ns
    for step in range(2000):
        for phase in ("forward", "loss ring exchange (forward)", "gradient all-reduce (backward)"):
            tracker.enter(phase, step)
    assert (tmp_path / "rank00000.json").stat().st_mtime_ns == mtime  # no I/O
    tracker.enter("stop-flag all_reduce", 1999, force=True)
    record = read_heartbeats(tmp_path)[0]
    assert (record["step"], record["phase"]) == (1999, "stop-flag all_reduce")


# ------------------------------------------------------------------------------------------------ two real ranks
WORKER = os.path.join(REPO_ROOT, "tests", "_watchdog_worker.py")


def _run_pair(scenario: str, tmp_path: Path, timeout_s: float = 3.0) -> dict:
    """Rank 1 stops participating after a heartbeat at step 4; rank 0 runs a guarded collective. Returns what rank 0
    caught. Both processes are killed (their whole session) whatever happens, and every wait is bounded."""
    port = free_port()
    out = tmp_path / "rank0.json"
    procs: list[subprocess.Popen] = []
    try:
        for rank in (0, 1):
            env = clean_launcher_env() | {
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "TIMEOUT_S": str(timeout_s),
                "OMP_NUM_THREADS": "1",
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, WORKER, scenario, str(tmp_path / "hb"), str(out)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,  # so the kill below reaches anything it started
                )
            )
        try:
            stdout, _ = procs[0].communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 did not finish within 60 s (scenario {scenario})")
        assert procs[0].returncode == 0, stdout
        assert out.is_file(), stdout
        return json.loads(out.read_text())
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate(timeout=30)


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "scenario, collective, step, cause",
    [
        pytest.param("sleep", "stop-flag all_reduce", 4, "Timed out waiting 3000ms for recv", id="all_reduce-asleep"),
        pytest.param("stop", "loss ring exchange (forward)", 7, "Timed out waiting 3000ms for send", id="ring-stopped"),
    ],
)
def test_real_timeout_names_collective_and_stuck_rank(tmp_path, scenario, collective, step, cause):
    got = _run_pair(scenario, tmp_path)
    assert got["raised"] == "CollectiveTimeoutError", got
    assert got["cause_type"] == "RuntimeError" and cause in got["cause"], got
    msg = got["message"]
    lines = msg.splitlines()
    assert lines[0] == (
        f"rank 0 of 2 timed out after 0.05 min (dist.timeout_minutes) in the collective '{collective}' at step {step}."
    ), msg
    stuck = [line for line in lines if line.startswith("  rank 1 on host ")]
    assert len(stuck) == 1 and "at step 4 in 'forward'" in stuck[0], msg
    assert "Never reported" not in msg
    assert "raise dist.timeout_minutes" in msg
    assert lines[-1].startswith("Original error: RuntimeError: [") and cause in lines[-1], msg


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_real_dead_peer_is_named_too(tmp_path):
    got = _run_pair("die", tmp_path, timeout_s=60.0)  # gloo reports the closed connection at once, not at 60 s
    assert got["raised"] == "CollectiveTimeoutError", got
    msg = got["message"]
    assert msg.startswith("rank 0 of 2 lost a peer in the collective 'stop-flag all_reduce' at step 4."), msg
    assert "  rank 1 on host " in msg and "at step 4 in 'forward'" in msg
    assert "Connection closed by peer" in msg.splitlines()[-1]


def test_a_failed_trainer_build_stops_the_heartbeat_thread(tmp_path, monkeypatch):
    """The heartbeat starts with the run folder; a build phase after it that raises (here the model) must not leave
    the thread behind (train.py has no trainer to close then)."""
    import threading

    from rankclip_ds.config import load_config
    from rankclip_ds.dist import DistInfo
    from rankclip_ds.resolved import resolve_run
    from rankclip_ds.trainer import setup as setup_module
    from rankclip_ds.trainer import trainer as trainer_module

    def no_model(cfg, info):
        raise RuntimeError("model build failed")

    monkeypatch.setattr(setup_module, "init_distributed", lambda info, **kwargs: None)
    monkeypatch.setattr(trainer_module, "build_model_for_training", no_model)
    cfg = load_config(None, ["--run.output_dir", str(tmp_path), "--run.name", "r", "--optim.micro_batch_size", "8"])
    info = DistInfo(0, 1, 0, 1, 0, "127.0.0.1", free_port(), "single", "cpu")
    with pytest.raises(RuntimeError, match="model build failed"):
        trainer_module.Trainer(cfg, resolve_run(cfg, {"zero_optimization": {"stage": 2}}, 1), info)
    assert read_heartbeats(tmp_path / "r" / "heartbeats")[0]["phase"] == "start-up"  # it had started
    assert not [t for t in threading.enumerate() if t.name.startswith("heartbeat-rank")]
