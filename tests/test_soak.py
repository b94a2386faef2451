"""Soak: 300 steps on 2 ranks with a fault every ~40 steps, relaunched automatically, against an uninterrupted run.

The job is the real entry point under torchrun (tiny towers, dropout off, fp32, ZeRO-2), reading its shards over
HTTP from a real server started here. The shards hold one corrupt sample (an image member that is not an image),
met in every epoch of both runs. A supervisor loop here relaunches the job with ``--checkpoint.resume latest``
whenever it exits, arming the next fault:

======  ===========================================================================================================
step    fault
======  ===========================================================================================================
40      ``kill -9`` of rank 1 (rank 0 must fail naming it)
80      ``SIGTERM`` to rank 0 (graceful stop: both ranks save and exit 75)
120     a full disk while rank 1 writes checkpoint 120 (``ENOSPC``; the run stops with the path, 110 stays latest)
~160    the HTTP server resets the connection in the middle of each shard once (retried, resumed with ``Range``)
200     ``kill -9`` of rank 0
240     ``SIGTERM`` to rank 1
======  ===========================================================================================================

At the end: every step trained on the uninterrupted run's samples; in every completed epoch each good sample was
seen exactly once and the corrupt one never (one sample repeated as padding in its place); the final weights equal
the uninterrupted run's (same-world resume tolerance); the retries are in TensorBoard.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from _remote_servers import Fault, FaultyServer
from test_data_pipeline import jpeg
from test_fault_tolerance import complete_steps, finish, kill_job, launch, run_dir, wait_for_pause
from test_trainer import PARAM_ATOL, PARAM_RTOL, assert_same_params

from rankclip_ds.data.shard_writer import ShardSink

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS, EVERY, GLOBAL = 300, 10, 32
BAD_KEY = "extra00000013"


@pytest.fixture(scope="module")
def served(shards, tmp_path_factory):
    """The 256 synthetic samples plus a fifth shard of 32 (one of them corrupt): 288 = 9 steps of 32 per epoch."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(shards / "train", root / "train")
    with ShardSink(root / "train", "extra", 10_000) as sink:
        for i in range(32):
            key = f"extra{i:08d}"
            image = b"this is not an image" if key == BAD_KEY else jpeg(i, size=32)
            sink.write({"__key__": key, "jpg": image, "txt": f"a small red square number {i}"})
    (root / "train" / "extra-000000.tar").rename(root / "train" / "synth-train-000004.tar")
    manifest = json.loads((root / "train" / "_manifest.json").read_text())
    manifest["shards"]["synth-train-000004.tar"] = 32
    (root / "train" / "_manifest.json").write_text(json.dumps(manifest))
    server = FaultyServer(root=root)
    yield server
    server.close()


def soak_args(server: FaultyServer) -> list[str]:
    return [
        "--data.train_data", server.url("train/synth-train-{000000..000004}.tar"),
        "--data.remote_backoff_s", "0.05",
        "--optim.micro_batch_size", "16",
        "--schedule.total_steps", str(STEPS),
        "--logging.log_every", "10",
        "--logging.tensorboard", "true",
        "--checkpoint.every_steps", str(EVERY),
        "--checkpoint.export", "true",
        "--checkpoint.resume", "latest",
    ]  # fmt: skip


def keys_by_step(out: Path, rank: int) -> dict[int, list[str]]:
    """Step → keys rank ``rank`` trained on (a step redone after a relaunch keeps its last line)."""
    steps = {}
    for line in (run_dir(out) / "sample_keys" / f"rank{rank:05d}.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            steps[record["step"]] = record["keys"]
    return steps


def current_step(out: Path) -> int:
    try:
        return max(keys_by_step(out, 0))
    except (OSError, ValueError):
        return 0


def arm_resets_when(server: FaultyServer, out: Path, proc, step: int) -> None:
    """Once the job is past ``step``, every shard's next read is reset half way through (once)."""
    while current_step(out) < step:
        if proc.poll() is not None:
            pytest.fail(f"job ended (exit {proc.returncode}) before step {step}:\n{proc.log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    for i in range(5):
        size = (server.root / "train" / f"synth-train-{i:06d}.tar").stat().st_size
        server.faults[f"/train/synth-train-{i:06d}.tar"] = Fault("reset", times=1, at=size // 2)


def run_with_faults(shards: Path, server: FaultyServer, out: Path) -> list[tuple[str, int, str]]:
    """The supervisor: launches, injects the next fault, relaunches until the job exits 0."""
    args = soak_args(server)
    outcomes = []
    plan = [("kill9", 1, 40), ("sigterm", 0, 80), ("no_space", 1, 120), ("reset_then_kill9", 0, 200),
            ("sigterm", 1, 240), ("none", 0, 0)]  # fmt: skip
    for n, (fault, rank, step) in enumerate(plan):
        env = {}
        if fault in ("kill9", "reset_then_kill9"):
            env["RANKCLIP_TEST_PAUSE"] = f"{rank}:{step}:600"
        elif fault == "sigterm":
            env["RANKCLIP_TEST_PAUSE"] = f"{rank}:{step}:5"
        elif fault == "no_space":
            env["RANKCLIP_TEST_NO_SPACE"] = f"step_{step:08d}:{rank}"
        for marker in run_dir(out).glob("paused_rank*"):  # a previous launch's pause names a dead process
            marker.unlink()
        proc = launch(shards, out, f"launch{n}.txt", *args, env=env)
        if fault == "reset_then_kill9":
            arm_resets_when(server, out, proc, 150)
        if fault in ("kill9", "reset_then_kill9"):
            os.kill(wait_for_pause(proc, out, rank), signal.SIGKILL)
        elif fault == "sigterm":
            os.kill(wait_for_pause(proc, out, rank), signal.SIGTERM)
        rc, log = finish(proc, timeout=600)
        outcomes.append((fault, rc, log))
        if fault != "none" and rc == 0:
            pytest.fail(f"launch {n} ({fault}) finished instead of failing:\n{log[-3000:]}")
    kill_job(proc, out)
    return outcomes


def test_soak_300_steps_with_a_fault_every_40_steps(shards, served, tmp_path):
    reference, soaked = tmp_path / "reference", tmp_path / "soak"
    reference.mkdir(), soaked.mkdir()
    rc, log = finish(launch(shards, reference, "log.txt", *soak_args(served)), timeout=900)
    assert rc == 0, log[-4000:]
    outcomes = run_with_faults(shards, served, soaked)

    (_, rc1, log1), (_, rc2, log2), (_, rc3, log3), (_, rc4, log4), (_, rc5, log5), (_, rc6, log6) = outcomes
    assert "rank 0 of 2 lost a peer" in log1 and re.search(r"rank 1 on host \S+ pid \d+", log1), log1[-3000:]
    assert "stopped by signal 15 at step 80" in log2, log2[-3000:]
    assert "No space left on device" in log3 and "step_00000120" in log3, log3[-3000:]
    assert re.search(r"resumed from \S+step_00000110 at step 110 ", log4), log4[-3000:]
    assert "rank 1 of 2 lost a peer" in log4, log4[-3000:]
    assert "stopped by signal 15 at step 240" in log5, log5[-3000:]
    assert rc6 == 0 and complete_steps(soaked)[-1] == STEPS, log6[-3000:]
    assert all(rc != 0 for rc in (rc1, rc2, rc3, rc4, rc5))

    # Every step trained on the uninterrupted run's samples, on both ranks.
    for r in (0, 1):
        mine, theirs = keys_by_step(soaked, r), keys_by_step(reference, r)
        assert sorted(mine) == list(range(1, STEPS + 1))
        assert mine == theirs, f"rank {r}: the soaked run trained on other samples"
    # Each completed epoch (9 steps of 32): all 287 good samples once, the corrupt one never, one repeated as padding.
    good = {k for k in served_keys(served) if k != BAD_KEY}
    steps = {s: keys_by_step(soaked, 0)[s] + keys_by_step(soaked, 1)[s] for s in range(1, STEPS + 1)}
    for epoch in range(STEPS // 9):
        seen = Counter(k for s in range(9 * epoch + 1, 9 * epoch + 10) for k in steps[s])
        assert set(seen) == good, f"epoch {epoch}: samples missing or foreign"
        assert sum(seen.values()) == 288 and sorted(seen.values())[-2:] == [1, 2], f"epoch {epoch}: {seen}"
    # The final weights equal the uninterrupted run's.
    from safetensors.torch import load_file

    exported = [load_file(str(run_dir(o) / "export" / "model.safetensors")) for o in (soaked, reference)]
    assert_same_params(*exported, rtol=PARAM_RTOL, atol=PARAM_ATOL)
    retries = tensorboard_max(soaked, "data/remote_retries")
    assert retries >= 1, "the resets were retried and counted"
    assert tensorboard_max(soaked, "data/skipped_decode_error") >= 1


def served_keys(server: FaultyServer) -> set[str]:
    import tarfile

    keys = set()
    for tar in (server.root / "train").glob("*.tar"):
        with tarfile.open(tar) as f:
            keys |= {m.name.split(".", 1)[0] for m in f.getmembers() if m.isfile()}
    return keys


def tensorboard_max(out: Path, tag: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir(out) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return max((e.value for e in acc.Scalars(tag)), default=0.0) if tag in acc.Tags()["scalars"] else 0.0
