"""Model FLOP utilisation (MFU): model FLOPs per second achieved, over the devices' peak.

``perf/mfu = flops_per_sample × samples_per_s / (peak_flops_per_device × world_size)``, with ``flops_per_sample``
counted once at start-up (:func:`rankclip_ds.model.flops.train_flops_per_sample`) and the peak taken from
``logging.peak_tflops`` or, on a GPU, from :data:`PEAK_TFLOPS` by ``torch.cuda.get_device_name()``. The peak is the
dense (no 2:4 sparsity) tensor-core figure of the precision the matmuls run in: bf16 or fp16 for those runs; for
fp32 runs TF32 when ``run.tf32`` is on, plain fp32 otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["PEAK_TFLOPS", "MfuMeter", "build_mfu_meter", "lookup_peak_tflops", "math_precision", "mfu"]

log = logging.getLogger("rankclip_ds.train")


@dataclass(frozen=True)
class DevicePeak:
    """Dense peak TFLOP/s of one device, per precision the matrix multiplications run in (None: not published
    or not supported)."""

    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float | None


# Vendor datasheets list tensor-core figures "with sparsity"; the dense figures below are half of those.
#   H100 SXM / PCIe: NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100/): BF16/FP16 1,979 /
#     1,513 TFLOPS sparse, TF32 989 / 756 sparse, FP32 67 / 51.
#   H200 (SXM): NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200/): the H100 SXM compute (BF16 1,979
#     sparse, TF32 989 sparse, FP32 67); GH200's Hopper GPU is the same class. The NVL (PCIe) variants of H100 and
#     H200 are clocked lower and are deliberately not in the table: give logging.peak_tflops.
#   A100 (SXM4 and PCIe, 40 and 80 GB): NVIDIA A100 datasheet: BF16/FP16 312 dense (624 sparse), TF32 156 dense,
#     FP32 19.5.
#   L40S: NVIDIA L40S datasheet: BF16/FP16 362.05 dense (733 sparse), TF32 183 dense (366 sparse), FP32 91.6.
#   A10: NVIDIA A10 datasheet: BF16/FP16 125 dense (250 sparse), TF32 62.5 dense, FP32 31.2.
#   A10G (AWS g5): no NVIDIA datasheet; ~70 TFLOPS BF16/FP16 and 35 TFLOPS FP32 as AWS and cloud vendors list it
#     (e.g. baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference), TF32 unpublished.
#   V100 SXM2 / PCIe: NVIDIA V100 datasheet: FP16 tensor 125 / 112 TFLOPS, FP32 15.7 / 14; no bf16 and no TF32
#     (an fp32 run with run.tf32 on still runs plain fp32 there, so its "tf32" peak is the fp32 figure).
_H100_SXM = DevicePeak(bf16=989.4, fp16=989.4, tf32=494.7, fp32=67.0)
_H100_PCIE = DevicePeak(bf16=756.0, fp16=756.0, tf32=378.0, fp32=51.0)
_A100 = DevicePeak(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)
_L40S = DevicePeak(bf16=362.05, fp16=362.05, tf32=183.0, fp32=91.6)
_A10 = DevicePeak(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2)
_A10G = DevicePeak(bf16=70.0, fp16=70.0, tf32=None, fp32=35.0)
_V100_SXM2 = DevicePeak(bf16=None, fp16=125.0, tf32=15.7, fp32=15.7)
_V100_PCIE = DevicePeak(bf16=None, fp16=112.0, tf32=14.0, fp32=14.0)

# (substring of the lower-cased torch.cuda.get_device_name(), peak): the first match wins, so the more specific
# names come first ("a100" before "a10", "h100 pcie" before "h100"). None: known, but no figure here.
PEAK_TFLOPS: tuple[tuple[str, DevicePeak | None], ...] = (
    ("h100 nvl", None),
    ("h200 nvl", None),
    ("h100 pcie", _H100_PCIE),
    ("h100", _H100_SXM),  # "NVIDIA H100 80GB HBM3" (SXM5)
    ("h200", _H100_SXM),  # "NVIDIA H200", also "NVIDIA GH200 480GB"
    ("a100", _A100),  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"
    ("l40s", _L40S),
    ("a10g", _A10G),
    ("a10", _A10),
    ("v100s", None),
    ("v100-pcie", _V100_PCIE),
    ("v100", _V100_SXM2),
)


def math_precision(precision: str, tf32: bool) -> str:
    """The precision the matrix multiplications run in: ``run.precision``, or ``tf32`` for fp32 runs with TF32."""
    if precision == "fp32":
        return "tf32" if tf32 else "fp32"
    return precision


def lookup_peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of the named GPU for matmuls in ``precision`` (bf16, fp16, tf32, fp32); None when the
    table has no figure for it."""
    name = device_name.lower()
    for pattern, peak in PEAK_TFLOPS:
        if pattern in name:
            return None if peak is None else getattr(peak, precision)
    return None


def mfu(flops_per_sample: float, samples_per_s: float, peak_flops_per_device: float, world_size: int) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the peak FLOP/s of all ``world_size`` devices."""
    return flops_per_sample * samples_per_s / (peak_flops_per_device * world_size)


@dataclass
class MfuMeter:
    """Turns a logging window's throughput into ``perf/`` scalars."""

    flops_per_sample: float | None
    """Model FLOPs of one sample (forward + backward); None when counting failed (then nothing is logged)."""
    peak_flops: float | None
    """Peak FLOP/s of one device; None: MFU is not logged (the achieved FLOP/s still are)."""
    world_size: int

    def startup_scalars(self) -> dict[str, float]:
        """Logged once: the FLOPs of one sample."""
        return {} if self.flops_per_sample is None else {"perf/flops_per_sample": float(self.flops_per_sample)}

    def scalars(self, samples_per_s: float) -> dict[str, float]:
        """``perf/model_tflops_per_s_per_device`` and, with a peak, ``perf/mfu``, for a window's global rate."""
        if self.flops_per_sample is None or samples_per_s <= 0:
            return {}
        out = {"perf/model_tflops_per_s_per_device": self.flops_per_sample * samples_per_s / self.world_size / 1e12}
        if self.peak_flops is not None:
            out["perf/mfu"] = mfu(self.flops_per_sample, samples_per_s, self.peak_flops, self.world_size)
        return out


def resolve_peak_flops(
    device: torch.device, precision: str, tf32: bool, peak_tflops: float | None
) -> tuple[float | None, str]:
    """Peak FLOP/s of one device and where it came from (for the start-up log line)."""
    math = math_precision(precision, tf32)
    if peak_tflops is not None:
        return peak_tflops * 1e12, f"logging.peak_tflops={peak_tflops:g}"
    if device.type != "cuda":
        return None, f"no peak for a {device.type} device: give logging.peak_tflops to log perf/mfu"
    name = torch.cuda.get_device_name(device)
    peak = lookup_peak_tflops(name, math)
    if peak is None:
        return None, f"no {math} peak known for {name!r}: give logging.peak_tflops to log perf/mfu"
    return peak * 1e12, f"{name}, dense {math} {peak:g} TFLOP/s"


def build_mfu_meter(cfg: Config, device: torch.device, world_size: int) -> MfuMeter:
    """Counts the model FLOPs of one sample once (fake tensors: about a second on the CPU, no memory) and finds
    the device peak. A model the counter cannot trace is warned about and logs no ``perf/`` FLOP scalars."""
    from ..model.flops import train_flops_per_sample

    try:
        flops: float | None = float(train_flops_per_sample(cfg.model))
    except Exception as exc:  # telemetry must never stop a run
        log.warning("could not count the model FLOPs (%s: %s); perf/mfu is not logged", type(exc).__name__, exc)
        flops = None
    peak, source = resolve_peak_flops(device, cfg.run.precision, cfg.run.tf32, cfg.logging.peak_tflops)
    if flops is not None:
        log.info("model FLOPs per training sample %.4g GFLOP (forward + backward); peak: %s", flops / 1e9, source)
    return MfuMeter(flops_per_sample=flops, peak_flops=peak, world_size=world_size)
