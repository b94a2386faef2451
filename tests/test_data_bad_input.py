"""Every kind of bad input is skipped and counted; a shard can never run code."""

from __future__ import annotations

import io
import pickle
import tarfile
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


def test_each_bad_input_kind_is_skipped_and_counted(tmp_path):
    spec, good, bad = build_bad_shards(tmp_path)
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
    seen = set()
    for epoch in range(2):
        batches = list(loader.epoch_iter(epoch))
        assert len(batches) == loader.batches_per_epoch, "bad input never shortens an epoch"
        seen |= {k for b in batches for k in b["key"]}
    assert not seen & bad
    assert good <= seen
    assert {k for k in seen if k.startswith("goodT")} <= {"goodT0", "goodT1", "goodT2"}
    counts = loader.skip_counts()
    for reason in (
        "decode_error",
        "zero_byte",
        "missing_caption",
        "empty_caption",
        "bad_utf8",
        "missing_image",
        "oversized_image",
        "unknown_extension",
        "truncated_tar",
        "missing_shard",
        "padded",
    ):
        assert counts.get(reason, 0) >= 1, (reason, counts)
    assert counts["decode_error"] >= 2  # garbage bytes and a JPEG cut in half
    assert counts["zero_byte"] >= 2  # empty image and empty caption


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
