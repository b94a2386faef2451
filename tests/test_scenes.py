"""The many-to-many scenes benchmark: deterministic, facts consistent with captions and pixels, held-out pairs unseen,
graded relevance, readable by the training and evaluation loaders."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rankclip_ds.data import build_image_transform, build_train_loader, scenes
from rankclip_ds.evaluate.datasets import load_classnames_file, open_eval_data

REPO = Path(__file__).resolve().parents[1]
NUMBERS = {1: "one", 2: "two", 3: "three"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses", "star": "stars"}  # fmt: skip
HELD = {("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "diamond"), ("purple", "cross"),
        ("orange", "star"), ("white", "circle"), ("cyan", "square")}  # fmt: skip


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def meta(split: int, i: int, seed: int = 0) -> dict:
    return json.loads(scenes.make_scene_sample(split, i, seed=seed)["json"])


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """Key -> {extension: bytes}, with the standard library only (not the project's reader)."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def expected_facts(obj: dict) -> set[str]:
    """The documented fact vocabulary, written out by hand."""
    c, s, p, n = obj["colour"], obj["shape"], obj["position"], obj["count"]
    return {c, s, p, f"{c} {s}", f"{obj['size']} {s}", f"{NUMBERS[n]} {s if n == 1 else PLURALS[s]}", f"{p} {s}"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    info = scenes.write_scene_dataset(out, num_train=48, num_eval=20, num_zeroshot=24, samples_per_shard=16, seed=5)
    return out, info


def test_same_seed_gives_byte_identical_shards(tmp_path, written):
    out, _ = written
    scenes.write_scene_dataset(tmp_path / "a", num_train=48, num_eval=20, num_zeroshot=24, samples_per_shard=16, seed=5)
    scenes.write_scene_dataset(tmp_path / "b", num_train=48, num_eval=20, num_zeroshot=24, samples_per_shard=16, seed=6)
    assert digest(tmp_path / "a") == digest(out)
    assert digest(tmp_path / "b").keys() == digest(out).keys()
    assert all(digest(tmp_path / "b")[k] != v for k, v in digest(out).items() if k.endswith(".tar"))


def test_image_facts_follow_the_objects_and_caption_facts_are_a_subset():
    for split in (scenes.SPLIT_TRAIN, scenes.SPLIT_EVAL, scenes.SPLIT_ZEROSHOT):
        for i in range(300):
            m = meta(split, i)
            objects = m["objects"]
            assert 1 <= len(objects) <= 4 and len({o["shape"] for o in objects}) == len(objects)
            assert len({o["position"] for o in objects}) == len(objects)
            assert set(m["image_facts"]) == set().union(*(expected_facts(o) for o in objects))
            assert m["image_facts"] == sorted(set(m["image_facts"]))
            assert set(m["caption_facts"]) <= set(m["image_facts"])
            assert {o["shape"] for o in objects} & set(m["caption_facts"])


def test_caption_text_states_exactly_its_facts():
    """Colour and shape words in the caption are exactly the colour and shape facts; count words and positions too."""
    colours, shapes = set(scenes.COLOURS), set(PLURALS)
    for i in range(400):
        sample = scenes.make_scene_sample(scenes.SPLIT_TRAIN, i, seed=1)
        facts, words = set(json.loads(sample["json"])["caption_facts"]), sample["txt"].split()
        assert {w for w in words if w in colours} == facts & colours, sample["txt"]
        singular = {p: s for s, p in PLURALS.items()}
        assert {singular.get(w, w) for w in words if w in shapes or w in singular} == facts & shapes, sample["txt"]
        numbers = {f.split()[0] for f in facts if f.split()[0] in NUMBERS.values()}
        assert numbers == {w for w in words if w in NUMBERS.values()}, sample["txt"]
        sizes = {f.split()[0] for f in facts if f.split()[0] in ("small", "large")}
        assert sizes == {w for w in words if w in ("small", "large")}, sample["txt"]
        positions = {"left", "right", "top", "bottom", "centre"}
        assert {w for w in words if w in positions} == facts & positions, sample["txt"]


def test_held_out_pairs_never_in_train_or_eval_images_nor_captions():
    assert {tuple(p.split()) for p in scenes.classnames()} == HELD
    seen = set()
    for split in (scenes.SPLIT_TRAIN, scenes.SPLIT_EVAL):
        for i in range(1500):
            sample = scenes.make_scene_sample(split, i, seed=0)
            m = json.loads(sample["json"])
            pairs = {(o["colour"], o["shape"]) for o in m["objects"]}
            assert not pairs & HELD
            assert not {f"{c} {s}" for c, s in HELD} & (set(m["image_facts"]) | set(m["caption_facts"]))
            text = sample["txt"]
            for c, s in HELD:
                assert f"{c} {s}" not in text and f"{s} in {c}" not in text and f"{PLURALS[s]} in {c}" not in text
            seen |= pairs
    # every other pair is drawn, so each colour and shape on its own is well represented
    assert len(seen) == len(scenes.COLOURS) * len(PLURALS) - len(HELD)


def test_zeroshot_labels_match_their_images(written):
    out, info = written
    names = load_classnames_file(out / info["classnames"])
    assert names == scenes.classnames()
    samples = read_tar(out / "zeroshot" / "scenes-zs-000000.tar")
    samples.update(read_tar(out / "zeroshot" / "scenes-zs-000001.tar"))
    labels = []
    for key, members in sorted(samples.items()):
        m, label = json.loads(members["json"]), int(members["cls"])
        assert len(m["objects"]) == 1 and m["objects"][0]["count"] == 1, key
        obj = m["objects"][0]
        assert f"{obj['colour']} {obj['shape']}" == names[label] and names[label] in m["image_facts"]
        labels.append(label)
    assert sorted(labels) == sorted(list(range(8)) * 3)  # balanced: class = index % 8
    assert (out / info["templates"]).read_text().splitlines()[0] == "a photo of a {}."


def test_relevance_is_graded_and_a_caption_own_image_is_most_relevant():
    metas = [meta(scenes.SPLIT_EVAL, i) for i in range(150)]
    images = [set(m["image_facts"]) for m in metas]
    captions = [set(m["caption_facts"]) for m in metas]
    image_image = {len(a & b) for i, a in enumerate(images) for j, b in enumerate(images) if i != j}
    image_text = [[len(a & c) for c in captions] for a in images]  # (images, captions)
    text_text = {len(a & b) for i, a in enumerate(captions) for j, b in enumerate(captions) if i != j}
    assert {0, 1, 2, 3, 4, 5, 6, 7, 8} <= image_image
    assert {0, 1, 2, 3, 4, 5} <= {v for row in image_text for v in row}
    assert {0, 1, 2, 3} <= text_text
    for j, c in enumerate(captions):
        column = [image_text[i][j] for i in range(len(images))]
        assert column[j] == len(c) == max(column)


def test_images_show_each_object_in_its_region():
    """Pixels of an object's colour lie in the regions of the objects of that colour, enough of them for its count."""
    n = 64
    for i in range(60):
        sample = scenes.make_scene_sample(scenes.SPLIT_TRAIN, i, seed=2, image_size=n)
        m = json.loads(sample["json"])
        pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float32)
        for colour in {o["colour"] for o in m["objects"]}:
            near = np.linalg.norm(pixels - np.array(scenes.COLOURS[colour], np.float32), axis=-1) < 60
            inside = np.zeros_like(near)
            for obj in (o for o in m["objects"] if o["colour"] == colour):
                x0, y0, x1, y1 = (round(v * n) for v in scenes.REGIONS[obj["position"]])
                inside[y0:y1, x0:x1] = True
                r = scenes.RADIUS[obj["size"]] * n
                assert near[y0:y1, x0:x1].sum() >= 0.6 * r * r * obj["count"], (i, obj)
            assert (near & ~inside).sum() <= 8, (i, colour)


def test_tool_writes_info_json_with_the_documented_keys(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_scene_shards.py"), "--output", str(tmp_path), "--num-train", "30",
         "--num-eval", "10", "--num-zeroshot", "8", "--samples-per-shard", "8", "--seed", "1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["samples_per_second"] > 0
    info = json.loads((tmp_path / "info.json").read_text())
    assert set(info) == {"train_spec", "eval_spec", "zeroshot_spec", "classnames", "templates", "num_train",
                         "num_eval", "num_zeroshot", "held_out", "fact_kinds", "seed", "image_size"}  # fmt: skip
    assert info["train_spec"] == "train/scenes-train-{000000..000003}.tar"
    assert info["eval_spec"] == "eval/scenes-eval-{000000..000001}.tar"
    assert info["zeroshot_spec"] == "zeroshot/scenes-zs-{000000..000000}.tar"
    assert (info["num_train"], info["num_eval"], info["num_zeroshot"], info["seed"]) == (30, 10, 8, 1)
    assert info["held_out"] == scenes.classnames() and info["image_size"] == 64
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == [
        f"scenes-train-00000{k}.tar" for k in range(4)
    ]
    assert json.loads((tmp_path / "eval" / "_manifest.json").read_text())["total"] == 10


def test_training_and_evaluation_loaders_read_the_shards(written):
    out, info = written
    loader = build_train_loader(
        str(out / info["train_spec"]),
        tokenizer=None,
        image_transform=build_image_transform(32, train=True),
        batch_size=8,
        num_workers=0,
        seed=0,
        rank=0,
        world_size=1,
    )
    batches = list(loader.epoch_iter(0))
    assert len(batches) == 6 and batches[0]["image"].shape == (8, 3, 32, 32)
    assert sorted(k for b in batches for k in b["key"]) == [f"train{i:08d}" for i in range(48)]
    assert not loader.skip_counts()
    opened = open_eval_data(
        str(out / info["zeroshot_spec"]),
        image_transform=build_image_transform(32, train=False),
        batch_size=10,
        classnames=str(out / info["classnames"]),
    )
    labels = [label for b in opened.loader for label in b["label"].tolist()]
    assert sorted(labels) == sorted(list(range(8)) * 3)
    assert not opened.skips.counts()
