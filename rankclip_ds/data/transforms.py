"""Image transforms: random resized crop for training, resize + centre crop for evaluation.

An :class:`ImageTransform` maps a PIL RGB image to a ``uint8`` array (H, W, 3) (:meth:`ImageTransform.to_array`)
and turns a list of them into a normalised float32 batch at once (:meth:`ImageTransform.collate`): one vectorised
conversion per batch is much cheaper than ``ToTensor`` + ``Normalize`` per image. Calling the object does both for
one image and returns float32 (3, H, W).
Horizontal flips are off by default because captions may say "left" or "right".
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTransform:
    """See the module doc. ``rng`` (a ``random.Random``) makes the random crops reproducible; default: module random."""

    def __init__(
        self,
        image_size: int | tuple[int, int],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = False,
        interpolation: str = "bicubic",
        crop_pct: float = 1.0,
    ):
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size={image_size!r} must be a positive int or (height, width)")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale={scale!r} must satisfy 0 < min <= max <= 1 (fractions of the image area)")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean={mean!r} and std={std!r} must have 3 entries, std positive")
        self.size = size  # (H, W)
        self.train, self.scale, self.ratio, self.hflip = train, tuple(scale), tuple(ratio), hflip
        self.crop_pct = crop_pct
        self.resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.rng: random.Random | random.Random = random.Random()
        # the smallest short side worth decoding (lets JPEG decoding downscale by 2/4/8 for free)
        self.decode_min_size = math.ceil(max(size) / math.sqrt(scale[0]) if train else max(size) / crop_pct)

    def _crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * self.rng.uniform(*self.scale)
            aspect = math.exp(self.rng.uniform(*log_ratio))
            w = math.sqrt(target * aspect)
            h = math.sqrt(target / aspect)
            if w <= width and h <= height:
                x = self.rng.uniform(0, width - w)
                y = self.rng.uniform(0, height - h)
                return x, y, x + w, y + h
        # fall back to a centre crop with the aspect ratio clamped into range
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, width / self.ratio[0]
        elif in_ratio > self.ratio[1]:
            w, h = height * self.ratio[1], height
        else:
            w, h = width, height
        x, y = (width - w) / 2, (height - h) / 2
        return x, y, x + w, y + h

    def _eval_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        # resize the short side to size/crop_pct then centre crop `size`: expressed as one box in source pixels
        out_h, out_w = self.size
        scale = max(out_h, out_w) / self.crop_pct / min(width, height)
        w, h = out_w / scale, out_h / scale
        x, y = (width - w) / 2, (height - h) / 2
        return x, y, x + w, y + h

    def to_array(self, img: Image.Image) -> np.ndarray:
        """PIL image → uint8 array (H, W, 3): the crop and the resize are one PIL call."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        box = self._crop_box(*img.size) if self.train else self._eval_box(*img.size)
        out_h, out_w = self.size
        reducing_gap = 3.0 if (box[2] - box[0]) > 3 * out_w else None  # fast integer pre-reduction for large images
        img = img.resize((out_w, out_h), self.resample, box=box, reducing_gap=reducing_gap)
        if self.train and self.hflip and self.rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(img, dtype=np.uint8)

    def collate(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 arrays (H, W, 3) → normalised float32 (B, 3, H, W), contiguous.

        One transpose of the uint8 batch and one in-place normalisation: ~15x cheaper than stacking per-image
        permuted tensors and normalising each image."""
        batch = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
        return self.normalize(torch.from_numpy(batch))

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """PIL image → uint8 tensor (3, H, W)."""
        return torch.from_numpy(np.ascontiguousarray(self.to_array(img).transpose(2, 0, 1)))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → float32 normalised with mean/std."""
        return batch.float().sub_(self.mean).mul_(self.inv_std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.collate([self.to_array(img)])[0]

    def __repr__(self) -> str:
        kind = f"train scale={self.scale} hflip={self.hflip}" if self.train else f"eval crop_pct={self.crop_pct}"
        return f"ImageTransform(size={self.size}, {kind})"


def build_image_transform(
    image_size: int | tuple[int, int],
    *,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    train: bool,
    scale: tuple[float, float] = (0.9, 1.0),
    hflip: bool = False,
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
) -> ImageTransform:
    """Train: random resized crop (area fraction ``scale``), optional horizontal flip. Eval: resize the short side
    to ``image_size / crop_pct`` and centre crop. Both output normalised float32 (3, H, W) when called."""
    return ImageTransform(
        image_size,
        mean=mean,
        std=std,
        train=train,
        scale=scale,
        hflip=hflip,
        interpolation=interpolation,
        crop_pct=crop_pct,
    )


def data_config_from_timm(model) -> dict:
    """``{"image_size", "mean", "std", "interpolation", "crop_pct"}`` from a timm model's data config
    (``timm.data.resolve_data_config``), ready to be passed to :func:`build_image_transform` as keyword arguments."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    _, height, width = cfg["input_size"]
    interpolation = cfg.get("interpolation", "bicubic")
    return {
        "image_size": (height, width),
        "mean": tuple(float(m) for m in cfg["mean"]),
        "std": tuple(float(s) for s in cfg["std"]),
        "interpolation": interpolation if interpolation in ("bicubic", "bilinear") else "bicubic",
        "crop_pct": float(cfg.get("crop_pct", 1.0) or 1.0),
    }
