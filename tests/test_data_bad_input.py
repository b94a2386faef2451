"""Every kind of bad input is skipped and counted; a shard can never run code."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_pipeline import jpeg

from rankclip_ds.data import build_image_transform, build_train_loader
from rankclip_ds.data.records import iter_records
from rankclip_ds.data.shard_writer import ShardSink, TarShardWriter
from rankclip_ds.data.skips import SkipCounter


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_bad_shards(root: Path) -> tuple[str, set[str], set[str]]:
    root.mkdir(parents=True, exist_ok=True)
    good, bad = set(), set()
    big = io.BytesIO()
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(big, "PNG")
    cut_jpeg = jpeg(3, size=64)
    cases = {
        "corrupt": {"jpg": b"\xff\xd8 this is not a jpeg at all", "txt": "caption"},
        "cutjpeg": {"jpg": cut_jpeg[: len(cut_jpeg) // 2], "txt": "caption"},
        "zeroimg": {"jpg": b"", "txt": "caption"},
        "zerotxt": {"jpg": jpeg(1), "txt": b""},
        "nocaption": {"jpg": jpeg(2)},
        "emptycaption": {"jpg": jpeg(2), "txt": "   \n"},
        "badutf8": {"jpg": jpeg(2), "txt": b"caf\xe9 \xff\xfe"},
        "noimage": {"txt": "caption without image"},
        "bomb": {"png": big.getvalue(), "txt": "huge image"},
        "badjson": {"jpg": jpeg(5), "txt": "fine", "json": b"{not json"},  # json is only read when captioning from it
    }
    with TarShardWriter(root / "bad-000000.tar") as w:
        for i in range(6):
            w.write({"__key__": f"goodA{i}", "jpg": jpeg(i), "txt": f"good caption {i}", "xyz": b"unknown member"})
            good.add(f"goodA{i}")
        for key, members in cases.items():
            w.write({"__key__": key, **members})
            bad.add(key)
    bad.discard("badjson")
    good.add("badjson")
    # a truncated tar: three complete samples, then a member cut in the middle
    with TarShardWriter(root / "trunc-000000.tar") as w:
        for i in range(4):
            w.write({"__key__": f"goodT{i}", "jpg": jpeg(40 + i, size=64), "txt": f"caption {i}"})
    with tarfile.open(root / "trunc-000000.tar") as tar:
        last = tar.getmember("goodT3.jpg")
    data = (root / "trunc-000000.tar").read_bytes()
    (root / "trunc-000000.tar").write_bytes(data[: last.offset_data + last.size // 2])
    with TarShardWriter(root / "ok-000000.tar") as w:
        for i in range(6):
            w.write({"__key__": f"goodB{i}", "jpg": jpeg(60 + i), "txt": f"another caption {i}"})
            good.add(f"goodB{i}")
    spec = f"{root}/bad-000000.tar::{root}/trunc-000000.tar::{root}/{{ok,missing}}-000000.tar"
    return spec, good, bad


# The reason each bad sample of build_bad_shards is skipped for, each time the loader's stream hands it over.
REASON_OF_KEY = {
    "corrupt": "decode_error",
    "cutjpeg": "decode_error",
    "zeroimg": "zero_byte",
    "zerotxt": "zero_byte",
    "nocaption": "missing_caption",
    "emptycaption": "empty_caption",
    "badutf8": "bad_utf8",
    "noimage": "missing_image",
    "bomb": "oversized_image",
}


def record_stream_events(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[dict]]:
    """Logs, from every process (the DataLoader's workers are forked, so they inherit the patches), what the loader
    reads and uses: each shard read (``open``, and ``end`` when the read ran to its end), each record read from a
    shard (``read``), and each record the epoch stream hands to decoding (``use``, with its padded flag). Returns
    a function that collects the events."""
    from rankclip_ds.data import pipeline

    folder.mkdir()
    real_iter_records, real_epoch_records = pipeline.iter_records, pipeline.ShardStream._epoch_records

    def log(**event) -> None:
        with open(folder / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")

    def iter_records(url, skips, start=0, stop=None, **kw):
        log(kind="open", url=url, start=start, stop=stop)
        for record in real_iter_records(url, skips, start, stop, **kw):
            log(kind="read", key=record["__key__"])
            yield record
        log(kind="end", url=url, start=start, stop=stop)

    def epoch_records(dataset, plan, stream):
        for record, padded in real_epoch_records(dataset, plan, stream):
            log(kind="use", key=record["__key__"], padded=padded)
            yield record, padded

    monkeypatch.setattr(pipeline, "iter_records", iter_records)
    monkeypatch.setattr(pipeline.ShardStream, "_epoch_records", epoch_records)
    return lambda: [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def expected_skip_counts(events: list[dict]) -> Counter:
    """The counts the loader must report, from what it read and used: one per read of a bad record or of a bad
    member, counted by the reason the test data was built with (build_bad_shards), never from the library."""
    expected: Counter = Counter()
    for e in events:
        if e["kind"] == "use" and e["key"] in REASON_OF_KEY:
            expected[REASON_OF_KEY[e["key"]]] += 1
        elif e["kind"] == "use" and e["padded"]:
            expected["padded"] += 1  # a good sample from a top-up pass
        elif e["kind"] == "read" and e["key"].startswith("goodA"):
            expected["unknown_extension"] += 1  # each goodA record has one .xyz member
        elif e["kind"] == "open" and e["url"].endswith("missing-000000.tar"):
            expected["missing_shard"] += 1
        elif e["kind"] == "end" and e["url"].endswith("trunc-000000.tar") and (e["stop"] is None or e["stop"] > 3):
            expected["truncated_tar"] += 1  # a read that reached record 3, the one cut in the middle
    return expected


def test_each_bad_input_kind_is_skipped_and_counted(tmp_path, monkeypatch):
    """Each kind of bad input is skipped, and counted exactly once per time the loader comes across it, under its
    own reason. Bad samples are met more than once per epoch (the top-up passes that keep every epoch full read the
    worker's records again), so the expected counts come from a log of what the loader read and used."""
    spec, good, bad = build_bad_shards(tmp_path / "shards")
    events = record_stream_events(tmp_path / "events", monkeypatch)
    manifest = {"bad-000000.tar": 16, "trunc-000000.tar": 4, "ok-000000.tar": 6, "missing-000000.tar": 3}
    loader = build_train_loader(
        spec,
        tokenizer=None,
        image_transform=build_image_transform(16, train=True),
        batch_size=2,
        num_workers=2,
        seed=0,
        rank=0,
        world_size=1,
        manifest=manifest,
        max_pixels=100 * 100,
        persistent_workers=False,
    )
    assert loader.batches_per_epoch == 29 // 2
    seen = []
    for epoch in range(2):
        batches = list(loader.epoch_iter(epoch))
        assert len(batches) == loader.batches_per_epoch, "bad input never shortens an epoch"
        seen += [k for b in batches for k in b["key"]]
    assert not set(seen) & bad
    assert good <= set(seen)
    assert {k for k in seen if k.startswith("goodT")} <= {"goodT0", "goodT1", "goodT2"}
    log = events()
    assert {e["kind"] for e in log} == {"open", "read", "end", "use"}, "the workers did not log"
    # Every good sample the stream handed over is in a batch: the log saw what the loader did.
    assert sorted(e["key"] for e in log if e["kind"] == "use" and e["key"] not in REASON_OF_KEY) == sorted(seen)
    expected = expected_skip_counts(log)
    assert set(expected) == {*REASON_OF_KEY.values(), "unknown_extension", "missing_shard", "truncated_tar",
                             "padded"}, expected  # fmt: skip
    assert loader.skip_counts() == dict(expected)


def test_bad_json_caption_and_bad_labels_are_counted(tmp_path):
    with ShardSink(tmp_path, "e", 100) as sink:
        sink.write({"__key__": "a", "jpg": jpeg(1), "json": b"{broken", "cls": "0"})
        sink.write({"__key__": "b", "jpg": jpeg(2), "json": b'{"caption": "ok"}', "cls": "seven"})
        sink.write({"__key__": "c", "jpg": jpeg(3), "json": b'{"caption": "ok"}', "cls": "9"})
        sink.write({"__key__": "d", "jpg": jpeg(4), "json": b'{"other": 1}', "cls": "1"})
    skips = SkipCounter(shared=False)
    records = list(iter_records(str(tmp_path / "e-000000.tar"), skips))
    from rankclip_ds.data.decode import extract_captions

    assert [extract_captions(r, "json:caption", skips) for r in records] == [None, ["ok"], ["ok"], None]
    assert skips.counts() == {"bad_json": 1, "missing_caption": 1}
    from rankclip_ds.evaluate.datasets import open_eval_data

    opened = open_eval_data(
        str(tmp_path / "e-000000.tar"),
        image_transform=build_image_transform(8, train=False),
        batch_size=8,
        classnames=["zero", "one"],
    )
    batches = list(opened.loader)
    assert [k for b in batches for k in b["key"]] == ["a", "d"]
    assert batches[0]["label"].tolist() == [0, 1]
    assert opened.skips.counts() == {"bad_label": 2}


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): a file appears if anything ever unpickles the member."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("ext", ["pyd", "pickle", "pth", "npy"])
def test_pickle_members_are_never_unpickled(tmp_path, ext):
    target = tmp_path / f"pwned_by_{ext}"
    payload = pickle.dumps(_CreatesFile(str(target)))
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_CreatesFile(str(probe)))).close()
    assert probe.exists(), "the payload does create a file when unpickled"
    with TarShardWriter(tmp_path / "evil-000000.tar") as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "jpg": jpeg(i), "txt": f"caption {i}", ext: payload})
    loader = build_train_loader(
        str(tmp_path / "evil-000000.tar"),
        tokenizer=None,
        image_transform=build_image_transform(8, train=True),
        batch_size=2,
        num_workers=0,
        seed=0,
        rank=0,
        world_size=1,
        caption_key="txt",
    )
    keys = [k for b in loader.epoch_iter(0) for k in b["key"]]
    assert sorted(keys) == ["k0", "k1", "k2", "k3"]
    assert not target.exists()
    assert loader.skip_counts() == {"unsafe_member": 4}
    from rankclip_ds.evaluate.datasets import open_eval_data

    opened = open_eval_data(
        str(tmp_path / "evil-000000.tar"),
        image_transform=build_image_transform(8, train=False),
        batch_size=2,
        labels=False,
        captions="txt",
    )
    assert len([k for b in opened.loader for k in b["key"]]) == 4
    assert not target.exists()
