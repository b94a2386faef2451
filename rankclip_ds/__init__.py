"""RankCLIP-DS: DeepSpeed pretraining of RankCLIP dual encoders (contrastive + list-wise ranking consistency).

The libraries (``config``, ``model``, ``losses``, ``data``, ``evaluate``) take plain arguments and never import the
trainer, the pre-flight or the entry point; ``rankclip_ds/train.py`` is the entry point (docs/architecture.md).
"""

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Load an exported model without DeepSpeed (see :func:`rankclip_ds.export.load_model`)."""
    from .export import load_model as _load

    return _load(path, **kwargs)
