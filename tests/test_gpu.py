"""Checks that need a GPU (marker ``gpu``; ``tools/gpu_check.sh`` runs them): the loss on the device against the CPU
float64 reference, the trainer in bf16 under ZeRO-2 and ZeRO-3 on one device, and a kill -9 in the middle of a run
followed by an exact resume.

They run on ``cuda`` and are skipped where there is none. ``RANKCLIP_TEST_DEVICE=cpu`` runs the same checks on the
CPU, smaller (``tools/gpu_check.sh --tiny`` does, in CI): the check code itself is then known to work before any
GPU time is spent on it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from _loss_dist import grid_inputs, leaf, rel_err
from test_fault_tolerance import finish, keys_by_step, kill_job, launch, run_dir, wait_for_pause
from test_trainer import ZERO, export_state, losses, run_harness

from rankclip_ds.losses import rankclip_loss
from rankclip_ds.losses.naive import naive_rankclip_loss

DEVICE = os.environ.get("RANKCLIP_TEST_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TERMS = ("loss", "clip", "cross", "inmodal")
# Gradient tolerance for bf16 embeddings: the loss computes in float32 on the same (bf16) values, so the values
# agree to float32 rounding; the gradients are returned in bf16 (unit roundoff 2^-8), see docs/loss.md.
BF16_GRAD_RTOL = 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "impl, extra",
    [("chunked", {}), ("chunked", {"position_weighting": "log"}), ("top_k", {"top_k": 32}), ("naive", {})],
    ids=["chunked", "chunked-log", "top_k", "naive"],
)
def test_loss_on_the_device_equals_the_float64_reference(impl, extra, dtype):
    """Sign-vector embeddings (entries ±1/8 scaled): every product is exact in bf16, float32 and float64, so the
    target orders (ties included) are the same on the device and in the reference."""
    n = 1024 if ON_GPU else 96
    img, txt = grid_inputs(n, seed=11)
    log_s = torch.tensor(math.log(30.0))
    kw = {"rank_weight": 1.7, "lambda_cross": 1.0, "lambda_in": 0.6, **extra}
    i, t, ls = leaf(img, torch.float64), leaf(txt, torch.float64), leaf(log_s, torch.float64)
    ref = naive_rankclip_loss(i, t, ls, dtype=torch.float64, **kw)
    ref_grads = torch.autograd.grad(ref["loss"], [i, t, ls])
    i = img.to(DEVICE, dtype).requires_grad_()
    t = txt.to(DEVICE, dtype).requires_grad_()
    ls = log_s.to(DEVICE).requires_grad_()
    chunk = None if impl == "naive" else n // 8
    out = rankclip_loss(i, t, ls, impl=impl, chunk_size=chunk, **kw)
    grads = torch.autograd.grad(out["loss"], [i, t, ls])
    assert all(out[k].device.type == torch.device(DEVICE).type for k in TERMS)
    for k in TERMS:
        got, want = float(out[k]), float(ref[k])
        assert abs(got - want) <= 1e-5 * abs(want) + 1e-6, (k, got, want)
    grad_rtol = 1e-5 if dtype == torch.float32 else BF16_GRAD_RTOL
    for name, g, r in zip(("image", "text"), grads[:2], ref_grads[:2], strict=True):
        assert g.dtype == dtype and g.device.type == torch.device(DEVICE).type
        assert rel_err(g.cpu(), r) <= grad_rtol, (name, rel_err(g.cpu(), r))
    assert abs(float(grads[2]) - float(ref_grads[2])) <= 1e-5 * abs(float(ref_grads[2])) + 1e-6


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3])
def test_the_trainer_runs_30_steps_in_bf16_on_one_device(stage, tmp_path):
    run = run_harness(
        tmp_path,
        ["--run.precision", "bf16", "--optim.micro_batch_size", "16", "--schedule.total_steps", "30",
         "--schedule.warmup_steps", "3", "--checkpoint.every_steps", "15"],
        {"zero_optimization": ZERO[stage]}, nproc=1,
    )  # fmt: skip
    values = losses(run)
    assert len(values) == 30 and all(math.isfinite(v) for v in values), values
    # 64 fixed samples, 4 steps an epoch: after 30 steps the loss is well below where it started.
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 0.1, values
    state = export_state(run)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert state["logit_scale"].item() <= math.log(100.0) + 1e-6


KILL_STEPS, KILL_EVERY = 12, 3
BF16_RUN = ["--run.precision", "bf16", "--checkpoint.export", "true", "--logging.tensorboard", "true",
            "--schedule.total_steps", str(KILL_STEPS), "--checkpoint.every_steps", str(KILL_EVERY)]  # fmt: skip


def logged_losses(out) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir(out) / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


@pytest.mark.timeout(900)
def test_kill_9_then_resume_is_exact_on_one_device(shards, tmp_path):
    """The real entry point in bf16 under ZeRO-2 on one device (dropout on, random crops on), killed (SIGKILL)
    after step 7 and relaunched: it resumes from the step-6 checkpoint, trains steps 7-12 on the same samples as an
    uninterrupted run, with the same losses and the same final weights: bit for bit on the CPU; on a GPU up to the
    run-to-run rounding of its atomic-add kernels (embedding backward)."""
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir()
    cut_dir.mkdir()
    rc, log = finish(launch(shards, full_dir, "log.txt", *BF16_RUN, nproc=1))
    assert rc == 0, log[-4000:]
    proc = launch(shards, cut_dir, "crash.txt", *BF16_RUN, nproc=1, env={"RANKCLIP_TEST_PAUSE": "0:7:600"})
    wait_for_pause(proc, cut_dir, rank=0)
    kill_job(proc, cut_dir)
    rc, log = finish(launch(shards, cut_dir, "resume.txt", *BF16_RUN, "--checkpoint.resume", "latest", nproc=1))
    assert rc == 0, log[-4000:]
    assert "at step 6 " in log, log[-3000:]
    assert keys_by_step(cut_dir, 0) == keys_by_step(full_dir, 0)
    rtol, atol = (1e-2, 1e-4) if ON_GPU else (0.0, 0.0)
    full_losses, cut_losses = logged_losses(full_dir), logged_losses(cut_dir)
    assert sorted(cut_losses) == list(range(1, KILL_STEPS + 1))
    for step in range(KILL_EVERY * 2 + 1, KILL_STEPS + 1):
        assert cut_losses[step] == pytest.approx(full_losses[step], rel=rtol, abs=atol), step
    from safetensors.torch import load_file

    full = load_file(str(run_dir(full_dir) / "export" / "model.safetensors"))
    resumed = load_file(str(run_dir(cut_dir) / "export" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    rtol, atol = (2e-3, 2e-4) if ON_GPU else (0.0, 0.0)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


def test_the_loader_hands_over_pinned_batches_on_a_gpu_machine(tmp_path):
    """The parts of a step are put together straight into page-locked memory (loader.merge_parts), so the
    trainer's non-blocking copies are asynchronous."""
    from test_data_pipeline import make_loader, write_shards

    # Page-locked memory needs CUDA: under RANKCLIP_TEST_DEVICE=cpu (tools/gpu_check.sh --tiny) the loader is asked
    # not to pin and must hand over ordinary memory.
    cuda = torch.cuda.is_available()
    spec, _ = write_shards(tmp_path / "shards")
    loader = make_loader(spec, rank=0, world_size=1, num_workers=2, batch_size=8, pin_memory=cuda, streams=4)
    batch = next(iter(loader.epoch_iter(0)))
    assert batch["image"].is_pinned() is cuda
