"""WebDataset data pipeline: shard sources, whitelisted decoding, epoch/resampled streams, transforms.

See ``docs/data.md``. The trainer calls :func:`build_train_loader`, :func:`build_image_transform` and
:func:`data_config_from_timm`; evaluation data (labelled and caption shards, ImageFolder) is read by
:mod:`rankclip_ds.evaluate.datasets` with the same whitelisted record reader.
"""

from rankclip_ds.data.loader import TrainLoader, build_train_loader
from rankclip_ds.data.skips import REASONS as SKIP_REASONS
from rankclip_ds.data.sources import parse_spec
from rankclip_ds.data.transforms import ImageTransform, build_image_transform, data_config_from_timm

__all__ = [
    "SKIP_REASONS",
    "ImageTransform",
    "TrainLoader",
    "build_image_transform",
    "build_train_loader",
    "data_config_from_timm",
    "parse_spec",
]
