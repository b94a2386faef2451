"""Image transforms: shapes, normalisation, eval determinism, timm data config."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from rankclip_ds.data import build_image_transform, data_config_from_timm


def test_train_and_eval_shapes_and_normalisation():
    img = Image.fromarray(np.full((50, 80, 3), 128, np.uint8))
    train = build_image_transform(32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train=True)
    train.rng = random.Random(0)
    x = train(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-5)
    ev = build_image_transform((24, 40), train=False)
    a, b = ev.to_uint8(img), ev.to_uint8(img)
    assert a.shape == (3, 24, 40) and a.dtype == torch.uint8 and torch.equal(a, b)


def test_flip_is_off_by_default_and_left_stays_left():
    array = np.zeros((64, 64, 3), np.uint8)
    array[:, :20] = 255  # white on the left
    tf = build_image_transform(32, train=True, scale=(0.9, 1.0))
    for seed in range(20):
        tf.rng = random.Random(seed)
        out = tf.to_uint8(Image.fromarray(array)).float()
        assert out[:, :, :8].mean() > out[:, :, -8:].mean()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="scale"):
        build_image_transform(32, train=True, scale=(0.0, 1.0))


def test_data_config_from_timm():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    cfg = data_config_from_timm(model)
    assert cfg["image_size"] == (224, 224)
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    tf = build_image_transform(**{k: cfg[k] for k in ("image_size", "mean", "std")}, train=False)
    assert tf(Image.new("RGB", (300, 260))).shape == (3, 224, 224)
