"""Resampled mode: weighted sources, infinite stream cut into virtual epochs, seeded per rank/worker/epoch."""

from __future__ import annotations

import pytest
from test_data_pipeline import jpeg, write_shards

from rankclip_ds.data import build_image_transform, build_train_loader
from rankclip_ds.data.shard_writer import ShardSink
from rankclip_ds.data.sources import parse_spec


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("resampled")
    spec_a, _ = write_shards(root / "a", sizes=[10, 10])
    with ShardSink(root / "b", "other", 10) as sink:  # keys b00000.. tell the second source apart
        for k in range(20):
            sink.write({"__key__": f"b{k:05d}", "jpg": jpeg(k), "txt": f"other caption {k}"})
    return spec_a, str(root / "b" / "other-{000000..000001}.tar")


def loader_for(spec, rank=0, world_size=1, **kw):
    return build_train_loader(
        spec,
        tokenizer=None,
        image_transform=build_image_transform(8, train=True),
        batch_size=4,
        num_workers=2,
        seed=5,
        rank=rank,
        world_size=world_size,
        mode="resampled",
        shuffle_buffer=8,
        persistent_workers=False,
        **kw,
    )


def test_spec_weights_parse():
    sources = parse_spec("/x/{0..2}.tar@3::pipe:cat /y/{a,b}.tar::https://h.invalid/z-{00..09}.tar@0.5")
    assert [len(s.urls) for s in sources] == [3, 2, 10]
    assert [s.weight for s in sources] == [3.0, 1.0, 0.5]
    assert sources[1].urls == ["pipe:cat /y/a.tar", "pipe:cat /y/b.tar"]
    with pytest.raises(ValueError, match="weights must be positive"):
        parse_spec("/x/a.tar", weights=[0])


def test_weighted_sources_virtual_epoch_and_determinism(two_sources):
    spec_a, spec_b = two_sources
    spec = f"{spec_a}@1::{spec_b}@3"
    loader = loader_for(spec, samples_per_epoch=800)  # far more than the 40 samples: the stream is infinite
    assert loader.batches_per_epoch == 200
    batches = [b["key"] for b in loader.epoch_iter(0)]
    assert len(batches) == 200
    urls = [u for b in loader.epoch_iter(0) for u in b["key"]]
    assert [k for b in batches for k in b] == urls, "same seed and epoch, same stream"
    again = [b["key"] for b in loader_for(spec, samples_per_epoch=800).epoch_iter(0)]
    assert again == batches
    assert [b["key"] for b in loader.epoch_iter(1)] != batches


def test_weights_shape_the_mixture(two_sources):
    spec_a, spec_b = two_sources
    loader = loader_for(f"{spec_a}::{spec_b}", weights=[1, 3], samples_per_epoch=2000)
    keys = [k for batch in loader.epoch_iter(0) for k in batch["key"]]
    assert len(keys) == 2000
    share_b = sum(k.startswith("b") for k in keys) / len(keys)
    assert 0.6 < share_b < 0.9  # weight 3 of 4, drawn per shard of 10 samples


def test_equal_batches_per_rank_and_resume(two_sources):
    """Resampled resume is statistical (docs/data.md): the rest of the epoch comes from a stream seeded with the
    batches already done, not a replay. So the resumed batches are that stream's, reproducibly, not the epoch's
    start again; and the next epoch is the uninterrupted run's, sample for sample."""
    spec_a, _ = two_sources
    source_keys = {f"s{k:05d}" for k in range(20)}
    loaders = [loader_for(spec_a, rank=r, world_size=2, samples_per_epoch=100) for r in range(2)]
    epoch3 = [[b["key"] for b in ld.epoch_iter(3)] for ld in loaders]
    assert [len(e) for e in epoch3] == [12, 12] and epoch3[0] != epoch3[1]  # each rank draws its own stream

    def resumed(done: int) -> tuple[list[list[str]], list[list[str]]]:
        loader = loader_for(spec_a, rank=1, world_size=2, samples_per_epoch=100)
        loader.resume(3, samples=done * 4)
        return [b["key"] for b in loader.epoch_iter(3)], [b["key"] for b in loader.epoch_iter(4)]

    rest, next_epoch = resumed(5)
    assert len(rest) == 7 and all(len(keys) == 4 and set(keys) <= source_keys for keys in rest)
    assert resumed(5) == (rest, next_epoch)  # the same position resumes the same samples
    assert not set(map(tuple, rest)) & set(map(tuple, epoch3[1][:5]))  # not the epoch's start again
    assert resumed(6)[0] != rest and resumed(4)[0] != rest  # the position decides what comes next
    assert next_epoch == [b["key"] for b in loaders[1].epoch_iter(4)]


def test_pipe_sources_in_both_modes(two_sources, tmp_path):
    spec_a, _ = two_sources
    folder, pattern = spec_a.rsplit("/", 1)
    pipe_spec = f"pipe:cat {folder}/{pattern}"
    manifest = {"part0-000000.tar": 10, "part1-000000.tar": 10}  # remote shards need counts for epoch mode
    epoch = build_train_loader(
        pipe_spec,
        tokenizer=None,
        image_transform=build_image_transform(8, train=True),
        batch_size=4,
        num_workers=0,
        seed=0,
        rank=0,
        world_size=1,
        manifest=manifest,
    )
    assert sorted(k for b in epoch.epoch_iter(0) for k in b["key"]) == [f"s{i:05d}" for i in range(20)]
    with pytest.raises(ValueError, match="number of samples in shard"):
        build_train_loader(
            pipe_spec,
            tokenizer=None,
            image_transform=build_image_transform(8, train=True),
            batch_size=4,
            num_workers=0,
            seed=0,
            rank=0,
            world_size=1,
        )
    resampled = loader_for(pipe_spec, samples_per_epoch=40)
    assert len(list(resampled.epoch_iter(0))) == 10
    missing = loader_for(f"pipe:cat {tmp_path}/nothing.tar", samples_per_epoch=8)
    with pytest.raises(RuntimeError, match="gave no sample"):
        list(missing.epoch_iter(0))
