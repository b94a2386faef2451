"""The one typed configuration of a RankCLIP-DS run.

Precedence: dataclass defaults < YAML file (``--config FILE``) < ``--section.key value`` command-line overrides.
Every field carries a docstring (the string literal below it); every section validates itself in ``__post_init__``,
and :func:`load_config` turns a mistake into a :class:`ConfigError` that names the dotted key, the bad value and
the fix. Unknown keys are errors that suggest the nearest valid key.

Batch sizes live only here. The DeepSpeed JSON's batch fields are derived from this config by
:func:`rankclip_ds.ds_config.build_deepspeed_config`, and a JSON that sets them differently is rejected.
"""

from .batch import BatchSizes, resolve_batch
from .loading import (
    config_from_dict,
    config_to_dict,
    describe_fields,
    dump_config,
    field_docs,
    load_config,
    parse_overrides,
    save_config,
    section_from_dict,
)
from .sections import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DistConfig,
    EvalConfig,
    ImageTowerConfig,
    LockConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TextTowerConfig,
)

__all__ = [
    "BatchSizes",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "EvalConfig",
    "ImageTowerConfig",
    "LockConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TextTowerConfig",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "dump_config",
    "field_docs",
    "load_config",
    "parse_overrides",
    "resolve_batch",
    "save_config",
    "section_from_dict",
]
