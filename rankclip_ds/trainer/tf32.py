"""TensorFloat-32 for float32 matrix multiplications and convolutions on CUDA devices (``run.tf32``).

Which API: PyTorch 2.9 added per-backend ``fp32_precision`` properties (``torch.backends.cuda.matmul.fp32_precision
= "tf32"``) and recommends them over ``allow_tf32``. In PyTorch 2.14.1 setting only the new per-backend property
leaves the process-wide getters in a "mixed" state that raises ``RuntimeError`` when read:
``torch.get_float32_matmul_precision()`` (which inductor calls when it autotunes matmuls for ``model.compile``) and
``torch.backends.cuda.matmul.allow_tf32``. ``torch.set_float32_matmul_precision`` writes the new property and
keeps every getter consistent (``"high"`` reads back as ``fp32_precision == "tf32"``, ``allow_tf32 == True``), and
so does ``torch.backends.cudnn.allow_tf32`` for convolutions (the patch embedding; all of a ResNet). Both are set
only for a CUDA device: on the CPU ``set_float32_matmul_precision`` would also switch oneDNN's matmuls to TF32/bf16
emulation where the CPU has it.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["set_tf32"]

log = logging.getLogger("rankclip_ds.train")


def set_tf32(device: torch.device | str, enabled: bool) -> bool:
    """On a CUDA ``device``: TF32 on (``enabled``) or off for float32 matmuls and cuDNN convolutions, process-wide.
    Elsewhere nothing is touched. Returns whether anything was set."""
    if torch.device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    log.info("TF32 for float32 matmuls and cuDNN convolutions: %s (run.tf32)", "on" if enabled else "off")
    return True
