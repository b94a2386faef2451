"""The global sample order does not depend on the world size, the micro batch or the worker count: every global step
has the same samples, in the same positions, whether 1, 2, 3 or 4 ranks read it, and a resume on another world size
continues the interrupted epoch with exactly the samples the uninterrupted run would have seen.

The loader-level tests build every rank's loader in this process (their DataLoader workers are real processes) and
put each global step together from the ranks' micro-batches; the reference is a plain enumeration written here:
the set of samples of each step must equal the one of the 2-rank run, whatever the world size.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_data_pipeline import make_loader, write_shards

GLOBAL = 12  # divisible by 1, 2, 3 and 4 ranks


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 80 samples in 5 uneven shards: 6 steps of 12 per epoch, 8 samples dropped
    return write_shards(tmp_path_factory.mktemp("global_order"))


def global_steps(spec, world: int, epoch: int, *, accum: int = 1, workers: int = 2, streams: int = 4, done: int = 0):
    """``[step][position] -> (key, image)`` of one epoch read by ``world`` ranks, from step ``done`` on: each rank's
    micro-batches of a step, concatenated in rank order, are the step's global batch."""
    micro = GLOBAL // (world * accum)
    per_rank = []
    for rank in range(world):
        loader = make_loader(spec, rank=rank, world_size=world, num_workers=workers, batch_size=micro,
                             grad_accum_steps=accum, streams=streams)  # fmt: skip
        if done:
            loader.resume(epoch, samples=done * micro * accum)
        batches = list(loader.epoch_iter(epoch))
        assert len(batches) == (len(loader) - done * accum)
        assert all(len(b["key"]) == micro for b in batches)
        per_rank.append([batches[i : i + accum] for i in range(0, len(batches), accum)])
    steps = []
    for s in range(len(per_rank[0])):
        keys, images = [], []
        for rank in range(world):
            for micro_batch in per_rank[rank][s]:
                keys += micro_batch["key"]
                images.append(micro_batch["image"])
        steps.append((keys, torch.cat(images)))
    return steps


@pytest.fixture(scope="module")
def two_ranks(shards):
    spec, keys = shards
    steps = global_steps(spec, 2, epoch=1)
    assert len(steps) == 6  # 80 // 12
    seen = Counter(k for step_keys, _ in steps for k in step_keys)
    assert max(seen.values()) == 1 and len(seen) == 72, "each sample at most once in the epoch"
    assert set(seen) <= set(keys)
    return steps


@pytest.mark.parametrize(
    ("world", "accum", "workers"),
    [(1, 1, 2), (4, 1, 2), (3, 1, 1), (3, 2, 3), (1, 3, 0)],
    ids=["1rank", "4ranks", "3ranks_1worker", "3ranks_accum2_3workers", "1rank_accum3_inprocess"],
)
def test_every_world_size_reads_the_same_global_steps(shards, two_ranks, world, accum, workers):
    steps = global_steps(shards[0], world, epoch=1, accum=accum, workers=workers)
    assert [k for k, _ in steps] == [k for k, _ in two_ranks], "same samples, same positions, every step"
    for (_, mine), (_, theirs) in zip(steps, two_ranks, strict=True):
        assert torch.equal(mine, theirs), "the same random crops, whoever reads the stream"


@pytest.mark.parametrize(("world", "done"), [(1, 2), (4, 3), (3, 1)], ids=["2to1", "2to4", "2to3"])
def test_a_resume_on_another_world_size_continues_with_the_uninterrupted_samples(shards, two_ranks, world, done):
    resumed = global_steps(shards[0], world, epoch=1, done=done)
    assert [k for k, _ in resumed] == [k for k, _ in two_ranks[done:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, two_ranks[done:], strict=True))


def test_another_number_of_streams_is_another_order(shards, two_ranks):
    """The streams are part of the order's definition (and kept in checkpoints): a different count reorders."""
    other = global_steps(shards[0], 2, epoch=1, streams=3)
    assert [k for k, _ in other] != [k for k, _ in two_ranks]


def test_a_stream_straddling_two_ranks_is_read_by_both_and_split():
    from rankclip_ds.data.plan import Segment, StepLayout

    layout = StepLayout(12, 4)  # streams give 3 positions each: 0-2, 3-5, 6-8, 9-11
    assert layout.rank_segments(0, 3) == [Segment(0, 0, 3), Segment(1, 0, 1)]
    assert layout.rank_segments(1, 3) == [Segment(1, 1, 3), Segment(2, 0, 2)]
    assert layout.rank_segments(2, 3) == [Segment(2, 2, 3), Segment(3, 0, 3)]
    assert layout.worker_segments(1, 3, 2) == [[Segment(1, 1, 3)], [Segment(2, 0, 2)]]
    assert layout.worker_segments(0, 4, 2) == [[Segment(0, 0, 3)], []]  # one stream per rank: one worker idles
