"""The GPU speed switches, tested on the CPU as far as they run there: fused AdamW (``optim.fused``), compiled
towers (``model.compile``), SDPA attention in both towers (``model.image.fused_attn``,
``model.text.attn_implementation``), TF32 (``run.tf32``), pinned memory and non-blocking copies
(``data.pin_memory``), CUDA memory tags and model FLOP utilisation (``perf/mfu``, ``logging.peak_tflops``).

The fast tests call the functions each switch goes through with a CUDA or CPU device argument (nothing here needs a
GPU); the slow ones train for real (2 CPU ranks, DeepSpeed) with the switches on and compare against a run without.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from conftest import REPO_ROOT, TINY_MODEL, clean_launcher_env, free_port
from rankclip_ds.config import ConfigError, load_config
from rankclip_ds.model import ImageTower, TextTower, build_model
from rankclip_ds.model.flops import count_train_flops, train_flops_per_sample
from rankclip_ds.trainer.metrics import memory_stats
from rankclip_ds.trainer.mfu import (
    MfuMeter,
    build_mfu_meter,
    lookup_peak_tflops,
    math_precision,
    mfu,
    resolve_peak_flops,
)
from rankclip_ds.trainer.optim import build_optimizer, place_optimizer_steps, resolve_fused
from rankclip_ds.trainer.step import to_device
from rankclip_ds.trainer.tf32 import set_tf32


def tiny_cfg(*overrides: str):
    return load_config(None, [*TINY_MODEL, *overrides])


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


# ------------------------------------------------------------------------------------------------ fused AdamW
@pytest.mark.parametrize(
    ("setting", "device", "fused"),
    [
        ("auto", "cuda", True),
        ("auto", "cpu", None),
        (True, "cuda", True),
        (True, "cpu", True),  # PyTorch has had a fused CPU kernel since 2.4
        (False, "cuda", None),
        (False, "cpu", None),
    ],
)
def test_build_optimizer_fuses_by_setting_and_device(setting, device, fused):
    """The optimizer is built before DeepSpeed moves anything to the device, so a CUDA device can be named here."""
    opt = build_optimizer(small_net(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, fused=setting,
                          device=torch.device(device))  # fmt: skip
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["fused"] is fused
    # Not fused means PyTorch's default (for-each where it applies), never fused=False, which would also switch
    # the for-each implementation off.
    assert opt.defaults["foreach"] is None
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("true", True), ("false", False)])
def test_optim_fused_values(value, expected):
    fused = load_config(None, ["--optim.fused", value]).optim.fused
    assert fused == expected and type(fused) is type(expected)


@pytest.mark.parametrize("value", ["1", "0", "fast"])
def test_optim_fused_rejects_other_values(value):
    """1 and 0 compare equal to True and False, so the Literal check alone would let them through."""
    with pytest.raises(ConfigError, match=r"optim\.fused="):
        load_config(None, ["--optim.fused", value])


def test_fused_true_needs_a_device_pytorch_has_the_kernel_for():
    with pytest.raises(
        ConfigError, match=r"optim.fused=True: .* no fused AdamW kernel for device 'meta'.*auto or false"
    ):
        resolve_fused(True, "meta")


def test_fused_true_with_cpu_offload_is_refused():
    """DeepSpeed steps its own CPU Adam on offloaded states; the error comes before that op is (JIT-)built."""
    with pytest.raises(ConfigError, match=r"optim.fused=True: with ZeRO optimizer offload.*auto or false"):
        build_optimizer(small_net(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, cpu_offload=True,
                        fused=True, device="cuda")  # fmt: skip


def test_fused_adamw_on_the_cpu_runs_the_fused_kernel_and_matches_the_default(monkeypatch):
    calls = []
    kernel = torch._fused_adamw_

    def counting_kernel(*args, **kwargs):
        calls.append(len(args[0]))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counting_kernel)
    nets = {setting: small_net() for setting in ("auto", True)}
    opts = {s: build_optimizer(net, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, fused=s, device="cpu")
            for s, net in nets.items()}  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(4, 6, generator=g)
        for s, net in nets.items():
            opts[s].zero_grad()
            net(x).square().mean().backward()
            opts[s].step()
    assert len(calls) == 5 * 2  # one fused launch per parameter group and step, for the fused optimizer only
    for (name, a), b in zip(nets["auto"].named_parameters(), nets[True].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_fused_steps_are_moved_to_the_parameters_device():
    """DeepSpeed's universal-checkpoint load assigns ``step`` as the CPU tensor its conversion saved; the fused
    kernel wants it beside the parameter, as PyTorch's own load_state_dict puts it (meta stands in for CUDA)."""
    fused_param, plain_param = nn.Parameter(torch.zeros(3, device="meta")), nn.Parameter(torch.zeros(3, device="meta"))
    fused = torch.optim.AdamW([fused_param], fused=True)
    plain = torch.optim.AdamW([plain_param])
    fused.state[fused_param]["step"] = torch.tensor(7, dtype=torch.float64)
    plain.state[plain_param]["step"] = torch.tensor(7.0)
    assert place_optimizer_steps(fused) == 1
    step = fused.state[fused_param]["step"]
    assert (step.device.type, step.dtype) == ("meta", torch.float32)
    assert place_optimizer_steps(fused) == 0  # already in place
    # Unfused AdamW keeps its steps on the CPU by design (no device sync to read them).
    assert place_optimizer_steps(plain) == 0 and plain.state[plain_param]["step"].device.type == "cpu"


# ------------------------------------------------------------------------------------------------ SDPA attention
class CountSdpa(TorchFunctionMode):
    """Counts calls of ``F.scaled_dot_product_attention``: what a tower really runs, not what a flag says."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def text_batch(length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 5000, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, 6:] = 0  # a padded caption: the masked path
    return ids, mask


@pytest.mark.parametrize("fused", [True, False])
def test_image_tower_attention_follows_the_switch_whatever_timm_was_told(fused, monkeypatch):
    import timm.layers.config as timm_layer_config

    monkeypatch.setattr(timm_layer_config, "_USE_FUSED_ATTN", 0)  # as TIMM_FUSED_ATTN=0 in the environment
    tower = ImageTower("vit_tiny_patch16_224", 32, model_kwargs={"patch_size": 8, "depth": 2}, fused_attn=fused)
    assert [m.fused_attn for m in tower.modules() if hasattr(m, "fused_attn")] == [fused, fused]
    with CountSdpa() as counter:
        tower(torch.randn(1, 3, 32, 32))
    assert counter.calls == (2 if fused else 0)
    assert timm_layer_config._USE_FUSED_ATTN == 0  # the process-wide setting is put back


@pytest.mark.parametrize(("impl", "pretrained"), [("sdpa", True), ("sdpa", False), ("eager", True), ("eager", False)])
def test_text_tower_attention_follows_the_switch(impl, pretrained):
    tower = TextTower("builtin:minilm", pretrained=pretrained, overrides={"num_hidden_layers": 2},
                      attn_implementation=impl)  # fmt: skip
    assert tower.encoder.config._attn_implementation == impl
    with CountSdpa() as counter:
        tower(*text_batch())
    assert counter.calls == (2 if impl == "sdpa" else 0)


def test_the_config_switches_reach_the_towers_and_sdpa_agrees_with_eager():
    torch.manual_seed(0)
    sdpa = build_model(tiny_cfg().model).eval()
    eager = build_model(tiny_cfg("--model.image.fused_attn", "false", "--model.text.attn_implementation", "eager")
                        .model).eval()  # fmt: skip
    eager.load_state_dict(sdpa.state_dict())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outputs, calls = {}, {}
    with torch.no_grad():
        for name, model in (("sdpa", sdpa), ("eager", eager)):
            with CountSdpa() as counter:
                outputs[name] = model(images, *text_batch())
            calls[name] = counter.calls
    assert calls == {"sdpa": 2, "eager": 0}  # one ViT block and one BERT layer
    for a, b in zip(outputs["sdpa"], outputs["eager"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_libraries_own_defaults_are_sdpa_as_documented():
    """What timm and transformers pick when not told (docs/training.md): fused attention in timm's ViT blocks,
    ``sdpa`` for a transformers BERT built from its config or loaded."""
    import os

    import timm
    from transformers import AutoConfig, AutoModel

    from rankclip_ds.model import resolve_text_path

    if "TIMM_FUSED_ATTN" not in os.environ:
        assert timm.layers.use_fused_attn() is True
    path = resolve_text_path("builtin:minilm")
    config = AutoConfig.from_pretrained(path, local_files_only=True, num_hidden_layers=1)
    assert AutoModel.from_config(config).config._attn_implementation == "sdpa"
    loaded = AutoModel.from_pretrained(path, config=config, local_files_only=True, add_pooling_layer=False)
    assert loaded.config._attn_implementation == "sdpa"


def test_default_config_builds_sdpa_towers():
    cfg = load_config(None, [])
    assert (cfg.model.image.fused_attn, cfg.model.text.attn_implementation) == (True, "sdpa")
    model = build_model(cfg.model, device="meta")
    assert model.text_tower.encoder.config._attn_implementation == "sdpa"
    assert all(m.fused_attn for m in model.image_tower.modules() if hasattr(m, "fused_attn"))


# ------------------------------------------------------------------------------------------------ torch.compile
def test_compiled_towers_give_the_same_embeddings_and_keep_parameter_names():
    from rankclip_ds.model import architecture_only

    torch.manual_seed(0)
    eager = build_model(tiny_cfg().model).eval()
    compiled = build_model(tiny_cfg("--model.compile", "true").model).eval()
    assert compiled.image_tower._compiled_call_impl is not None and compiled.text_tower._compiled_call_impl is not None
    assert eager.image_tower._compiled_call_impl is None
    # Same names: checkpoints, DeepSpeed's partitioning, the export and load_model see the same model.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    compiled.load_state_dict(eager.state_dict(), strict=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = text_batch()
    ids, mask = torch.cat([ids, ids[:1]]), torch.cat([mask, mask[:1]])
    with torch.no_grad():
        for a, b in zip(compiled(images, ids, mask), eager(images, ids, mask), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # A rebuilt copy (load_model, the ZeRO-3 evaluation copy) is never compiled.
    assert architecture_only(tiny_cfg("--model.compile", "true").model).compile is False


def test_checkpointed_towers_compile_without_graph_breaks():
    """Each tower is one graph for torch.compile, with activation checkpointing on (the recipe at scale): the text
    tower is built with ``use_cache=False``, else transformers' once-per-forward warning about the cache breaks it."""
    model = build_model(tiny_cfg("--model.grad_checkpointing", "true").model).train()
    ids, mask = text_batch()
    assert torch._dynamo.explain(model.text_tower)(ids, mask).graph_break_count == 0
    assert torch._dynamo.explain(model.image_tower)(torch.randn(2, 3, 32, 32)).graph_break_count == 0


# ------------------------------------------------------------------------------------------------ TF32
def _tf32_state() -> dict[str, object]:
    """Every getter of the old and the new API: reading one raises if the two APIs were mixed."""
    b = torch.backends
    return {
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cuda.matmul.allow_tf32": b.cuda.matmul.allow_tf32,
        "cuda.matmul.fp32_precision": b.cuda.matmul.fp32_precision,
        "cudnn.allow_tf32": b.cudnn.allow_tf32,
        "cudnn.conv.fp32_precision": b.cudnn.conv.fp32_precision,
    }


@pytest.fixture
def restore_tf32():
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def test_tf32_is_switched_on_for_a_cuda_device(restore_tf32):
    assert set_tf32(torch.device("cuda", 0), True) is True
    assert _tf32_state() == {
        "matmul_precision": "high",
        "cuda.matmul.allow_tf32": True,
        "cuda.matmul.fp32_precision": "tf32",
        "cudnn.allow_tf32": True,
        "cudnn.conv.fp32_precision": "tf32",
    }


def test_tf32_is_switched_off_for_a_cuda_device(restore_tf32):
    set_tf32("cuda", True)
    assert set_tf32("cuda", False) is True
    state = _tf32_state()
    assert state["matmul_precision"] == "highest" and state["cuda.matmul.fp32_precision"] == "ieee"
    assert state["cuda.matmul.allow_tf32"] is False and state["cudnn.allow_tf32"] is False


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_leaves_the_cpu_alone(enabled, restore_tf32):
    before = _tf32_state() | {"mkldnn.matmul": torch.backends.mkldnn.matmul.fp32_precision}
    assert set_tf32(torch.device("cpu"), enabled) is False
    assert _tf32_state() | {"mkldnn.matmul": torch.backends.mkldnn.matmul.fp32_precision} == before


# ------------------------------------------------------------------------------------------------ data path
@pytest.mark.parametrize(
    ("pin", "device", "pinned"), [(True, "cuda", True), (True, "cpu", False), (False, "cuda", False)]
)
def test_the_loader_pins_memory_for_a_cuda_device_only(pin, device, pinned, monkeypatch):
    import rankclip_ds.data
    from rankclip_ds.resolved import resolve_run
    from rankclip_ds.trainer.setup import ImagePreprocessing, build_train_data

    seen = {}
    monkeypatch.setattr(rankclip_ds.data, "build_image_transform", lambda *a, **k: None)
    monkeypatch.setattr(rankclip_ds.data, "build_train_loader", lambda *a, **k: seen.update(k) or "loader")
    cfg = load_config(None, ["--data.pin_memory", str(pin).lower(), "--optim.micro_batch_size", "4"])
    run = resolve_run(cfg, {"zero_optimization": {"stage": 2}}, 1)
    info = SimpleNamespace(rank=0, world_size=1)
    pre = ImagePreprocessing(32, (0.5,) * 3, (0.5,) * 3)
    assert build_train_data(cfg, info, run, None, pre, torch.device(device)) == "loader"
    assert seen["pin_memory"] is pinned


class RecordedCopy:
    """A batch tensor that records how it is copied to the device."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.copies = tensor, []

    def to(self, device, non_blocking: bool = False):
        self.copies.append((torch.device(device), non_blocking))
        return self.tensor.to(device, non_blocking=non_blocking)


def test_every_batch_tensor_is_copied_non_blocking():
    batch = {"image": torch.randn(2, 3, 4, 4), "input_ids": torch.ones(2, 5, dtype=torch.long),
             "attention_mask": torch.ones(2, 5, dtype=torch.long)}  # fmt: skip
    recorded = {k: RecordedCopy(v) for k, v in batch.items()}
    images, ids, mask = to_device(recorded, torch.device("cpu"), torch.bfloat16)
    assert {k: r.copies for k, r in recorded.items()} == {k: [(torch.device("cpu"), True)] for k in batch}
    assert (images.dtype, ids.dtype, mask.dtype) == (torch.bfloat16, torch.long, torch.long)


# ------------------------------------------------------------------------------------------------ CUDA memory
def test_cuda_memory_tags(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)
    assert memory_stats(torch.device("cuda", 0)) == {
        "memory/cuda_allocated_gib": 3.0,
        "memory/cuda_peak_gib": 5.0,
        "memory/cuda_reserved_gib": 6.0,
    }
    assert "memory/rss_peak_gib" in memory_stats(torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ FLOPs and MFU
class LinearDual(nn.Module):
    """A dual encoder of plain matmuls, to count by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(3 * 4 * 4, 8, bias=False)
        self.image_proj = nn.Linear(8, 5, bias=False)
        self.embed = nn.Embedding(100, 6)
        self.text = nn.Linear(6, 5)
        self.logit_scale = nn.Parameter(torch.zeros(1))

    def forward(self, images, input_ids, attention_mask):
        img = self.image_proj(self.image(images.flatten(1)))  # (1, 5)
        txt = self.text(self.embed(input_ids)).mean(dim=1)  # (1, L, 5) → (1, 5)
        return img, txt, self.logit_scale.clone()


def test_flop_count_of_matmuls_is_the_hand_count():
    length = 7
    with torch.device("meta"):
        model = LinearDual()
    mm = {"image": 2 * 48 * 8, "image_proj": 2 * 8 * 5, "text": 2 * length * 6 * 5}  # 2·m·n·k, one sample
    # Backward: a weight gradient (one more matmul) for every layer, and an input gradient (another) for every
    # layer whose input needs one: not the first image layer, whose input is pixels.
    expected = 3 * sum(mm.values()) - mm["image"]
    assert count_train_flops(model, image_size=4, text_length=length) == expected


def test_flop_count_of_the_tiny_dual_encoder_is_the_hand_count():
    """TINY_MODEL: a 1-block ViT-Tiny (width 192, 3 heads, MLP 768) on 32 px with 8 px patches (16 patches + the
    class token = 17 tokens), a 1-layer BERT (width 32, MLP 64) over 32 tokens, projections to 16."""
    n, d = 17, 192
    patch_embed = 2 * 16 * (3 * 8 * 8) * d  # a convolution: one matmul per patch
    # qkv, QKᵀ and AV (per head, summed over the heads), the output projection, the MLP
    vit = 2 * n * d * 3 * d + 2 * (2 * n * n * d) + 2 * n * d * d + 2 * (2 * n * d * 4 * d)
    length, h = 32, 32
    # Q, K and V, QKᵀ and AV, the output projection, the MLP
    bert = 3 * (2 * length * h * h) + 2 * (2 * length * length * h) + 2 * length * h * h + 2 * (2 * length * h * 64)
    projections = 2 * d * 16 + 2 * h * 16
    forward = patch_embed + vit + bert + projections
    # Backward is two matmuls per forward one, except the patch embedding (no gradient for the pixels).
    assert train_flops_per_sample(tiny_cfg().model) == 3 * forward - patch_embed == 50_134_272


def test_flop_count_does_not_depend_on_the_device_the_model_was_built_on():
    """On fake CPU tensors SDPA would pick a fused CPU kernel FlopCounterMode has no formula for; the count runs
    attention through the math decomposition, so a CPU-built model counts like a meta-built one."""
    cfg = tiny_cfg()
    cpu_model = build_model(cfg.model, device="cpu")
    counted = count_train_flops(cpu_model, image_size=32, text_length=cfg.model.text.max_length)
    assert counted == train_flops_per_sample(cfg.model)


def test_flop_count_ignores_checkpointing_and_compile():
    """Model FLOPs: activation checkpointing's recomputed forward is hardware work, not model work."""
    plain = train_flops_per_sample(tiny_cfg().model)
    heavy = tiny_cfg("--model.grad_checkpointing", "true", "--model.compile", "true")
    assert train_flops_per_sample(heavy.model) == plain


def test_mfu_arithmetic():
    # 100 GFLOP per sample at 8,000 samples/s on 8 devices of 312 TFLOP/s: 800 TFLOP/s of 2,496.
    assert mfu(100e9, 8000.0, 312e12, 8) == pytest.approx(800e12 / 2496e12)
    meter = MfuMeter(flops_per_sample=100e9, peak_flops=312e12, world_size=8)
    assert meter.startup_scalars() == {"perf/flops_per_sample": 100e9}
    scalars = meter.scalars(8000.0)
    assert scalars["perf/model_tflops_per_s_per_device"] == pytest.approx(100.0)
    assert scalars["perf/mfu"] == pytest.approx(100 / 312)
    assert "perf/mfu" not in MfuMeter(100e9, None, 8).scalars(8000.0)
    assert MfuMeter(None, 312e12, 8).scalars(8000.0) == {} and MfuMeter(None, 312e12, 8).startup_scalars() == {}


@pytest.mark.parametrize(
    ("name", "precision", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA GH200 480GB", "fp32", 67.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
        ("NVIDIA A100-PCIE-40GB", "fp32", 19.5),
        ("NVIDIA L40S", "bf16", 362.05),
        ("NVIDIA A10G", "bf16", 70.0),
        ("NVIDIA A10", "bf16", 125.0),
        ("Tesla V100-SXM2-32GB", "fp16", 125.0),
        ("Tesla V100-PCIE-16GB", "fp16", 112.0),
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 on Volta
        ("NVIDIA H100 NVL", "bf16", None),  # lower clocks: not in the table, give logging.peak_tflops
        ("NVIDIA GeForce RTX 4090", "bf16", None),
    ],
)
def test_peak_table(name, precision, tflops):
    assert lookup_peak_tflops(name, precision) == tflops


def test_peak_by_precision_device_and_override(monkeypatch):
    assert [math_precision(p, t) for p, t in [("bf16", True), ("fp16", False), ("fp32", True), ("fp32", False)]] == [
        "bf16", "fp16", "tf32", "fp32"]  # fmt: skip
    assert resolve_peak_flops(torch.device("cpu"), "fp32", True, None)[0] is None
    assert resolve_peak_flops(torch.device("cpu"), "fp32", True, 2.5)[0] == 2.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert resolve_peak_flops(torch.device("cuda", 0), "bf16", True, None)[0] == 312e12
    assert resolve_peak_flops(torch.device("cuda", 0), "fp32", True, None)[0] == 156e12
    assert resolve_peak_flops(torch.device("cuda", 0), "fp32", False, None)[0] == 19.5e12
    assert resolve_peak_flops(torch.device("cuda", 0), "bf16", True, 100.0)[0] == 100e12  # the override wins


def test_mfu_meter_on_the_cpu_logs_mfu_only_with_a_given_peak():
    meter = build_mfu_meter(tiny_cfg(), torch.device("cpu"), world_size=2)
    assert meter.flops_per_sample == 50_134_272 and meter.peak_flops is None
    assert set(meter.scalars(100.0)) == {"perf/model_tflops_per_s_per_device"}
    given = build_mfu_meter(tiny_cfg("--logging.peak_tflops", "0.5"), torch.device("cpu"), world_size=2)
    assert given.scalars(100.0)["perf/mfu"] == pytest.approx(50_134_272 * 100.0 / (0.5e12 * 2))


def test_dry_run_prints_the_speed_settings_and_the_flops(capsys):
    from rankclip_ds.train import main

    recipe = str(Path(REPO_ROOT, "configs", "laion_vitb16_64k.yaml"))
    ds = str(Path(REPO_ROOT, "ds_configs", "zero2.json"))
    assert main(["--deepspeed", ds, "--config", recipe, "--dry-run", "--dry-run-world-size", "256"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"model FLOPs +123\.03 GFLOP per sample", out), out
    assert "GPU speed         AdamW auto (fused on CUDA), model.compile off, attention image sdpa / text sdpa, " \
           "TF32 on, pinned memory on" in out  # fmt: skip


# ------------------------------------------------------------------------------------------------ real training
TRAIN = str(Path(REPO_ROOT, "rankclip_ds", "train.py"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_training_with_the_switches_on_matches_training_without(tmp_path):
    """2 CPU ranks under ZeRO-2, the real Trainer: compiled towers and DeepSpeed stepping a fused AdamW (PyTorch's
    fused CPU kernel) give the losses of eager towers and the default AdamW (float rounding apart), with gradient
    caching and activation checkpointing on (the re-run of each micro-batch under autograd restores the RNG, and
    compiled dropout repeats its masks), and the export keeps the uncompiled parameter names."""
    from test_trainer import ZERO, export_state, losses, run_harness

    common = ["--optim.micro_batch_size", "4", "--optim.grad_accum_steps", "2", "--optim.grad_cache", "true",
              "--model.grad_checkpointing", "true", "--model.image.drop_path_rate", "0.1"]  # fmt: skip
    ds = {"zero_optimization": ZERO[2]}
    plain = run_harness(tmp_path / "plain", common, ds)
    fast = run_harness(tmp_path / "fast", [*common, "--model.compile", "true", "--optim.fused", "true"], ds)
    log = (tmp_path / "fast" / "log.txt").read_text()
    assert "speed settings: AdamW fused, model.compile True" in log
    assert "recompile_limit" not in log  # whole towers compile under ZeRO-2: no per-module recompilation storm
    torch.testing.assert_close(torch.tensor(losses(fast)), torch.tensor(losses(plain)), rtol=1e-5, atol=1e-6)
    assert export_state(fast).keys() == export_state(plain).keys()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_compiled_zero3_run_trains_like_an_eager_one(tmp_path):
    """ZeRO-3 partitions parameters and gathers them in hooks on every submodule, inside the compiled towers:
    correct (the same losses), with a warning that compilation gains little there."""
    from test_trainer import ZERO, losses, run_harness

    ds = {"zero_optimization": ZERO[3]}
    common = ["--optim.micro_batch_size", "8"]
    plain = run_harness(tmp_path / "plain", common, ds)
    fast = run_harness(tmp_path / "fast", [*common, "--model.compile", "true", "--optim.fused", "true"], ds)
    assert "model.compile under ZeRO-3" in (tmp_path / "fast" / "log.txt").read_text()
    torch.testing.assert_close(torch.tensor(losses(fast)), torch.tensor(losses(plain)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_fused_adamw_resumes_on_another_world_size(tmp_path):
    """A checkpoint of 2 ranks with fused AdamW states resumes on 1 rank through DeepSpeed's universal form (which
    assigns the optimizer's steps itself) and continues exactly like the uninterrupted run."""
    from test_trainer import ATOL, RTOL, ZERO, losses, resume_from_step3, run_harness

    ds = {"zero_optimization": ZERO[2]}
    full = run_harness(tmp_path / "full", ["--optim.fused", "true", "--optim.micro_batch_size", "8"], ds)
    resumed = resume_from_step3(full, tmp_path / "resumed", ["--optim.fused", "true", "--optim.micro_batch_size", "16"],
                                ds, nproc=1)  # fmt: skip
    log = (resumed["dir"] / "log.txt").read_text()
    assert "loading DeepSpeed's universal form" in log and "AdamW fused" in log
    assert [r["step"] for r in resumed["records"]] == [4, 5, 6]
    # A fresh optimizer (lost moments or step count) would move these by far more than float rounding.
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(full)[3:]), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_entry_point_with_compiled_towers_logs_flops_and_mfu(shards, tmp_path):
    """The real entry point under torchrun with ``--model.compile true``: the run trains, evaluates and exports;
    TensorBoard holds the FLOPs per sample once and MFU against the given peak every window; the export loads
    with load_model into an uncompiled model with the same parameter names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_entry_point import ZERO2, check_run, overrides

    from rankclip_ds import load_model

    args = [*overrides(shards, tmp_path), "--model.compile", "true", "--logging.peak_tflops", "0.002"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           TRAIN, "--deepspeed", ZERO2, *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=880, env=clean_launcher_env(), cwd=REPO_ROOT)
    check_run(proc, tmp_path)
    run = tmp_path / "entry"
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"perf/flops_per_sample", "perf/model_tflops_per_s_per_device", "perf/mfu"} <= tags, tags
    cfg = load_config(run / "config.yaml")
    flops = [e.value for e in acc.Scalars("perf/flops_per_sample")]
    assert flops == [pytest.approx(train_flops_per_sample(cfg.model), rel=1e-6)]  # float32 in TensorBoard
    rates = {e.step: e.value for e in acc.Scalars("perf/samples_per_s")}
    for event in acc.Scalars("perf/mfu"):
        assert event.value == pytest.approx(mfu(flops[0], rates[event.step], 0.002e12, 2), rel=1e-5)
    model = load_model(run / "export")
    assert model.image_tower._compiled_call_impl is None
    assert list(model.state_dict()) == list(build_model(tiny_cfg().model, device="meta").state_dict())
    assert json.loads((run / "export" / "config.json").read_text())["model"]["compile"] is True
