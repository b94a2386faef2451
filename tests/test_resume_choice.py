"""Choosing what to resume from, without DeepSpeed: which checkpoint, direct or universal load, the global-batch
check, and the data position carried over a world-size change (multi-process runs: test_trainer,
test_fault_tolerance)."""

from __future__ import annotations

import json

import pytest

from rankclip_ds.config import BatchSizes, ConfigError, load_config
from rankclip_ds.trainer.checkpoint import CheckpointManager
from rankclip_ds.trainer.resume import batches_consumed, choose_resume


def write_checkpoint(root, step: int, **meta) -> None:
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text(json.dumps({"step": step, **meta}))


META = {"world_size": 2, "zero_stage": 2, "micro_batch_size": 8, "grad_accum_steps": 1, "global_batch_size": 16}


def plan(tmp_path, world: int, micro: int, stage: int = 2, resume: str = "latest"):
    ckpt = CheckpointManager(tmp_path, keep_last=2, rank=0)
    batch = BatchSizes(micro, 1, world, micro * world)
    return choose_resume(ckpt, resume, batch=batch, zero_stage=stage)


def test_no_checkpoint_yet_starts_from_scratch(tmp_path):
    assert plan(tmp_path, 2, 8) is None
    (tmp_path / "step_00000009").mkdir()  # an interrupted save: no COMPLETE marker
    assert plan(tmp_path, 2, 8) is None


def test_same_topology_loads_directly_and_the_newest_complete_wins(tmp_path):
    write_checkpoint(tmp_path, 3, **META)
    write_checkpoint(tmp_path, 6, **META)
    (tmp_path / "latest").write_text("step_00000003")  # a crash between the marker and the pointer
    target = plan(tmp_path, 2, 8)
    assert target.path.name == "step_00000006" and not target.universal
    assert (target.load_dir, target.tag) == (tmp_path, "step_00000006")


@pytest.mark.parametrize(("world", "micro", "stage"), [(1, 16, 2), (4, 4, 2), (2, 8, 1)])
def test_another_world_size_or_zero_1_2_goes_through_the_universal_form(tmp_path, world, micro, stage):
    write_checkpoint(tmp_path, 3, **META)
    target = plan(tmp_path, world, micro, stage)
    assert target.universal and (target.load_dir, target.tag) == (tmp_path / "step_00000003", "universal")


def test_another_global_batch_is_refused_with_the_fix(tmp_path):
    write_checkpoint(tmp_path, 3, **META)
    with pytest.raises(ConfigError, match=r"global batch of 16 \(2 ranks × micro 8 × accum 1\); this run's is 8 .*"
                       r"--optim.global_batch_size 16 --optim.micro_batch_size null"):  # fmt: skip
        plan(tmp_path, 1, 8)


@pytest.mark.parametrize(("saved", "now"), [(2, 3), (3, 2), (0, 2)])
def test_stage_changes_deepspeed_cannot_make_are_refused(tmp_path, saved, now):
    write_checkpoint(tmp_path, 3, **{**META, "zero_stage": saved})
    with pytest.raises(ConfigError, match=rf"ZeRO stage {saved} on 2 ranks.*zero_optimization.stage={saved}"):
        plan(tmp_path, 2, 8, now)


def test_a_path_that_is_not_a_complete_checkpoint_is_refused(tmp_path):
    (tmp_path / "step_00000003").mkdir()
    with pytest.raises(ConfigError, match="not a complete checkpoint folder"):
        plan(tmp_path, 2, 8, resume=str(tmp_path / "step_00000003"))


@pytest.mark.parametrize(("world", "micro", "expected"), [(2, 8, 3), (1, 16, 3), (4, 4, 3), (8, 2, 3)])
def test_the_data_position_is_kept_as_global_samples(world, micro, expected):
    # 3 batches of 8 on each of 2 ranks = 48 samples of the epoch, whatever the new split of the global batch 16.
    client = {"samples_in_epoch_per_rank": 24, "world_size": 2, "epoch": 1}
    assert batches_consumed(client, BatchSizes(micro, 1, world, micro * world), where="ckpt") == expected


def test_a_data_position_the_new_batch_cannot_split_is_an_error():
    client = {"samples_in_epoch_per_rank": 24, "world_size": 2, "epoch": 1}
    with pytest.raises(ConfigError, match="48 samples of epoch 1 were consumed, which 1 ranks × micro batch 32"):
        batches_consumed(client, BatchSizes(32, 1, 1, 32), where="ckpt")


def test_stepping_back_sets_the_later_checkpoints_aside_without_deleting_them(tmp_path):
    for step in (3, 6, 9):
        write_checkpoint(tmp_path, step, **META)
    (tmp_path / "step_00000012").mkdir()  # an interrupted save of the abandoned future
    target = plan(tmp_path, 2, 8)
    assert target.path.name == "step_00000009"
    # Resuming from step 3 explicitly (e.g. over a loss spike): 6, 9 and the partial 12 are set aside at once.
    from rankclip_ds.trainer.resume import agree_resume

    ckpt = CheckpointManager(tmp_path, keep_last=2, rank=0)
    chosen = agree_resume(ckpt, str(tmp_path / "step_00000003"), batch=BatchSizes(8, 1, 2, 16), zero_stage=2)
    assert chosen.path.name == "step_00000003"
    assert ckpt.latest().name == "step_00000003" and ckpt.complete_tags() == ["step_00000003"]
    kept = sorted(p.name.rsplit("_", 1)[0] for p in tmp_path.glob("abandoned_*"))
    assert kept == ["abandoned_step_00000006", "abandoned_step_00000009", "abandoned_step_00000012"]
    assert (next(tmp_path.glob("abandoned_step_00000009_*")) / "COMPLETE").is_file()  # nothing deleted


def test_a_resume_keeps_the_checkpoints_number_of_data_streams(tmp_path):
    """The streams define the sample order: a resumed run takes the checkpoint's, whatever the default of its own
    world size would be, and an explicit contradicting value is refused naming both."""
    from rankclip_ds.trainer.checkpoint import LoadTarget
    from rankclip_ds.trainer.setup import data_streams

    cfg = load_config(overrides=[])
    target = LoadTarget(tmp_path / "step_00000003", {"data_streams": 6, "world_size": 2}, universal=True)
    assert data_streams(cfg, target) == 6
    assert data_streams(cfg, None) is None  # a fresh run: the loader's default (one per rank and worker)
    assert data_streams(load_config(overrides=["--data.streams", "6"]), target) == 6
    old = LoadTarget(tmp_path / "step_00000003", {"world_size": 2}, universal=True)  # written before data_streams
    assert data_streams(load_config(overrides=["--data.streams", "3"]), old) == 3
    with pytest.raises(ConfigError, match=r"data\.streams=4: contradicts the checkpoint .*made of 6 streams"):
        data_streams(load_config(overrides=["--data.streams", "4"]), target)
