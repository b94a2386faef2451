"""The embedded synthetic dataset: deterministic, held-out combinations unseen in training, readable by the loaders."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from rankclip_ds.data import build_image_transform, build_train_loader, synthetic
from rankclip_ds.evaluate.datasets import load_classnames_file, open_eval_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path):
    import make_synthetic_shards

    a = make_synthetic_shards.main(
        [
            "--output",
            str(tmp_path / "a"),
            "--num-train",
            "60",
            "--num-zeroshot",
            "20",
            "--samples-per-shard",
            "25",
            "--seed",
            "3",
        ]
    )
    synthetic.write_synthetic_dataset(tmp_path / "b", num_train=60, num_zeroshot=20, samples_per_shard=25, seed=3)
    synthetic.write_synthetic_dataset(tmp_path / "c", num_train=60, num_zeroshot=20, samples_per_shard=25, seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    assert a["held_out"] == synthetic.classnames()


def test_held_out_pairs_are_unseen_but_attributes_are_covered():
    held = set(synthetic.HELD_OUT)
    assert 6 <= len(held) <= 12
    seen_pairs = set()
    for i in range(3000):
        meta = json.loads(synthetic.make_sample(synthetic.SPLIT_TRAIN, i, seed=0)["json"])
        seen_pairs.add((meta["colour"], meta["shape"]))
    assert not seen_pairs & held
    assert {c for c, _ in seen_pairs} == set(synthetic.COLOURS)
    assert {s for _, s in seen_pairs} == set(synthetic.SHAPES)
    assert len(seen_pairs) == len(synthetic.COLOURS) * len(synthetic.SHAPES) - len(held)


def test_captions_share_attributes_across_phrasings():
    captions = [synthetic.make_sample(synthetic.SPLIT_TRAIN, i, seed=0)["txt"] for i in range(400)]
    assert len(set(captions)) > 100
    red = [c for c in captions if "red" in c]
    assert len(red) > 20 and len({c.split()[0] for c in red}) > 2  # one attribute, several phrasings


def test_loaders_read_the_synthetic_dataset(tmp_path):
    summary = synthetic.write_synthetic_dataset(tmp_path, num_train=64, num_zeroshot=24, samples_per_shard=16)
    loader = build_train_loader(
        summary["train_spec"],
        tokenizer=None,
        image_transform=build_image_transform(64, train=True),
        batch_size=8,
        num_workers=0,
        seed=0,
        rank=0,
        world_size=1,
    )
    batches = list(loader.epoch_iter(0))
    assert len(batches) == 8 and batches[0]["image"].shape == (8, 3, 64, 64)
    assert not loader.skip_counts()
    names = load_classnames_file(summary["classnames"])
    assert names == synthetic.classnames()
    opened = open_eval_data(
        summary["zeroshot_spec"],
        image_transform=build_image_transform(64, train=False),
        batch_size=10,
        classnames=summary["classnames"],
    )
    labels = [lbl for b in opened.loader for lbl in b["label"].tolist()]
    assert len(labels) == 24 and set(labels) <= set(range(len(names)))
    assert not opened.skips.counts()
