"""The embedded default dataset: procedurally drawn scenes of coloured shapes with captions in several phrasings.

Each training image shows one to three copies of one object — a colour × shape pair with a size — on a plain dark
background, at a position (left, right, top, bottom, middle) when it is alone. Captions name some of the attributes
(colour, shape, size, position, count) with one of several phrasings, so many captions share attributes and
several images fit one caption: the many-to-many structure RankCLIP's list-wise ranking is about.

Zero-shot evaluation uses *unseen combinations*: ``HELD_OUT`` colour × shape pairs never drawn in training (each
colour held out once, each shape at most twice, so every single attribute is well represented in training). The
zero-shot shards carry ``.cls`` labels into ``classnames.txt`` (``"red circle"`` …), with prompt templates in
``templates.txt``; chance level is ``1 / len(HELD_OUT)``.

Everything is deterministic: sample ``i`` of split ``s`` is drawn from ``random.Random`` seeded by
``derive_seed(seed, s, i)``, so shards can be written in parallel or in pieces and always come out identical.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw

from rankclip_ds.data.plan import derive_seed
from rankclip_ds.data.shard_writer import ShardSink

logger = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
PLURAL = {s: s + "es" if s.endswith("s") else s + "s" for s in SHAPES}
HELD_OUT = tuple((c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOURS))  # 8 unseen colour×shape pairs
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "middle": (0.5, 0.5)}
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SPLIT_TRAIN, SPLIT_ZEROSHOT = 1, 2
_PATH_KEYS = ("train_spec", "zeroshot_spec", "classnames", "templates")
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a {}.", "there is a {} in the picture.")

SINGLE_PHRASINGS = (
    "a {size} {colour} {shape} {where}",
    "a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a {size} {shape} that is {colour}",
    "there is a {colour} {shape} {where}",
    "one {colour} {shape}",
    "a {shape} coloured {colour}",
    "a photo of a {size} {colour} {shape}",
)
MULTI_PHRASINGS = (
    "{count} {colour} {shapes}",
    "a picture of {count} {colour} {shapes}",
    "{count} small {shapes}, all {colour}",
    "several {colour} {shapes}",
    "there are {count} {shapes} in {colour}",
)


@dataclass
class Scene:
    colour: str
    shape: str
    size: str  # "small" | "large"
    position: str | None  # None when count > 1
    count: int
    background: int  # grey level of the plain background


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.7), (cx - r * 0.95, cy + r * 0.7)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "cross":
        t = r * 0.35
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]  # fmt: skip
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def draw_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Renders a scene (big, clear objects on a plain background)."""
    n = image_size
    img = Image.new("RGB", (n, n), (scene.background,) * 3)
    draw = ImageDraw.Draw(img)
    colour = COLOURS[scene.colour]
    if scene.count == 1:
        radius = n * (rng.uniform(0.26, 0.32) if scene.size == "large" else rng.uniform(0.13, 0.17))
        fx, fy = POSITIONS[scene.position or "middle"]
        margin = radius + 1
        cx = min(max(fx * n + rng.uniform(-0.05, 0.05) * n, margin), n - margin)
        cy = min(max(fy * n + rng.uniform(-0.05, 0.05) * n, margin), n - margin)
        centres = [(cx, cy)]
    else:
        radius = n * rng.uniform(0.12, 0.15)
        centres = []
        for _ in range(200):  # rejection sampling of non-overlapping centres
            c = (rng.uniform(radius + 1, n - radius - 1), rng.uniform(radius + 1, n - radius - 1))
            if all((c[0] - d[0]) ** 2 + (c[1] - d[1]) ** 2 > (2.2 * radius) ** 2 for d in centres):
                centres.append(c)
                if len(centres) == scene.count:
                    break
    for cx, cy in centres:
        draw_shape(draw, scene.shape, cx, cy, radius, colour)
    return img


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, fill) -> None:
    """Draws one filled ``shape`` centred at (cx, cy) that fits in a circle of ``radius`` (also used by scenes.py)."""
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius), fill=fill)


def sample_scene(rng: random.Random, pairs: list[tuple[str, str]], allow_multi: bool = True) -> Scene:
    colour, shape = pairs[rng.randrange(len(pairs))]
    count = rng.choices((1, 2, 3), weights=(0.6, 0.25, 0.15))[0] if allow_multi else 1
    size = rng.choice(("small", "large")) if count == 1 else "small"
    position = rng.choice(tuple(POSITIONS)) if count == 1 else None
    return Scene(colour, shape, size, position, count, background=rng.randrange(0, 70))


def caption_for(scene: Scene, rng: random.Random) -> str:
    words = {
        "colour": scene.colour,
        "shape": scene.shape,
        "shapes": PLURAL[scene.shape],
        "size": scene.size,
        "where": WHERE.get(scene.position or "middle"),
        "count": COUNT_WORDS[scene.count],
    }
    phrasings = SINGLE_PHRASINGS if scene.count == 1 else MULTI_PHRASINGS
    return rng.choice(phrasings).format(**words)


def train_pairs() -> list[tuple[str, str]]:
    held = set(HELD_OUT)
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]


def classnames() -> list[str]:
    return [f"{c} {s}" for c, s in HELD_OUT]


def encode(img: Image.Image, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def make_sample(
    split: int, index: int, *, seed: int, image_size: int = 64, image_format: str = "jpg", quality: int = 90
) -> dict:
    """Sample ``index`` of a split as a WebDataset sample dict (deterministic in (seed, split, index))."""
    rng = random.Random(derive_seed(seed, split, index))
    if split == SPLIT_TRAIN:
        scene = sample_scene(rng, train_pairs())
    else:
        scene = sample_scene(rng, list(HELD_OUT), allow_multi=False)
    img = draw_scene(scene, image_size, rng)
    sample = {"__key__": f"{'train' if split == SPLIT_TRAIN else 'zs'}{index:08d}",
              image_format: encode(img, image_format, quality),
              "txt": caption_for(scene, rng),
              "json": json.dumps(asdict(scene), sort_keys=True)}  # fmt: skip
    if split != SPLIT_TRAIN:
        sample["cls"] = str(HELD_OUT.index((scene.colour, scene.shape)))
    return sample


def write_split(
    out: Path, prefix: str, count: int, samples_per_shard: int, make: Callable[[int], dict]
) -> dict[str, int]:
    """Writes samples ``make(0) … make(count - 1)`` as ``out/{prefix}-NNNNNN.tar`` + ``_manifest.json``."""
    with ShardSink(out, prefix, samples_per_shard) as sink:
        for i in range(count):
            sink.write(make(i))
    manifest = {"shards": sink.shard_counts, "total": count}
    (out / "_manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return sink.shard_counts


def write_synthetic_dataset(
    output_dir: str | Path,
    *,
    num_train: int = 20_000,
    num_zeroshot: int = 800,
    image_size: int = 64,
    samples_per_shard: int = 1000,
    seed: int = 0,
    image_format: str = "jpg",
    quality: int = 90,
) -> dict:
    """Writes ``train/`` and ``zeroshot/`` shards (+ manifests, classnames.txt, templates.txt, info.json).

    Returns a summary with the train spec, the zero-shot spec and files, and the measured samples/s.
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format={image_format!r}: use 'jpg' or 'png'")
    out = Path(output_dir)
    kw = {"seed": seed, "image_size": image_size, "image_format": image_format, "quality": quality}
    start = time.perf_counter()
    train = write_split(
        out / "train", "synth-train", num_train, samples_per_shard, partial(make_sample, SPLIT_TRAIN, **kw)
    )
    zs = write_split(
        out / "zeroshot", "synth-zs", num_zeroshot, samples_per_shard, partial(make_sample, SPLIT_ZEROSHOT, **kw)
    )
    elapsed = time.perf_counter() - start
    (out / "zeroshot" / "classnames.txt").write_text("\n".join(classnames()) + "\n")
    (out / "zeroshot" / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    summary = {
        "train_spec": str(out / "train" / f"synth-train-{{000000..{len(train) - 1:06d}}}.tar"),
        "zeroshot_spec": str(out / "zeroshot" / f"synth-zs-{{000000..{len(zs) - 1:06d}}}.tar"),
        "classnames": str(out / "zeroshot" / "classnames.txt"),
        "templates": str(out / "zeroshot" / "templates.txt"),
        "num_train": num_train,
        "num_zeroshot": num_zeroshot,
        "held_out": [f"{c} {s}" for c, s in HELD_OUT],
        "seed": seed,
        "image_size": image_size,
        "samples_per_second": round((num_train + num_zeroshot) / max(elapsed, 1e-9), 1),
    }
    # paths relative to the output folder, so that identical arguments give identical files wherever they are written
    info = {k: (str(Path(v).relative_to(out)) if k in _PATH_KEYS else v) for k, v in summary.items()}
    info.pop("samples_per_second")
    (out / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    return summary
