"""Uneven shards over 2 real ranks (gloo) × 2 workers: a collective per batch never deadlocks at the epoch's end."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
from test_data_pipeline import write_shards

from conftest import run_ranks

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
from rankclip_ds.data import build_image_transform, build_train_loader

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
loader = build_train_loader(sys.argv[1], tokenizer=None, image_transform=build_image_transform(16, train=True),
                            batch_size=3, num_workers=2, seed=7, rank=rank, world_size=world)
result = {"batches": [], "keys": []}
for epoch in range(2):
    n = 0
    for batch in loader.epoch_iter(epoch):
        total = torch.tensor([batch["image"].shape[0]], dtype=torch.long)
        dist.all_reduce(total)  # hangs if the other rank has already left the epoch
        result["keys"].extend(batch["key"])
        n += 1
    dist.barrier()
    result["batches"].append(n)
with open(sys.argv[2], "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_uneven_shards_two_ranks_two_workers_two_epochs(tmp_path):
    spec, keys = write_shards(tmp_path / "shards", sizes=[5, 17, 2, 11, 8])  # 43 samples: not a multiple of 2×3
    outs = [tmp_path / f"rank{rank}.json" for rank in range(2)]
    run_ranks(lambda rank: [sys.executable, "-c", WORKER, spec, str(outs[rank])], timeout=200)
    results = [json.loads(o.read_text()) for o in outs]
    assert results[0]["batches"] == results[1]["batches"] == [7, 7]  # 43 // 6
    for epoch_slice in (slice(0, 21), slice(21, 42)):
        seen = results[0]["keys"][epoch_slice] + results[1]["keys"][epoch_slice]
        assert len(seen) == len(set(seen)) == 42 and set(seen) <= set(keys)
