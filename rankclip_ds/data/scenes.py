"""A many-to-many benchmark: scenes of several objects, captions of part of a scene, relevance by shared facts.

A scene has one to four *objects* on a plain dark background. An object is a shape (6) in a colour (8) with a
size (small/large), a count (one to three instances, "two red circles" is drawn as two red circles) and a position:
each object owns one of five regions, ``left`` and ``right`` (the outer columns), ``top``, ``centre`` and
``bottom`` (the middle column, cut in three). Shapes are distinct within a scene, so "two circles" means that the
image shows exactly two circles. A caption describes one or two of the objects and names the shape plus a random
subset (at least one) of colour, size, count and position, in a few phrasings ("two red circles on the left",
"a picture of a large square in blue and a star", ...).

**Facts.** Each object contributes seven short strings (``FACT_KINDS``): its colour (``"red"``), shape
(``"circle"``) and position (``"left"``), and the shape bound to each other attribute: ``"red circle"``,
``"large circle"``, ``"two circles"``, ``"left circle"``. ``image_facts`` is the union over the scene's objects,
``caption_facts`` the facts the caption states (always a subset: it states the shape, and for each attribute it
names, the attribute and its binding). The graded relevance of two items is the number of facts they share. Single
attributes give partial credit ("a red square" and an image of a red circle share ``"red"``); bound facts reward
the right combination (only an image with a *red circle* shares ``"red circle"``), so relevance grows with how much
of one item the other really matches, and a caption's own image shares all of its facts (the maximum any image
can). Unbound size and count words ("large", "two") are not facts: alone they say almost nothing about a scene.

**Held-out combinations.** The colour × shape pairs of ``synthetic.HELD_OUT`` (8 pairs, each colour once) never
appear in train or eval images, hence never in their captions or facts. The zero-shot split shows one instance of
one held-out pair per image (class ``index % 8``, balanced), with ``.cls`` labels into ``classnames.txt`` and the
demo's prompt templates.

Everything is deterministic: sample ``i`` of a split is drawn from ``random.Random(derive_seed(seed, split, i))``
(integers only, never ``hash``); tar members have fixed metadata; ``info.json`` uses relative paths.
"""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw

from rankclip_ds.data.plan import derive_seed
from rankclip_ds.data.synthetic import (
    COLOURS,
    HELD_OUT,
    PLURAL,
    SHAPES,
    ZEROSHOT_TEMPLATES,
    draw_shape,
    encode,
    write_split,
)

# region -> box (x0, y0, x1, y1) as fractions of the image side; the boxes tile the image without overlap
REGIONS = {
    "left": (0.0, 0.0, 0.3, 1.0),
    "right": (0.7, 0.0, 1.0, 1.0),
    "top": (0.3, 0.0, 0.7, 0.3),
    "centre": (0.3, 0.3, 0.7, 0.7),
    "bottom": (0.3, 0.7, 0.7, 1.0),
}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "centre": "in the centre"}  # fmt: skip
RADIUS = {"small": 0.065, "large": 0.095}  # fraction of the image side; every region holds two of either size
SLOT = 2.1  # an instance's grid cell is at least SLOT × radius wide and high, so instances never touch
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
FACT_KINDS = ("colour", "shape", "position", "colour shape", "size shape", "count shape", "position shape")
SPLIT_TRAIN, SPLIT_EVAL, SPLIT_ZEROSHOT = 11, 12, 13
ONE_OBJECT = ("{a}", "a picture of {a}", "{there} {a}", "an image showing {a}")
TWO_OBJECTS = ("{a} and {b}", "a picture of {a} and {b}", "{a} together with {b}", "an image showing {a} and {b}")


def region_grid(region: str, size: str) -> tuple[int, int]:
    """(columns, rows) of instance cells that fit in ``region`` for objects of ``size``."""
    x0, y0, x1, y1 = REGIONS[region]
    cell = SLOT * RADIUS[size]
    return int((x1 - x0) / cell), int((y1 - y0) / cell)


def sample_objects(rng: random.Random, zeroshot_class: int | None = None) -> list[dict]:
    """1–4 objects with distinct shapes and regions, no held-out pair; one of ``HELD_OUT[zeroshot_class]`` if given."""
    if zeroshot_class is not None:
        colour, shape = HELD_OUT[zeroshot_class]
        return [{"colour": colour, "shape": shape, "size": rng.choice(("small", "large")), "count": 1,
                 "position": rng.choice(tuple(REGIONS))}]  # fmt: skip
    n = rng.choices((1, 2, 3, 4), weights=(0.25, 0.3, 0.25, 0.2))[0]
    objects = []
    for shape, region in zip(rng.sample(SHAPES, n), rng.sample(tuple(REGIONS), n), strict=True):
        colours = [c for c in COLOURS if (c, shape) not in HELD_OUT]
        size = rng.choice(("small", "large"))
        cols, rows = region_grid(region, size)
        most = min(3, cols * rows)
        count = rng.choices(range(1, most + 1), weights=(0.55, 0.3, 0.15)[:most])[0]
        objects.append({"colour": rng.choice(colours), "shape": shape, "size": size, "count": count,
                        "position": region})  # fmt: skip
    return sorted(objects, key=lambda o: SHAPES.index(o["shape"]))


def draw_objects(objects: list[dict], background: int, image_size: int, rng: random.Random) -> Image.Image:
    """Each object's instances in distinct random cells of its region's grid, jittered inside their cell."""
    n = image_size
    img = Image.new("RGB", (n, n), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        x0, y0, x1, y1 = REGIONS[obj["position"]]
        cols, rows = region_grid(obj["position"], obj["size"])
        cw, ch, radius = (x1 - x0) / cols, (y1 - y0) / rows, RADIUS[obj["size"]]
        for cell in rng.sample(range(cols * rows), obj["count"]):
            cx = x0 + (cell % cols + 0.5) * cw + rng.uniform(-1, 1) * (cw / 2 - radius)
            cy = y0 + (cell // cols + 0.5) * ch + rng.uniform(-1, 1) * (ch / 2 - radius)
            draw_shape(draw, obj["shape"], cx * n, cy * n, radius * n, COLOURS[obj["colour"]])
    return img


def object_facts(obj: dict, kinds=FACT_KINDS) -> list[str]:
    """The facts of ``kinds`` about one object (see the module docstring)."""
    shape, count = obj["shape"], obj["count"]
    every = {
        "colour": obj["colour"],
        "shape": shape,
        "position": obj["position"],
        "colour shape": f"{obj['colour']} {shape}",
        "size shape": f"{obj['size']} {shape}",
        "count shape": f"{COUNT_WORDS[count]} {shape if count == 1 else PLURAL[shape]}",
        "position shape": f"{obj['position']} {shape}",
    }
    return [every[k] for k in kinds]


def image_facts(objects: list[dict]) -> list[str]:
    return sorted({f for obj in objects for f in object_facts(obj)})


def describe(obj: dict, rng: random.Random) -> tuple[str, list[str]]:
    """A noun phrase for one object naming its shape and some of its attributes, and the facts it states."""
    said = [a for a, p in (("colour", 0.75), ("size", 0.35), ("count", 0.5), ("position", 0.45)) if rng.random() < p]
    said = said or ["colour"]
    plural = obj["count"] > 1
    det = COUNT_WORDS[obj["count"]] if "count" in said else ("some" if plural else "a")
    noun = PLURAL[obj["shape"]] if plural else obj["shape"]
    size = obj["size"] + " " if "size" in said else ""
    where = " " + WHERE[obj["position"]] if "position" in said else ""
    if "colour" in said and rng.random() < 0.7:
        phrase = f"{det} {size}{obj['colour']} {noun}{where}"
    elif "colour" in said:
        phrase = f"{det} {size}{noun} in {obj['colour']}{where}"
    else:
        phrase = f"{det} {size}{noun}{where}"
    kinds = ["shape"] + [k for a in said for k in {"colour": ("colour", "colour shape"), "size": ("size shape",),
                         "count": ("count shape",), "position": ("position", "position shape")}[a]]  # fmt: skip
    return phrase, object_facts(obj, kinds)


def caption_for(objects: list[dict], rng: random.Random) -> tuple[str, list[str]]:
    """A caption of one object, or of two when the scene has them (40 %), and the sorted facts it states."""
    chosen = rng.sample(objects, 2 if len(objects) > 1 and rng.random() < 0.4 else 1)
    phrases, facts = zip(*(describe(obj, rng) for obj in chosen), strict=True)
    if len(chosen) == 1:
        there = "there are" if chosen[0]["count"] > 1 else "there is"
        text = rng.choice(ONE_OBJECT).format(a=phrases[0], there=there)
    else:
        text = rng.choice(TWO_OBJECTS).format(a=phrases[0], b=phrases[1])
    return text, sorted({f for fs in facts for f in fs})


def make_scene_sample(split: int, index: int, *, seed: int, image_size: int = 64, quality: int = 90) -> dict:
    """Sample ``index`` of a split as a WebDataset sample dict (deterministic in (seed, split, index))."""
    rng = random.Random(derive_seed(seed, split, index))
    objects = sample_objects(rng, index % len(HELD_OUT) if split == SPLIT_ZEROSHOT else None)
    background = rng.randrange(0, 70)
    img = draw_objects(objects, background, image_size, rng)
    text, said = caption_for(objects, rng)
    meta = {"image_facts": image_facts(objects), "caption_facts": said, "objects": objects, "background": background}
    prefix = {SPLIT_TRAIN: "train", SPLIT_EVAL: "eval", SPLIT_ZEROSHOT: "zs"}[split]
    sample = {"__key__": f"{prefix}{index:08d}", "jpg": encode(img, "jpg", quality), "txt": text,
              "json": json.dumps(meta, sort_keys=True)}  # fmt: skip
    if split == SPLIT_ZEROSHOT:
        sample["cls"] = str(HELD_OUT.index((objects[0]["colour"], objects[0]["shape"])))
    return sample


def classnames() -> list[str]:
    return [f"{c} {s}" for c, s in HELD_OUT]


def _spec(folder: str, prefix: str, shards: dict[str, int]) -> str:
    return f"{folder}/{prefix}-{{000000..{len(shards) - 1:06d}}}.tar"


def write_scene_dataset(
    out: Path,
    *,
    num_train: int,
    num_eval: int,
    image_size: int = 64,
    samples_per_shard: int = 1000,
    seed: int = 0,
    num_zeroshot: int = 800,
) -> dict:
    """Writes ``train/``, ``eval/`` and ``zeroshot/`` shards (+ manifests, classnames, templates) and ``info.json``.

    Returns the contents of ``info.json``: shard specs as brace expressions relative to ``out``, the counts, the
    held-out pairs, the fact kinds, the seed and the image size.
    """
    for name, value in (("num_train", num_train), ("num_eval", num_eval), ("num_zeroshot", num_zeroshot)):
        if value < 1:
            raise ValueError(f"{name}={value}: every split needs at least one sample")
    out = Path(out)
    kw = {"seed": seed, "image_size": image_size}
    splits = (("train", "scenes-train", SPLIT_TRAIN, num_train), ("eval", "scenes-eval", SPLIT_EVAL, num_eval),
              ("zeroshot", "scenes-zs", SPLIT_ZEROSHOT, num_zeroshot))  # fmt: skip
    specs = {}
    for folder, prefix, split, count in splits:
        shards = write_split(out / folder, prefix, count, samples_per_shard, partial(make_scene_sample, split, **kw))
        specs[f"{folder}_spec"] = _spec(folder, prefix, shards)
    (out / "zeroshot" / "classnames.txt").write_text("\n".join(classnames()) + "\n")
    (out / "zeroshot" / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    info = {
        **specs,
        "classnames": "zeroshot/classnames.txt",
        "templates": "zeroshot/templates.txt",
        "num_train": num_train,
        "num_eval": num_eval,
        "num_zeroshot": num_zeroshot,
        "held_out": classnames(),
        "fact_kinds": list(FACT_KINDS),
        "seed": seed,
        "image_size": image_size,
    }
    (out / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    return info
