"""Builds DeepSpeed's JIT ops this machine needs, once, at set-up time instead of inside the first training run.

On a CPU-only machine DeepSpeed's CPU accelerator compiles its shared-memory communication op the first time a
process group is initialised, and its CPU Adam (the optimizer of the ``*_offload.json`` configs) the first time an
offloaded optimizer is built (minutes in all, then cached under ~/.cache/torch_extensions). Doing it here keeps
that cost out of the first test's time budget and shows compiler errors where they belong. On GPU machines there
is nothing to build for the default configs (NCCL), and this exits at once.

    python tools/prebuild_ops.py
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        print(f"accelerator {accelerator.device_name()}: no JIT op to prebuild")
        return 0
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        builder = accelerator.create_op_builder(name)
        start = time.time()
        print(f"building DeepSpeed op {builder.NAME} (cached after the first time)...", flush=True)
        builder.load()
        print(f"{builder.NAME} ready after {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
