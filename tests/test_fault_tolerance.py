"""Faults injected into real runs: kill -9 of one rank, of the whole job and in the middle of a checkpoint write,
signals sent from outside to a running job (once, and twice), and a checkpoint write that fails on a full disk.

The crash tests run the real entry point under torchrun on real synthetic shards through the WebDataset pipeline,
with ``logging.sample_keys`` on: after the relaunch with ``--checkpoint.resume latest``, the keys of the samples
each rank trained on at every step (the last line per step: a step redone after a crash is logged twice) must equal
those of an uninterrupted run, across an epoch boundary. The storage tests use the trainer harness (a fixed
in-memory dataset) and cap the file size a rank may write (RLIMIT_FSIZE), which makes real writes fail with EFBIG
as on a full disk. ``docs/reliability.md`` lists every fault with its outcome and the command that reproduces it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_trainer import ATOL, RTOL, ZERO, losses, run_harness

from conftest import REPO_ROOT, TINY_MODEL, clean_launcher_env, free_port

pytestmark = [pytest.mark.distributed]

LAUNCH = str(Path(REPO_ROOT, "tests", "_fault_launch.py"))
ZERO2 = str(Path(REPO_ROOT, "ds_configs", "zero2.json"))
STEPS, EVERY = 12, 3  # 256 samples / (2 ranks × 16) = 8 steps per epoch: the runs cross an epoch boundary


# Dropout off: the resumes on another world size compare losses, and dropout draws per rank.
NO_DROPOUT = ["--model.text.overrides", "{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, "
              "intermediate_size: 64, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"]  # fmt: skip


def train_args(shards: Path, output_dir: Path) -> list[str]:
    return [
        "--deepspeed", ZERO2,
        "--config", str(Path(REPO_ROOT, "configs", "demo_cpu.yaml")),
        "--run.output_dir", str(output_dir),
        "--run.name", "crash",
        *TINY_MODEL,
        *NO_DROPOUT,
        "--data.train_data", str(shards / "train" / "synth-train-{000000..000003}.tar"),
        "--data.num_workers", "1",
        "--optim.micro_batch_size", "16",
        "--schedule.total_steps", str(STEPS),
        "--schedule.warmup_steps", "1",
        "--logging.log_every", "1",
        "--logging.tensorboard", "false",
        "--logging.sample_keys", "true",
        "--checkpoint.every_steps", str(EVERY),
        "--checkpoint.export", "false",
        "--eval.zeroshot_data", "null",
        "--dist.timeout_minutes", "1",
        "--dist.heartbeat_seconds", "1",
    ]  # fmt: skip


def launch(shards: Path, out: Path, log_name: str, *extra: str, env: dict | None = None, nproc: int = 2):
    """Starts the job under torchrun in its own session (so the whole job can be killed at once)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), LAUNCH, *train_args(shards, out), *extra]  # fmt: skip
    log = (out / log_name).open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True,
                            env={**clean_launcher_env(), **(env or {})})  # fmt: skip
    proc.log_path = out / log_name  # type: ignore[attr-defined]
    proc.out = out  # type: ignore[attr-defined]
    return proc


def rank_pids(out: Path) -> list[int]:
    """The live rank processes of the job in ``out``, from their heartbeat files (checked against /proc, so a pid
    reused by another program is never touched)."""
    pids = []
    for f in (run_dir(out) / "heartbeats").glob("rank*.json"):
        try:
            pid = int(json.loads(f.read_text())["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError):
            continue
        if b"_fault_launch.py" in cmdline:
            pids.append(pid)
    return pids


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_job(proc, out: Path) -> None:
    """SIGKILL every rank with its data workers (torchrun starts each rank in its own session, so killing the
    launcher's process group does not reach them), then the launcher."""
    for pid in rank_pids(out):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(autouse=True)
def reap_ranks(tmp_path):
    """No rank of a test's job outlives the test, whatever happened in it."""
    yield
    for pid in rank_pids(tmp_path):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def finish(proc, timeout: float = 300) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc, proc.out)
        pytest.fail(f"job did not finish within {timeout} s:\n{proc.log_path.read_text()[-4000:]}")
    return rc, proc.log_path.read_text()


def run_dir(out: Path) -> Path:
    return out / "crash"


def keys_by_step(out: Path, rank: int) -> dict[int, list[str]]:
    """Step → the sample keys rank ``rank`` trained on; a step logged twice (redone after a crash) keeps its last."""
    path = run_dir(out) / "sample_keys" / f"rank{rank:05d}.jsonl"
    if not path.is_file():
        return {}
    steps = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            steps[record["step"]] = record["keys"]
    return steps


def wait_for_pause(proc, out: Path, rank: int, timeout: float = 240) -> int:
    """Waits until ``rank`` sits in its armed pause (see tests/_fault_launch.py); returns its pid."""
    marker = run_dir(out) / f"paused_rank{rank}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if marker.is_file() and marker.read_text():
            return int(marker.read_text())
        if proc.poll() is not None:
            pytest.fail(f"job ended (exit {proc.returncode}) before the pause:\n{proc.log_path.read_text()[-4000:]}")
        time.sleep(0.05)
    kill_job(proc, out)
    pytest.fail(f"rank {rank} did not reach its pause in {timeout} s")


def complete_steps(out: Path) -> list[int]:
    folder = run_dir(out) / "checkpoints"
    return sorted(int(p.name[5:]) for p in folder.glob("step_*") if (p / "COMPLETE").is_file())


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory) -> tuple[Path, dict[int, dict[int, list[str]]]]:
    """The uninterrupted run (its folder, with checkpoints 6, 9 and 12) and its sample keys per rank and step."""
    out = tmp_path_factory.mktemp("reference")
    rc, log = finish(launch(shards, out, "log.txt", "--logging.tensorboard", "true", "--checkpoint.keep_last", "4"))
    assert rc == 0, log[-4000:]
    keys = {r: keys_by_step(out, r) for r in (0, 1)}
    for r in (0, 1):
        assert sorted(keys[r]) == list(range(1, STEPS + 1))
        assert all(len(k) == 16 for k in keys[r].values())
    # Within the first epoch no sample is seen twice, on any rank.
    first_epoch = [k for r in (0, 1) for s in range(1, 9) for k in keys[r][s]]
    assert len(set(first_epoch)) == len(first_epoch) == 256
    return out, keys


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, dict[int, list[str]]]:
    """The uninterrupted run's sample keys, per rank and step."""
    return reference_run[1]


def resume_and_compare(shards: Path, out: Path, reference: dict, expect_from: int) -> str:
    """Relaunch with ``--checkpoint.resume latest``; it must restart at ``expect_from`` and, combined with what the
    interrupted run logged, train every step on exactly the reference samples."""
    rc, log = finish(launch(shards, out, "resume.txt", "--checkpoint.resume", "latest"))
    assert rc == 0, log[-4000:]
    assert re.search(rf"resumed from \S+step_{expect_from:08d} at step {expect_from} ", log), log[-3000:]
    for r in (0, 1):
        assert keys_by_step(out, r) == reference[r], f"rank {r}: the resumed run trained on other samples"
    assert complete_steps(out)[-1] == STEPS
    return log


@pytest.mark.timeout(900)
def test_kill_9_of_one_rank_then_resume_trains_on_the_same_samples(shards, tmp_path, reference):
    # Rank 1 is killed after step 5 while rank 0 goes on into step 6 and waits for it there.
    proc = launch(shards, tmp_path, "crash.txt", env={"RANKCLIP_TEST_PAUSE": f"1:{EVERY + 2}:600"})
    os.kill(wait_for_pause(proc, tmp_path, rank=1), signal.SIGKILL)
    rc, log = finish(proc)
    assert rc != 0
    # Rank 0 names the collective it was in and the rank that vanished (from the heartbeats).
    assert "rank 0 of 2 lost a peer in the collective 'stop-flag all_reduce'" in log, log[-3000:]
    assert re.search(r"rank 1 on host \S+ pid \d+: last heartbeat", log)
    assert complete_steps(tmp_path) == [EVERY]
    resume_and_compare(shards, tmp_path, reference, expect_from=EVERY)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_of_the_whole_job_then_resume_trains_on_the_same_samples(shards, tmp_path, reference):
    proc = launch(shards, tmp_path, "crash.txt", env={"RANKCLIP_TEST_PAUSE": f"0:{2 * EVERY + 1}:600"})
    wait_for_pause(proc, tmp_path, rank=0)
    ranks = rank_pids(tmp_path)
    assert len(ranks) == 2
    kill_job(proc, tmp_path)  # the launcher, every rank and every data worker at once: a node crash
    deadline = time.time() + 10
    while time.time() < deadline and [pid for pid in ranks if running(pid)]:
        time.sleep(0.1)
    assert not [pid for pid in ranks if running(pid)]  # dead (a zombie waiting to be reaped does not run)
    assert complete_steps(tmp_path) == [EVERY, 2 * EVERY]
    resume_and_compare(shards, tmp_path, reference, expect_from=2 * EVERY)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_in_the_middle_of_a_checkpoint_write_never_makes_it_latest(shards, tmp_path, reference):
    tag = f"step_{2 * EVERY:08d}"
    proc = launch(shards, tmp_path, "crash.txt", env={"RANKCLIP_TEST_KILL_DURING_SAVE": f"{tag}:1"})
    rc, _ = finish(proc)
    assert rc != 0
    ckpt = run_dir(tmp_path) / "checkpoints"
    partial = ckpt / tag
    assert not (partial / "COMPLETE").is_file()  # the interrupted checkpoint is never marked complete
    assert (ckpt / "latest").read_text().strip() == f"step_{EVERY:08d}"
    assert complete_steps(tmp_path) == [EVERY]
    log = resume_and_compare(shards, tmp_path, reference, expect_from=EVERY)
    assert f"checkpoint saved: {partial}" in log  # the relaunch wrote that step's checkpoint again, from scratch


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_signal_sent_to_one_rank_of_a_running_job_stops_all_saves_and_resumes_exactly(shards, tmp_path, reference):
    # SIGUSR1 reaches rank 1 only, while it is paused after step 2 (rank 0 waits in the stop-flag agreement).
    proc = launch(shards, tmp_path, "stop.txt", env={"RANKCLIP_TEST_PAUSE": "1:2:8"})
    os.kill(wait_for_pause(proc, tmp_path, rank=1), signal.SIGUSR1)
    rc, log = finish(proc)
    assert rc != 0  # torchrun reports the ranks' exit code 75 as its own failure
    stopped = re.search(r"stopped by signal 10 at step (\d+); checkpoint \S+; exit code 75", log)
    assert stopped, log[-3000:]
    step = int(stopped.group(1))
    assert step == 2 and complete_steps(tmp_path) == [2]  # the stop step itself was saved
    for r in (0, 1):  # both ranks stopped after the same step
        assert max(keys_by_step(tmp_path, r)) == step
    resume_and_compare(shards, tmp_path, reference, expect_from=step)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_second_signal_exits_at_once(shards, tmp_path):
    cmd = [sys.executable, LAUNCH, *train_args(shards, tmp_path), "--optim.micro_batch_size", "32"]  # fmt: skip
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True,
                            env={**clean_launcher_env(), "RANKCLIP_TEST_PAUSE": "0:2:60"})  # fmt: skip
    proc.log_path, proc.out = tmp_path / "log.txt", tmp_path
    wait_for_pause(proc, tmp_path, rank=0)
    # The first signal asks for the graceful stop (its handler logs it while the process sits in its pause); the
    # second, while that stop is pending, must end the process at once with 128 + its number.
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 60
    while "finishing the current step, then saving and exiting" not in proc.log_path.read_text():
        assert time.time() < deadline and proc.poll() is None, proc.log_path.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    rc, text = finish(proc, timeout=120)
    assert rc == 128 + signal.SIGUSR1, text[-3000:]
    assert "exit code 75" not in text and "checkpoint saved" not in text  # it did not go on to the graceful end
    assert not list((run_dir(tmp_path) / "checkpoints").glob("step_*"))  # no save was even started


# ------------------------------------------------------------------------------------------------ storage faults
STORAGE = ["--optim.micro_batch_size", "8", "--logging.tensorboard", "false"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_checkpoint_write_failing_on_one_rank_is_an_error_naming_the_path_and_keeps_the_previous(tmp_path):
    ds = {"zero_optimization": ZERO[2]}
    # From step 4 on, rank 1 cannot write any file beyond 16 KiB (EFBIG, as on a full disk): the step-6 save fails.
    failed = run_harness(tmp_path / "a", [*STORAGE, "--run.output_dir", str(tmp_path / "shared")], ds,
                         fault={"after_step": 4, "kind": "fsize", "bytes": 16384, "rank": 1})  # fmt: skip
    ckpt = tmp_path / "shared" / "rankclip" / "checkpoints"
    for rank in failed["ranks"]:
        msg = rank["error"]
        assert f"checkpoint {ckpt / 'step_00000006'} (step 6) failed while writing" in msg
        assert "rank 1: " in msg and "rank 0: " not in msg
        assert f"rank 1: writing {ckpt / 'step_00000006' / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'}: " in msg
        assert "a 1 MiB test write there fails with OSError: [Errno 27] File too large" in msg  # the OS's words
        assert f"the previous complete checkpoint {ckpt / 'step_00000003'}" in msg and "Free space" in msg
    assert [r["step"] for r in failed["records"]] == [1, 2, 3, 4, 5, 6]
    assert not (ckpt / "step_00000006").exists()  # the partial checkpoint was removed
    assert (ckpt / "latest").read_text().strip() == "step_00000003"
    # The previous checkpoint is intact and loadable: resuming from it redoes steps 4-6 with the same losses.
    resumed = run_harness(tmp_path / "b", [*STORAGE, "--run.output_dir", str(tmp_path / "shared"),
                                           "--checkpoint.resume", "latest"], ds)  # fmt: skip
    assert [r["step"] for r in resumed["records"]] == [4, 5, 6]
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(failed)[3:]), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_too_little_free_space_stops_before_writing(tmp_path):
    ds = {"zero_optimization": ZERO[2]}
    failed = run_harness(tmp_path, [*STORAGE], ds, fault={"after_step": 4, "kind": "disk_free", "bytes": 1000})
    ckpt = tmp_path / "runs" / "rankclip" / "checkpoints"
    for rank in failed["ranks"]:
        msg = rank["error"]
        assert f"checkpoint {ckpt / 'step_00000006'} (step 6) failed before writing" in msg
        assert "1000 B free, less than checkpoint.min_free_factor=1.1 × the size of the last checkpoint" in msg
    assert not (ckpt / "step_00000006").exists()
    assert (ckpt / "latest").read_text().strip() == "step_00000003"
    assert (ckpt / "step_00000003" / "COMPLETE").is_file()


# ------------------------------------------------------------------------------------------------ non-finite loss
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3])
def test_a_non_finite_loss_discards_the_step_and_is_counted(tmp_path, stage):
    # Rank 1's first micro-batch of step 3 holds NaN images: the global loss is NaN on both ranks.
    run = run_harness(tmp_path, ["--optim.micro_batch_size", "4", "--optim.grad_accum_steps", "2"],
                      {"zero_optimization": ZERO[stage]}, nan={"steps": [3], "rank": 1})  # fmt: skip
    log = (tmp_path / "log.txt").read_text()
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] WARNING .*step 3 \(micro-batch 0\): non-finite loss \(components "
                         r"\['clip', 'cross', 'inmodal'\]\); the optimizer step is discarded \(non-finite losses so "
                         r"far: 1\)", log), log[-3000:]  # fmt: skip
    records = run["records"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert not math.isfinite(records[2]["loss"]) and all(math.isfinite(r["loss"]) for i, r in enumerate(records)
                                                         if i != 2)  # fmt: skip
    # Discarded, not merely zero-gradient: the logit scale (which Adam moves every step) is exactly unchanged.
    raw = [r["logit_scale_raw"] for r in records]
    assert raw[2] == raw[1] and raw[1] != raw[0] and raw[3] != raw[2]
    for rank in run["ranks"]:
        assert rank["nonfinite_total"] == 1 and rank["skipped_steps"] == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("accum", [1, 2])
def test_consecutive_non_finite_losses_stop_the_run_with_a_clear_error(tmp_path, accum):
    # With accum 2 only the first micro-batch of each step is NaN: every step is still discarded, so it counts.
    run = run_harness(tmp_path, ["--optim.micro_batch_size", str(8 // accum), "--optim.grad_accum_steps", str(accum),
                                 "--schedule.total_steps", "8", "--checkpoint.every_steps", "0"],
                      {"zero_optimization": ZERO[2]},
                      nan={"steps": [2, 3, 4, 5, 6, 7, 8], "rank": 0}, expect_failure=True)  # fmt: skip
    for rank in run["ranks"]:
        assert rank["error"].startswith("5 optimizer steps in a row had a non-finite loss, up to step 6 (components "
                                        "['clip', 'cross', 'inmodal']); lower optim.lr")  # fmt: skip
        assert rank["nonfinite_total"] == 5
    assert [r["step"] for r in run["records"]] == [1, 2, 3, 4, 5]  # step 6 raised before it was recorded


def train_losses(out: Path) -> dict[int, float]:
    """Step → ``train/loss`` from the run's TensorBoard event files (the last value logged for a step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir(out) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def assert_same_losses(reference: dict[int, float], resumed: dict[int, float]) -> None:
    """Steps 7-12 of the resumed run lose what the reference lost (rtol 2e-5; measured up to 2.1e-6)."""
    steps = range(7, STEPS + 1)
    worst = max(abs(resumed[s] - reference[s]) / abs(reference[s]) for s in steps)
    print(f"largest relative loss difference over steps 7-{STEPS}: {worst:.2e}")  # shown with pytest -s
    torch.testing.assert_close(
        torch.tensor([resumed[s] for s in steps]), torch.tensor([reference[s] for s in steps]), rtol=2e-5, atol=1e-6
    )


def global_keys(steps: dict[int, dict[int, list[str]]], step: int) -> list[str]:
    """The global batch of ``step``: every rank's keys, in rank order."""
    return [k for r in sorted(steps) for k in steps[r][step]]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("nproc", "micro"), [(1, 32), (4, 8)], ids=["2to1", "2to4"])
def test_resume_on_another_world_size_trains_every_step_on_the_uninterrupted_samples(
    reference_run, shards, tmp_path, nproc, micro
):
    # The 2-rank run's checkpoint 6 (epoch 0 has 8 steps of 32 samples) is resumed on `nproc` ranks with the same
    # global batch, from DeepSpeed's universal form; steps 7-12 cross into epoch 1.
    import shutil

    ref_out, ref_keys = reference_run
    shutil.copytree(run_dir(ref_out) / "checkpoints" / "step_00000006",
                    run_dir(tmp_path) / "checkpoints" / "step_00000006")  # fmt: skip
    rc, log = finish(launch(shards, tmp_path, "resume.txt", "--checkpoint.resume", "latest", "--logging.tensorboard",
                            "true", "--optim.micro_batch_size", str(micro), nproc=nproc))  # fmt: skip
    assert rc == 0, log[-4000:]
    assert "loading DeepSpeed's universal form" in log
    # one micro-batch per step on every world size: the position reads the same
    assert re.search(r"resumed from \S+step_00000006 at step 6 \(epoch 0, batch 6 of 8 per rank; written by 2 "
                     r"ranks\)", log), log[-3000:]  # fmt: skip
    mine = {r: keys_by_step(tmp_path, r) for r in range(nproc)}
    for step in range(7, STEPS + 1):
        assert global_keys(mine, step) == global_keys(ref_keys, step), f"step {step}: other samples or order"
    # The same samples in the same positions: the losses continue the uninterrupted run's.
    assert_same_losses(train_losses(ref_out), train_losses(tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_resume_from_four_ranks_on_three_trains_every_step_on_the_uninterrupted_samples(shards, tmp_path):
    # Global batch 24 (4 × 6, then 3 × 8): 10 steps per epoch, so steps 7-12 cross into epoch 1. The 4-rank run
    # is the reference; its checkpoint 6 alone is copied into a new run folder and resumed on 3 ranks.
    import shutil

    ref, resumed = tmp_path / "four", tmp_path / "three"
    ref.mkdir(), resumed.mkdir()
    rc, log = finish(launch(shards, ref, "log.txt", "--optim.micro_batch_size", "6", "--logging.tensorboard", "true",
                            "--checkpoint.keep_last", "4", nproc=4), timeout=900)  # fmt: skip
    assert rc == 0, log[-4000:]
    shutil.copytree(run_dir(ref) / "checkpoints" / "step_00000006", run_dir(resumed) / "checkpoints" / "step_00000006")
    rc, log = finish(launch(shards, resumed, "resume.txt", "--checkpoint.resume", "latest", "--optim.micro_batch_size",
                            "8", "--logging.tensorboard", "true", nproc=3), timeout=900)  # fmt: skip
    assert rc == 0, log[-4000:]
    assert "written by 4 ranks" in log
    ref_keys = {r: keys_by_step(ref, r) for r in range(4)}
    mine = {r: keys_by_step(resumed, r) for r in range(3)}
    first_epoch = [k for s in range(1, 11) for k in global_keys(ref_keys, s)]
    assert len(set(first_epoch)) == len(first_epoch) == 240  # 256 // 24 steps, each sample once
    for step in range(7, STEPS + 1):
        assert global_keys(mine, step) == global_keys(ref_keys, step), f"step {step}: other samples or order"
    assert_same_losses(train_losses(ref), train_losses(resumed))


# ------------------------------------------------------------------------------------------------ stuck rank
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stuck_rank_makes_the_others_fail_naming_the_collective_and_the_rank(shards, tmp_path):
    # Rank 1 hangs after step 2 (it sleeps, alive, as in a hung file system read); rank 0 waits for it in the
    # stop-flag agreement until the process-group timeout (30 s here: long enough for start-up on a loaded machine).
    proc = launch(shards, tmp_path, "stuck.txt", "--dist.timeout_minutes", "0.5",
                  env={"RANKCLIP_TEST_PAUSE": "1:2:600"})  # fmt: skip
    wait_for_pause(proc, tmp_path, rank=1)
    deadline = time.time() + 240
    text = ""
    while time.time() < deadline and "Original error:" not in text:  # the last line of the message
        time.sleep(0.5)
        text = proc.log_path.read_text()
    kill_job(proc, tmp_path)
    assert "error (rank 0): rank 0 of 2 timed out after 0.5 min (dist.timeout_minutes) in the collective " \
           "'stop-flag all_reduce' at step 2." in text, text[-3000:]  # fmt: skip
    # Rank 1 is named from its heartbeat: alive, but not in this collective.
    assert re.search(r"rank 1 on host \S+ pid \d+: last heartbeat [\d.]+ s ago, at step 2 in 'logit-scale clamp",
                     text), text[-3000:]  # fmt: skip
    assert "raise dist.timeout_minutes (now 0.5)" in text
