"""The DeepSpeed trainer, run for real: 2-rank CPU engines under torchrun with ZeRO 1/2/3, data-parallel and
gradient-caching equivalence, exact resume, the ZeRO-3 logit scale, consolidation and export, TensorBoard events.

Every run goes through ``tests/_train_harness.py`` (the real Trainer on a fixed in-memory dataset whose global
batches are the same samples whatever the world size or accumulation split). Runs are cached per session and
shared between tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, clean_launcher_env, free_port

pytestmark = [pytest.mark.distributed]

HARNESS = str(Path(REPO_ROOT, "tests", "_train_harness.py"))
TINY = [
    "--model.image.image_size", "32",
    "--model.image.model_kwargs", "{patch_size: 8, depth: 1}",
    "--model.text.pretrained", "false",
    "--model.text.overrides", "{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64, "
    "hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}",
    "--model.embed_dim", "16",
    "--optim.lr", "2e-3",
    "--schedule.total_steps", "6",
    "--schedule.warmup_steps", "1",
    "--loss.rank_weight_hold_from", "0.2",
    "--logging.log_every", "1",
    "--checkpoint.every_steps", "3",
]  # fmt: skip
ZERO = {1: {"stage": 1}, 2: {"stage": 2}, 3: {"stage": 3, "stage3_param_persistence_threshold": 0}}
# fp32 on the CPU: different reduction orders (ZeRO stages, 1 vs 2 ranks) differ by float rounding only.
RTOL, ATOL = 2e-5, 1e-6
# Parameters get a looser absolute tolerance: Adam divides each gradient by its own running RMS, so a parameter
# whose true gradient is zero (an attention key bias: softmax ignores it) moves by ~lr in a direction set by
# rounding noise. A real error (a gradient off by the world size, a missing term) shifts the losses, compared
# tightly, and every parameter by ~lr = 2e-3.
PARAM_RTOL, PARAM_ATOL = 1e-3, 2e-4


def run_harness(
    out: Path,
    overrides: list[str],
    ds: dict,
    nproc: int = 2,
    signal: dict | None = None,
    fault: dict | None = None,
    nan: dict | None = None,
    expect_failure: bool = False,
    push_logit_scale: dict | None = None,
) -> dict:
    # The default run folder comes first so that an override of it wins.
    spec = {"overrides": [*TINY, "--run.output_dir", str(out / "runs"), *overrides], "ds": ds, "out": str(out),
            "pool": 64}  # fmt: skip
    if signal:
        spec["signal"] = signal
    if fault:
        spec["fault"] = fault
    if nan:
        spec["nan"] = nan
    if push_logit_scale:
        spec["push_logit_scale"] = push_logit_scale
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), HARNESS, str(out / "spec.json")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=clean_launcher_env())
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    failing = signal is not None or fault is not None or expect_failure
    expected = 1 if failing else 0  # torchrun reports a worker's non-zero exit as its own 1
    assert proc.returncode == expected, f"harness exit {proc.returncode} ({out}):\n{proc.stderr[-4000:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    run = Path(ranks[0]["summary"]["run_dir"]) if "summary" in ranks[0] else None  # None: the run failed
    return {"ranks": ranks, "records": ranks[0]["records"], "dir": out, "run": run}


class Runs:
    """Session cache: each configuration runs once."""

    def __init__(self, base: Path) -> None:
        self.base, self.cache = base, {}

    def get(self, name: str, overrides: list[str], ds: dict, nproc: int = 2) -> dict:
        if name not in self.cache:
            self.cache[name] = run_harness(self.base / name, overrides, ds, nproc)
        return self.cache[name]

    def zero(self, stage: int) -> dict:
        return self.get(f"zero{stage}", ["--optim.micro_batch_size", "8"], {"zero_optimization": ZERO[stage]})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("trainer"))


def losses(run: dict, key: str = "loss") -> list[float]:
    return [r[key] for r in run["records"]]


def export_state(run: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run["run"] / "export" / "model.safetensors"))


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol=RTOL, atol=ATOL) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.timeout(900)
def test_zero_stages_give_the_same_falling_losses(runs):
    z1, z2, z3 = runs.zero(1), runs.zero(2), runs.zero(3)
    for run in (z1, z2, z3):
        assert len(run["records"]) == 6
        # Every rank logs the same global loss.
        assert losses(run) == [r["loss"] for r in run["ranks"][1]["records"]]
        # With the ranking weight at its plateau from step 2 on, the loss falls on the fixed dataset.
        assert losses(run)[-1] < losses(run)[1] - 0.1, losses(run)
    np_z1, np_z2, np_z3 = (torch.tensor(losses(r)) for r in (z1, z2, z3))
    torch.testing.assert_close(np_z1, np_z2, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(np_z3, np_z2, rtol=RTOL, atol=ATOL)
    assert_same_params(export_state(z1), export_state(z2), rtol=PARAM_RTOL, atol=PARAM_ATOL)
    assert_same_params(export_state(z3), export_state(z2), rtol=PARAM_RTOL, atol=PARAM_ATOL)


@pytest.mark.timeout(600)
def test_two_ranks_equal_one_rank_with_twice_the_batch(runs):
    two = runs.zero(2)
    one = runs.get("one_rank_b16", ["--optim.micro_batch_size", "16"], {"zero_optimization": ZERO[2]}, nproc=1)
    torch.testing.assert_close(torch.tensor(losses(one)), torch.tensor(losses(two)), rtol=RTOL, atol=ATOL)
    for key in ("clip", "cross", "inmodal", "logit_scale_raw"):
        torch.testing.assert_close(torch.tensor(losses(one, key)), torch.tensor(losses(two, key)), rtol=1e-4, atol=1e-6)
    assert_same_params(export_state(one), export_state(two), rtol=PARAM_RTOL, atol=PARAM_ATOL)


@pytest.mark.timeout(600)
def test_gradient_caching_equals_one_big_batch(runs):
    big = runs.zero(2)  # micro 8, accum 1, 2 ranks: N = 16
    cached = runs.get(
        "grad_cache_4x2",
        ["--optim.micro_batch_size", "4", "--optim.grad_accum_steps", "2", "--optim.grad_cache", "true"],
        {"zero_optimization": ZERO[2]},
    )
    assert [r["rank_weight"] for r in cached["records"]][-1] == 2.0  # ranking terms on
    torch.testing.assert_close(torch.tensor(losses(cached)), torch.tensor(losses(big)), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        torch.tensor(losses(cached, "inmodal")), torch.tensor(losses(big, "inmodal")), rtol=1e-4, atol=1e-5
    )
    assert_same_params(export_state(cached), export_state(big), rtol=PARAM_RTOL, atol=PARAM_ATOL)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_plain_accumulation_is_not_gradient_caching(runs):
    """Without caching each micro-step's list is only micro × world: the losses differ from the big batch's."""
    plain = runs.get(
        "accum_4x2",
        ["--optim.micro_batch_size", "4", "--optim.grad_accum_steps", "2"],
        {"zero_optimization": ZERO[2]},
    )
    assert abs(losses(plain)[0] - losses(runs.zero(2))[0]) > 1e-3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_continues_exactly(runs, tmp_path):
    full = runs.zero(2)
    out = tmp_path / "resume"
    ds = {"zero_optimization": ZERO[2]}
    # The first run stops after its step-3 checkpoint (as if killed there), the second resumes from it.
    first = run_harness(out / "a", ["--optim.micro_batch_size", "8", "--schedule.total_steps", "6",
                                    "--run.output_dir", str(out / "shared")], ds)  # fmt: skip
    assert len(first["records"]) == 6
    ckpt_root = out / "shared" / "rankclip" / "checkpoints"
    # Roll the run back to its step-3 checkpoint: what a crash after step 3's save leaves behind.
    (ckpt_root / "latest").write_text("step_00000003")
    import shutil

    shutil.rmtree(ckpt_root / "step_00000006")
    second = run_harness(out / "b", ["--optim.micro_batch_size", "8", "--checkpoint.resume", "latest",
                                     "--run.output_dir", str(out / "shared")], ds)  # fmt: skip
    steps = [r["step"] for r in second["records"]]
    assert steps == [4, 5, 6]
    torch.testing.assert_close(torch.tensor(losses(second)), torch.tensor(losses(full)[3:]), rtol=RTOL, atol=ATOL)
    assert_same_params(export_state(second), export_state(full), rtol=PARAM_RTOL, atol=PARAM_ATOL)


def file_identities(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime in ns) of every file under ``folder`` and of the folder itself, by relative path."""
    paths = [folder, *sorted(p for p in folder.rglob("*") if p.is_file())]
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in paths}


def resume_from_step3(source: dict, out: Path, overrides: list[str], ds: dict, nproc: int, step: int = 3) -> dict:
    """Copies ``source``'s step-3 (or ``step``) checkpoint into a fresh run folder and resumes from it there."""
    import shutil

    src = source["run"] / "checkpoints" / f"step_{step:08d}"
    shutil.copytree(src, out / "shared" / source["run"].name / "checkpoints" / src.name)
    return run_harness(out / "b", [*overrides, "--checkpoint.resume", "latest", "--run.output_dir",
                                   str(out / "shared")], ds, nproc)  # fmt: skip


# (ranks, micro batch, ZeRO stage): the global batch of the 2-rank source run (2 × 8) is kept.
WORLD_CHANGES = {"2to1_zero2": (1, 16, 2), "2to4_zero2": (4, 4, 2), "2to2_zero2_to_zero1": (2, 8, 1),
                 "2to1_zero3": (1, 16, 3)}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("change", list(WORLD_CHANGES))
def test_resume_on_another_world_size_or_stage(runs, tmp_path, change):
    nproc, micro, stage = WORLD_CHANGES[change]
    source = runs.zero(3 if stage == 3 else 2)
    resumed = resume_from_step3(source, tmp_path, ["--optim.micro_batch_size", str(micro)],
                                {"zero_optimization": ZERO[stage]}, nproc)  # fmt: skip
    log = (resumed["dir"] / "log.txt").read_text()
    assert "loading DeepSpeed's universal form" in log and "written by 2 ranks" in log
    assert [r["step"] for r in resumed["records"]] == [4, 5, 6]
    # Step, schedule, optimizer moments and data position carried over: the losses continue the 2-rank run's.
    # (A fresh optimizer or a data position off by one batch moves them by far more than the tolerance.) Measured
    # (tools/universal_resume_diff.py): the universal load restores the fp32 masters, Adam moments and steps bit for
    # bit; what remains is 1 vs 2 ranks' float rounding, max 1.5e-6 relative over steps 4-6, stages 2 and 3.
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(source)[3:]), rtol=RTOL, atol=ATOL)
    # The logit scale (no weight decay, a real gradient) continues the source's to float rounding (measured 0).
    # DeepSpeed 0.19.8's ZeRO-3 universal load alone decays it like a weight (4.4e-4 low by step 6) and shares one Adam
    # step tensor between sub-groups, so bias corrections run ahead (1.4e-4 with the decay repaired): the loss moves
    # by only ~1e-5 relative, within the tolerance above, but the scale moves 10-40x this tolerance.
    scale = [r["logit_scale_raw"] for r in resumed["records"]]
    torch.testing.assert_close(torch.tensor(scale), torch.tensor([r["logit_scale_raw"] for r in source["records"][3:]]),
                               rtol=0, atol=1e-5)  # fmt: skip
    assert_same_params(export_state(resumed), export_state(source), rtol=PARAM_RTOL, atol=PARAM_ATOL)
    assert (tmp_path / "shared" / source["run"].name / "checkpoints" / "step_00000003" / "universal").is_dir()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_checkpoint_converted_ahead_of_time_is_reused(runs, tmp_path):
    import shutil

    source = runs.zero(2)
    ckpt = tmp_path / "shared" / source["run"].name / "checkpoints" / "step_00000003"
    shutil.copytree(source["run"] / "checkpoints" / "step_00000003", ckpt)
    tool = [sys.executable, str(Path(REPO_ROOT, "tools", "convert_checkpoint.py")), str(ckpt)]
    first = subprocess.run(tool, capture_output=True, text=True, timeout=300, env=clean_launcher_env())
    assert first.returncode == 0, first.stderr[-3000:]
    assert "written by 2 ranks, ZeRO stage 2" in first.stdout and (ckpt / "universal" / "COMPLETE").is_file()
    converted = file_identities(ckpt / "universal")
    assert len(converted) > 3, converted  # the model and optimizer states, COMPLETE
    again = subprocess.run(tool, capture_output=True, text=True, timeout=300, env=clean_launcher_env())
    assert again.returncode == 0 and "already complete" in again.stdout
    assert file_identities(ckpt / "universal") == converted  # not written again
    resumed = run_harness(tmp_path / "b", ["--optim.micro_batch_size", "16", "--checkpoint.resume", "latest",
                                           "--run.output_dir", str(tmp_path / "shared")],
                          {"zero_optimization": ZERO[2]}, nproc=1)  # fmt: skip
    log = (resumed["dir"] / "log.txt").read_text()
    assert "loading DeepSpeed's universal form" in log
    # Reused as it was: the same files (inode, size, modification time), none added, none rewritten; a conversion
    # writes a new folder and renames it over the old one, so every inode would change.
    assert file_identities(ckpt / "universal") == converted
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(source)[3:]), rtol=RTOL, atol=ATOL)


def test_resume_refuses_another_global_batch_and_an_unsupported_stage_change(runs, tmp_path):
    from rankclip_ds.config import ConfigError, load_config
    from rankclip_ds.dist import DistInfo
    from rankclip_ds.trainer import Trainer

    source = runs.zero(2)
    ckpt = source["run"] / "checkpoints" / "step_00000003"
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, master_addr="127.0.0.1",
                    master_port=free_port(), launcher="single", device_type="cpu")  # fmt: skip
    from rankclip_ds.resolved import resolve_run

    base = [*TINY, "--run.output_dir", str(tmp_path), "--checkpoint.resume", str(ckpt)]

    def trainer(micro: int, stage: int):
        cfg = load_config(None, [*base, "--optim.micro_batch_size", str(micro)])
        return Trainer(cfg, resolve_run(cfg, {"zero_optimization": ZERO[stage]}, 1), info)

    with pytest.raises(ConfigError, match=r"global batch of 16 .*--optim.global_batch_size 16"):
        trainer(8, 2)
    with pytest.raises(ConfigError, match=r"ZeRO stage 2 on 2 ranks.*zero_optimization.stage=2"):
        trainer(16, 3)


@pytest.mark.timeout(900)
def test_zero3_logit_scale_is_clamped_logged_and_exported(tmp_path):
    """Under ZeRO-3 the logit scale is a partitioned 1-element parameter (one rank's partition holds it). Before the
    last step the optimizer's fp32 master and the module's copy are pushed past ``model.max_logit_scale``; the
    training step itself must bring both back to the bound: the live value after that step, the master on every
    rank, the logged value and the export. (Without the step's clamp they stay at the pushed value, moved by ~lr.)
    The slow ``test_logit_scale_cannot_drift_past_the_clamp_in_the_optimizers_master`` does this for every stage."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bound = float(torch.tensor(math.log(100.0)))  # ln(100) rounded to float32, as the clamp stores it
    run = run_harness(
        tmp_path, ["--optim.micro_batch_size", "8", "--schedule.total_steps", "3"],
        {"zero_optimization": ZERO[3]}, push_logit_scale={"step": 3, "value": bound + 0.5},
    )  # fmt: skip
    live = [r["logit_scale_raw"] for r in run["records"]]
    assert len(live) == 3 and all(math.isfinite(v) and v < bound - 1 for v in live[:2]), live  # ~ln(1/0.07)
    assert live[2] == bound, live  # the pushed step ended clamped
    for rank in run["ranks"]:
        assert rank["logit_scale_partitioned"] is True  # really a partitioned parameter in this run
        assert rank["master_logit_scale"] == bound  # what the optimizer updates, on every rank
        assert [r["logit_scale_raw"] for r in rank["records"]] == live
    acc = EventAccumulator(str(run["run"] / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/logit_scale_raw")] == pytest.approx(live, abs=1e-6)
    assert export_state(run)["logit_scale"].item() == bound


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_to_fp32_consolidation_and_export_reload(runs, stage, tmp_path):
    import rankclip_ds
    from rankclip_ds.model import build_model

    run = runs.zero(stage)
    ckpt = run["run"] / "checkpoints"
    # DeepSpeed's own script, as DeepSpeed copies it beside the checkpoints.
    script = ckpt / "zero_to_fp32.py"
    assert script.is_file(), list(ckpt.iterdir())
    out = tmp_path / "fp32"
    proc = subprocess.run([sys.executable, str(script), str(ckpt), str(out), "--safe_serialization"],
                          capture_output=True, text=True, timeout=300, env=clean_launcher_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    assert files, list(out.iterdir())
    consolidated = {}
    for f in files:
        consolidated.update(load_file(str(f)))
    probe = torch.load(run["dir"] / "probe_emb.pt", weights_only=True)
    live = probe["live"]
    assert consolidated.keys() == live.keys()  # nothing dropped (tied or scalar parameters included)
    assert_same_params(consolidated, {k: v.float() for k, v in live.items()}, rtol=0, atol=0)

    from rankclip_ds.config import load_config

    model = build_model(load_config(run["run"] / "config.yaml").model)
    model.load_state_dict(consolidated, strict=True)

    from rankclip_ds.export import model_source_config

    assert model_source_config(ckpt / "step_00000006") == load_config(run["run"] / "config.yaml").model
    # The export, and the training checkpoint itself, load without an engine and give the live embeddings.
    for source in (run["run"] / "export", ckpt / "step_00000006"):
        loaded = rankclip_ds.load_model(source)
        with torch.no_grad():
            img = loaded.encode_image(probe["probe"]["image"])
            txt = loaded.encode_text(probe["probe"]["input_ids"], probe["probe"]["attention_mask"])
        torch.testing.assert_close(img, probe["image"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(txt, probe["text"], rtol=1e-5, atol=1e-6)


REQUIRED_SCALARS = {
    "train/loss", "train/clip", "train/cross", "train/inmodal", "train/rank_weight", "train/logit_scale",
    "train/logit_scale_raw", "train/lr", "train/grad_norm", "train/skipped_steps", "perf/samples_per_s",
    "perf/samples_per_s_per_device", "perf/data_wait_fraction", "perf/step_time_s", "memory/rss_peak_gib",
}  # fmt: skip


@pytest.mark.timeout(600)
def test_tensorboard_events_hold_the_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs.zero(2)
    acc = EventAccumulator(str(run["run"] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags >= REQUIRED_SCALARS, REQUIRED_SCALARS - tags
    loss_events = acc.Scalars("train/loss")
    assert [e.step for e in loss_events] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor([e.value for e in loss_events]), torch.tensor(losses(run)))
    assert [e.value for e in acc.Scalars("train/rank_weight")][-1] == pytest.approx(2.0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_signal_on_one_rank_stops_all_ranks_after_a_checkpoint(runs, tmp_path):
    """SIGUSR1 delivered to rank 1 only during step 2: both ranks finish step 2, save it together, exit with the
    requeue code; a resumed run continues exactly like the uninterrupted one."""
    full = runs.zero(2)
    out = tmp_path / "signal"
    ds = {"zero_optimization": ZERO[2]}
    common = ["--optim.micro_batch_size", "8", "--checkpoint.every_steps", "100", "--run.output_dir", str(out / "run")]
    stopped = run_harness(out / "a", common, ds, signal={"rank": 1, "step": 2, "name": "SIGUSR1"})
    log = (out / "a" / "log.txt").read_text()
    assert "received SIGUSR1" in log and "exit code 75" in log
    for rank in stopped["ranks"]:
        assert [r["step"] for r in rank["records"]] == [1, 2]
        assert rank["summary"]["stopped_by_signal"] == 10  # SIGUSR1
    ckpts = out / "run" / "rankclip" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert not (out / "run" / "rankclip" / "export").exists()  # a preempted run is not finished: no export
    resumed = run_harness(out / "b", [*common, "--checkpoint.resume", "latest"], ds)
    assert [r["step"] for r in resumed["records"]] == [3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(full)[2:]), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_logit_scale_cannot_drift_past_the_clamp_in_the_optimizers_master(stage, tmp_path):
    """``model.max_logit_scale`` is the one clamp, and it reaches what the optimizer updates: DeepSpeed's fp32 master
    copy is set past it before step 3 (as a scale that keeps rising would push it), then training goes on through
    the real loop. The master (DeepSpeed's ``safe_get_full_fp32_param`` and its ``zero_to_fp32`` consolidation of
    the checkpoint), the live value, the logged value and the export all stay at or below ``ln(max)``; clamping
    the module's parameter alone leaves the master, and so the export, at the pushed value."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bound = float(torch.tensor(math.log(14.3)))  # ln(14.3) rounded to float32, as the clamp stores it
    run = run_harness(
        tmp_path, ["--optim.micro_batch_size", "8", "--model.max_logit_scale", "14.3"],
        {"zero_optimization": ZERO[stage]}, push_logit_scale={"step": 3, "value": bound + 0.5},
    )  # fmt: skip
    live = [r["logit_scale_raw"] for r in run["records"]]
    assert all(v <= bound for v in live), live
    assert live[2] == bound  # the pushed step was clamped: the test pushed the value past the clamp indeed
    for rank in run["ranks"]:
        assert rank["master_logit_scale"] <= bound, rank["master_logit_scale"]
    acc = EventAccumulator(str(run["run"] / "tb"))
    acc.Reload()
    logged = [e.value for e in acc.Scalars("train/logit_scale_raw")]
    assert len(logged) == 6 and all(v <= bound for v in logged), logged
    assert all(e.value <= 14.3 + 1e-5 for e in acc.Scalars("train/logit_scale"))
    ckpt = run["run"] / "checkpoints"
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step_00000006")
    assert consolidated["logit_scale"].item() <= bound
    assert export_state(run)["logit_scale"].item() <= bound


def is_bf16(value: float) -> bool:
    return torch.tensor(value).bfloat16().item() == value


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_bf16_zero2_follows_fp32_and_resumes_exactly(runs, tmp_path):
    """2-rank ZeRO-2 in bf16 against the same run in fp32 (same data, seed and steps), then a bf16 resume.

    Tolerance, measured on this run: bf16 keeps 8 significant bits (2⁻⁹ relative rounding) of every weight and
    activation, and over 6 steps the bf16 losses stayed within 1.9e-3 (relative) of the fp32 ones, the clip term
    within 1.9e-3 and the ListMLE terms within 7.3e-3: tolerances 5e-3 and 2e-2. The loss falls by ~0.5 over the
    run and by 0.03-0.3 per step, so a bf16 run that does not train, or trains another model, is far outside. The
    resumed bf16 run repeats the uninterrupted one's steps 4-6 (measured: bit-identical; checked at the fp32
    resume tolerance)."""
    fp32 = runs.zero(2)
    ds = {"zero_optimization": ZERO[2]}
    bf16_args = ["--optim.micro_batch_size", "8", "--run.precision", "bf16"]
    bf16 = run_harness(tmp_path / "bf16", bf16_args, ds)
    # It really ran in bf16: the module's logit scale is a bf16 number (the fp32 run's is not).
    assert all(is_bf16(v) for v in losses(bf16, "logit_scale_raw"))
    assert not all(is_bf16(v) for v in losses(fp32, "logit_scale_raw"))
    assert losses(bf16)[-1] < losses(bf16)[1] - 0.1, losses(bf16)  # it trains
    torch.testing.assert_close(torch.tensor(losses(bf16)), torch.tensor(losses(fp32)), rtol=5e-3, atol=0)
    torch.testing.assert_close(
        torch.tensor(losses(bf16, "clip")), torch.tensor(losses(fp32, "clip")), rtol=5e-3, atol=0
    )
    for key in ("cross", "inmodal"):
        torch.testing.assert_close(torch.tensor(losses(bf16, key)), torch.tensor(losses(fp32, key)), rtol=2e-2, atol=0)
    resumed = resume_from_step3(bf16, tmp_path / "resume", bf16_args, ds, nproc=2)
    assert [r["step"] for r in resumed["records"]] == [4, 5, 6]
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(bf16)[3:]), rtol=RTOL, atol=ATOL)
    assert_same_params(export_state(resumed), export_state(bf16), rtol=PARAM_RTOL, atol=PARAM_ATOL)


OFFLOAD_CONFIGS = sorted(p.name for p in Path(REPO_ROOT, "ds_configs").glob("*offload*.json"))


def test_the_shipped_offload_configs_are_found():
    """The slow test below is parametrized by this glob: an empty or partial match would drop its cases silently."""
    assert {"zero2_offload.json", "zero3_offload.json"} <= set(OFFLOAD_CONFIGS)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("config", OFFLOAD_CONFIGS)
def test_offload_config_steps_and_resumes(config, tmp_path):
    """Each CPU-offload config of ds_configs/ as shipped (optimizer, and for ZeRO-3 the parameters, on the CPU;
    DeepSpeed's CPU Adam, built by tools/prebuild_ops.py): 2 ranks take two engine steps with a checkpoint after
    each; a run resumed from the first checkpoint takes the second step exactly as the uninterrupted run did."""
    ds = json.loads(Path(REPO_ROOT, "ds_configs", config).read_text())
    args = ["--optim.micro_batch_size", "8", "--schedule.total_steps", "2", "--checkpoint.every_steps", "1"]
    first = run_harness(tmp_path / "a", args, ds)
    log = (first["dir"] / "log.txt").read_text()
    assert "DeepSpeedCPUAdam" in log, log[-3000:]  # the optimizer that steps offloaded states
    assert [r["step"] for r in first["records"]] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in first["records"])
    assert losses(first, "logit_scale_raw")[1] != losses(first, "logit_scale_raw")[0]  # the optimizer stepped
    resumed = resume_from_step3(first, tmp_path / "resume", args, ds, nproc=2, step=1)
    assert [r["step"] for r in resumed["records"]] == [2]
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(first)[1:]), rtol=RTOL, atol=ATOL)
    assert_same_params(export_state(resumed), export_state(first), rtol=PARAM_RTOL, atol=PARAM_ATOL)
