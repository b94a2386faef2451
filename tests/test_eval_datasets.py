"""Evaluation inputs without a model: ImageFolder discovery, class names, templates, rank slices, skipped samples.

Also holds the small writers the other ``test_eval_*`` modules import (labelled images, shards, ImageFolder trees).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from rankclip_ds.data.shard_writer import TarShardWriter
from rankclip_ds.data.transforms import build_image_transform
from rankclip_ds.evaluate import OPENAI_IMAGENET_TEMPLATES, fill_template, resolve_templates
from rankclip_ds.evaluate.datasets import list_image_folder, open_eval_data, resolve_classnames
from rankclip_ds.evaluate.slices import FolderPiece, ShardPiece, split_contiguous

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}


def make_images(n: int, *, seed: int = 0, size: int = 40, fmt: str = "png") -> list[tuple[bytes, int]]:
    """``n`` encoded images of a coloured square on a dark background, label = colour index (of ``COLOURS``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(len(COLOURS))
        img = Image.new("RGB", (size, size + rng.randrange(0, 9)), (rng.randrange(0, 60),) * 3)
        x, y = rng.randrange(0, size // 2), rng.randrange(0, size // 2)
        img.paste(list(COLOURS.values())[label], (x, y, x + size // 2, y + size // 2))
        buf = io.BytesIO()
        img.save(buf, "PNG" if fmt == "png" else "JPEG", quality=90)
        out.append((buf.getvalue(), label))
    return out


def write_shards(folder: Path, samples: list[dict], sizes: list[int], prefix: str = "eval") -> str:
    """Write ``samples`` (dicts of member → bytes/str, without ``__key__``) into shards of the given sizes."""
    assert sum(sizes) == len(samples)
    folder.mkdir(parents=True, exist_ok=True)
    it = iter(enumerate(samples))
    for s, size in enumerate(sizes):
        with TarShardWriter(folder / f"{prefix}-{s:06d}.tar") as writer:
            for _ in range(size):
                i, sample = next(it)
                writer.write({"__key__": f"s{i:06d}", **sample})
    return str(folder / f"{prefix}-{{000000..{len(sizes) - 1:06d}}}.tar")


def write_labelled_shards(folder: Path, images: list[tuple[bytes, int]], sizes: list[int], fmt: str = "png") -> str:
    return write_shards(folder, [{fmt: data, "cls": str(label)} for data, label in images], sizes)


def write_image_folder(root: Path, images: list[tuple[bytes, int]], folders: list[str], fmt: str = "png") -> Path:
    """The same images as an ImageFolder tree: ``root/<folders[label]>/s<i>.<fmt>`` (sorted like the shards)."""
    for i, (data, label) in enumerate(images):
        d = root / folders[label]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"s{i:06d}.{fmt}").write_bytes(data)
    return root


def test_openai_templates_builtin():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in OPENAI_IMAGENET_TEMPLATES)
    assert resolve_templates("openai") == list(OPENAI_IMAGENET_TEMPLATES)
    assert fill_template("a {} in a video game.", "red circle") == "a red circle in a video game."


def test_templates_single_file_list_and_errors(tmp_path):
    assert resolve_templates("a photo of {}.") == ["a photo of {}."]
    assert resolve_templates(["a {}.", "the {}."]) == ["a {}.", "the {}."]
    f = tmp_path / "templates.txt"
    f.write_text("# prompts\na photo of a {}.\n\n  itap of a {}.  \n")
    assert resolve_templates(str(f)) == ["a photo of a {}.", "itap of a {}."]
    with pytest.raises(ValueError, match=r"neither 'openai'.*'a photo of a \{\}\.'"):
        resolve_templates("a photo")
    f.write_text("a photo\n")
    with pytest.raises(ValueError, match="every template needs"):
        resolve_templates(str(f))
    f.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="holds no template"):
        resolve_templates(str(f))


def test_image_folder_listing_labels_and_classnames(tmp_path):
    root = tmp_path / "folder"
    for name in ("b_cat", "a_dog"):
        (root / name / "sub").mkdir(parents=True)
    (root / "a_dog" / "2.png").write_bytes(b"x")
    (root / "a_dog" / "sub" / "1.JPG").write_bytes(b"x")
    (root / "b_cat" / "1.webp").write_bytes(b"x")
    (root / "b_cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    paths, labels, folders = list_image_folder(root)
    assert folders == ["a_dog", "b_cat"]
    assert [p.relative_to(root).as_posix() for p in paths] == ["a_dog/2.png", "a_dog/sub/1.JPG", "b_cat/1.webp"]
    assert labels == [0, 0, 1]
    assert resolve_classnames(str(root), None) == ["a dog", "b cat"]
    (root / "classnames.txt").write_text("dog\ncat\n")
    assert resolve_classnames(str(root), None) == ["dog", "cat"]
    assert resolve_classnames(str(root), ["x", "y"]) == ["x", "y"]


def test_numbered_folders_are_labels(tmp_path):
    root = tmp_path / "numbered"
    for name in ("10", "2", "0"):
        (root / name).mkdir(parents=True)
        (root / name / "a.png").write_bytes(b"x")
    paths, labels, folders = list_image_folder(root)
    assert sorted(zip([p.parent.name for p in paths], labels, strict=True)) == [("0", 0), ("10", 10), ("2", 2)]
    assert folders[2] == "2" and folders[10] == "10" and folders[1] == ""
    with pytest.raises(ValueError, match=r"numbered class folders and no classnames\.txt"):
        resolve_classnames(str(root), None)
    transform = build_image_transform(8, train=False)
    with pytest.raises(ValueError, match="labels up to 10 but the class names list only 3"):
        open_eval_data(str(root), image_transform=transform, batch_size=2, classnames=["a", "b", "c"])


def test_folder_and_shard_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    transform = build_image_transform(8, train=False)
    with pytest.raises(FileNotFoundError, match="neither class sub-folders nor"):
        open_eval_data(str(tmp_path / "empty"), image_transform=transform, batch_size=2)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        open_eval_data(str(tmp_path / "x-{000..003}.tar"), image_transform=transform, batch_size=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_classnames(str(tmp_path / "empty"), str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("sizes", [[5, 17, 2, 11, 8], [None, None, None], [3]])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_split_contiguous_covers_everything_in_order(sizes, parts):
    pieces = [ShardPiece(f"s{i}", i, 0, n) for i, n in enumerate(sizes)]
    slices = [split_contiguous(pieces, parts, p) for p in range(parts)]
    if None in sizes:
        assert [piece for s in slices for piece in s] == pieces
        return
    flat = [(piece.shard_pos, r) for s in slices for piece in s for r in range(piece.start, piece.stop)]
    assert flat == [(i, r) for i, n in enumerate(sizes) for r in range(n)]
    lengths = [sum(piece.size for piece in s) for s in slices]
    assert max(lengths) - min(lengths) <= 1
    folder = split_contiguous([FolderPiece(0, 7)], parts, parts - 1)
    assert folder[-1].stop == 7


def read_all(spec, *, rank=0, world=1, workers=0, batch=3, **kw):
    data = open_eval_data(
        spec,
        image_transform=build_image_transform(16, train=False),
        batch_size=batch,
        num_workers=workers,
        rank=rank,
        world_size=world,
        **kw,
    )
    batches = list(data.loader)
    return data, batches


def test_rank_slices_and_workers_reassemble_the_input(tmp_path):
    images = make_images(43, seed=3)
    spec = write_labelled_shards(tmp_path / "shards", images, [5, 17, 2, 11, 8])
    _, whole = read_all(spec, classnames=list(COLOURS))
    keys = [k for b in whole for k in b["key"]]
    assert keys == [f"s{i:06d}" for i in range(43)]
    assert torch.equal(torch.cat([b["label"] for b in whole]), torch.tensor([label for _, label in images]))
    for world in (2, 3):
        for workers in (0, 2):
            parts = [
                read_all(spec, rank=r, world=world, workers=workers, classnames=list(COLOURS)) for r in range(world)
            ]
            index = torch.cat([b["index"] for _, batches in parts for b in batches])
            got = [k for _, batches in parts for b in batches for k in b["key"]]
            order = torch.argsort(index).tolist()
            assert [got[i] for i in order] == keys
            assert all(d.num_local in (43 // world, 43 // world + 1) for d, _ in parts)
            image = torch.cat([b["image"] for _, batches in parts for b in batches])[order]
            assert torch.equal(image, torch.cat([b["image"] for b in whole]))


def test_bad_samples_are_skipped_and_counted(tmp_path):
    good = make_images(4, seed=1)
    samples = [
        {"png": good[0][0], "cls": "0"},
        {"png": b"this is not an image", "cls": "1"},
        {"png": good[1][0], "cls": "seven"},
        {"png": good[2][0], "cls": "9"},  # outside the 4 class names
        {"png": good[3][0], "cls": "3", "pyd": b"\x80\x04 never unpickled"},
        {"txt": "no image at all", "cls": "2"},
    ]
    spec = write_shards(tmp_path / "bad", samples, [6])
    data, batches = read_all(spec, classnames=list(COLOURS))
    assert [k for b in batches for k in b["key"]] == ["s000000", "s000004"]
    counts = data.skips.counts()
    assert counts == {"bad_label": 2, "decode_error": 1, "missing_image": 1, "unsafe_member": 1}


def test_caption_sources_for_retrieval(tmp_path):
    imgs = make_images(3, seed=2)
    samples = [
        {"png": imgs[0][0], "json": json.dumps({"captions": ["a red thing", "something red"]}), "txt": "ignored"},
        {"png": imgs[1][0], "txt": "only a txt caption"},
        {"png": imgs[2][0], "json": json.dumps({"captions": "one string"})},
    ]
    spec = write_shards(tmp_path / "caps", samples, [3])
    _, batches = read_all(spec, labels=False, captions="auto")
    assert [c for b in batches for c in b["captions"]] == [
        ["a red thing", "something red"],
        ["only a txt caption"],
        ["one string"],
    ]
    data, batches = read_all(spec, labels=False, captions="txt")
    assert [c for b in batches for c in b["captions"]] == [["ignored"], ["only a txt caption"]]
    assert data.skips.counts() == {"missing_caption": 1}
    with pytest.raises(ValueError, match="caption_key='json' is not understood"):
        read_all(spec, labels=False, captions="json")
