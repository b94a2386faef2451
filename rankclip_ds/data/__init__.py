"""WebDataset data pipeline: shard sources, whitelisted decoding, epoch/resampled streams, transforms, eval shards.

See ``docs/data.md``. The trainer calls :func:`build_train_loader`, :func:`build_image_transform`,
:func:`data_config_from_timm` and :func:`build_eval_loader`.
"""

from rankclip_ds.data.eval import build_eval_loader, load_classnames, load_templates
from rankclip_ds.data.loader import TrainLoader, build_train_loader
from rankclip_ds.data.skips import REASONS as SKIP_REASONS
from rankclip_ds.data.sources import parse_spec
from rankclip_ds.data.transforms import ImageTransform, build_image_transform, data_config_from_timm

__all__ = [
    "SKIP_REASONS",
    "ImageTransform",
    "TrainLoader",
    "build_eval_loader",
    "build_image_transform",
    "build_train_loader",
    "data_config_from_timm",
    "load_classnames",
    "load_templates",
    "parse_spec",
]
