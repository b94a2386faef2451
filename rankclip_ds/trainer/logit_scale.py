"""The logit-scale clamp, applied where the optimizer keeps the parameter.

``model.max_logit_scale`` bounds ``s = exp(logit_scale)``.  The loss clamps the value it uses; this module keeps the
*parameter* from drifting past the bound, which is the part DeepSpeed makes subtle: ZeRO stages 1-3 (and the bf16
optimizer) update an fp32 **master** copy and copy it back over the module's parameter after every step, so a clamp
of the module's parameter alone is overwritten at the next step while the master keeps climbing (Adam's momentum
keeps moving a parameter whose gradient the clamp has zeroed).  The export, consolidated from the master, then holds
the unclamped value.  So the clamp is applied to both copies, locally on each rank (a clamp is elementwise: each
rank clamps the part it holds, and no communication is needed):

* ZeRO-1/2 and the bf16 optimizer: this rank's fragment of the flat fp32 partition that holds the parameter
  (``param._hp_mapping``, what DeepSpeed's ``safe_set_full_fp32_param`` writes), and the module's full copy;
* ZeRO-3: this rank's partition of the fp32 master (``deepspeed.utils.safe_get/set_local_fp32_param``), the
  module's partition (``param.ds_tensor``) and, for a parameter ZeRO-3 keeps gathered between steps (below
  ``stage3_param_persistence_threshold``), the gathered copy;
* no DeepSpeed optimizer (a plain torch optimizer updates the module's parameter): the parameter.

The bounds are ``[0, ln(max_logit_scale)]``, as the model's own ``clamp_logit_scale_`` (CLIP's ``s >= 1``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["clamp_logit_scale"]


@torch.no_grad()
def clamp_logit_scale(param: torch.nn.Parameter, max_logit_scale: float) -> None:
    """Clamp ``param`` (log s) to ``[0, ln(max_logit_scale)]`` in the optimizer's master copy and in the module.

    Call it on every rank after each optimizer step; no collective is issued."""
    hi = math.log(max_logit_scale)
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        if param.requires_grad:
            master = safe_get_local_fp32_param(param)  # this rank's partition (a copy when offloaded)
            safe_set_local_fp32_param(param, master.clamp(0.0, hi))
        param.ds_tensor.clamp_(0.0, hi)  # the module's partition, gathered by the next forward
        if param.numel() > 0:  # kept gathered between steps (persistent parameter)
            param.data.clamp_(0.0, hi)
        return
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:  # ZeRO-1/2, bf16 optimizer: the fp32 fragment this rank updates (None elsewhere)
        mapping.get_hp_fragment().clamp_(0.0, hi)
    param.data.clamp_(0.0, hi)
