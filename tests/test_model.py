"""The dual encoder: shapes, pooling, logit scale, gradient checkpointing, offline-only loading, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_MODEL
from rankclip_ds.config import load_config
from rankclip_ds.model import ModelConfigError, TextTower, build_model, build_tokenizer, resolve_text_path

TINY = [
    "--model.image.name", "vit_tiny_patch16_224",
    *TINY_MODEL,
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("builtin:minilm")


def batch(tokenizer, n=3, size=32):
    tok = tokenizer(
        ["a red circle", "two blue squares on the left", "a tiny green triangle"][:n],
        padding="max_length",
        truncation=True,
        max_length=12,
        return_tensors="pt",
    )
    return torch.randn(n, 3, size, size), tok["input_ids"], tok["attention_mask"]


def test_forward_shapes_and_logit_scale(tokenizer):
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY).model)
    images, ids, mask = batch(tokenizer)
    img, txt, scale = model(images, ids, mask)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    assert scale.shape == (1,) and scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    (img.sum() + txt.sum()).backward()
    assert model.image_proj.weight.grad is not None and model.text_proj.weight.grad is not None


@pytest.mark.parametrize("pooling", ["cls", "mean", "eos"])
def test_pooling_ignores_padding(tokenizer, pooling):
    torch.manual_seed(0)
    tower = TextTower(
        "builtin:minilm",
        pretrained=False,
        pooling=pooling,
        overrides={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
    ).eval()
    short = tokenizer(["a red circle"], padding="max_length", max_length=8, return_tensors="pt")
    long = tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt")
    a = tower(short["input_ids"], short["attention_mask"])
    b = tower(long["input_ids"], long["attention_mask"])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pretrained_builtin_text_tower_loads_real_weights(tokenizer):
    tower = TextTower("builtin:minilm", pretrained=True, pooling="mean").eval()
    tok = tokenizer(
        ["a photo of a dog", "a picture of a puppy", "a spreadsheet of tax numbers"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        e = torch.nn.functional.normalize(tower(tok["input_ids"], tok["attention_mask"]), dim=-1)
    # A trained sentence encoder puts the two dog captions closer together than either to the spreadsheet.
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.2


def test_pretrained_text_tower_truncated_to_its_first_layers():
    full = TextTower("builtin:minilm", pretrained=True)
    two = TextTower("builtin:minilm", pretrained=True, overrides={"num_hidden_layers": 2})
    full_params = dict(full.encoder.named_parameters())
    two_params = dict(two.encoder.named_parameters())
    assert len(two.encoder.encoder.layer) == 2
    assert two_params and all(torch.equal(full_params[k], v) for k, v in two_params.items())


def count_forwards(modules: list[torch.nn.Module]) -> list[int]:
    """A list whose entry i counts the forward calls of ``modules[i]`` from now on. A pre-hook: a recomputation in
    backward stops as soon as it has what backward needs (checkpoint's early stop), before the forward returns."""
    calls = [0] * len(modules)

    def hook(i: int):
        def count(*_) -> None:
            calls[i] += 1

        return count

    for i, module in enumerate(modules):
        module.register_forward_pre_hook(hook(i))
    return calls


def test_grad_checkpointing_gives_same_gradients(tokenizer):
    """Checkpointing really happens (each transformer block of both towers runs its forward a second time, during
    backward, to recompute its activations) and changes no gradient; also when switched on through the config."""
    images, ids, mask = batch(tokenizer)
    grads, forwards = [], []
    for ckpt, via_config in ((False, False), (True, False), (True, True)):
        cfg = load_config(None, [*TINY, "--model.grad_checkpointing", str(via_config).lower()]).model
        torch.manual_seed(0)
        model = build_model(cfg)
        if not via_config:
            model.set_grad_checkpointing(ckpt)
        model.train()
        # The attention of each transformer block (transformers recomputes a layer through its forward, not its
        # __call__, so hooks on the layer itself do not see the recomputation; those on its children do).
        blocks = [block.attn for block in model.image_tower.trunk.blocks]
        blocks += [layer.attention for layer in model.text_tower.encoder.encoder.layer]
        calls = count_forwards(blocks)
        img, txt, _ = model(images, ids, mask)
        after_forward = list(calls)
        (img.square().sum() + txt.square().sum()).backward()
        forwards.append((after_forward, calls))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert len(blocks) == 2  # one ViT block, one BERT layer (the TINY model)
    assert forwards[0] == ([1, 1], [1, 1])  # without checkpointing: one forward per block
    assert forwards[1] == forwards[2] == ([1, 1], [2, 2])  # with it: recomputed once in backward
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-4, atol=1e-6)


def test_meta_build_allocates_nothing():
    cfg = load_config(None, ["--model.image.name", "vit_base_patch16_224"]).model
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.param_counts()["image_tower"] == 85_798_656  # ViT-B/16 without its classifier head


def test_convnet_image_tower():
    cfg = load_config(None, [*TINY, "--model.image.name", "resnet18", "--model.image.model_kwargs", "{}"]).model
    model = build_model(cfg, device="meta")
    assert model.image_tower.num_features == 512


def test_local_image_weights_roundtrip(tmp_path):
    from safetensors.torch import save_file

    cfg = load_config(None, TINY).model
    torch.manual_seed(1)
    src = build_model(cfg)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.image_tower.trunk.state_dict().items()}, str(path))
    torch.manual_seed(2)
    dst = build_model(load_config(None, [*TINY, "--model.image.weights", str(path)]).model)
    loaded = dst.image_tower.trunk.state_dict()
    for k, a in src.image_tower.trunk.state_dict().items():
        assert torch.equal(a, loaded[k]), k
    wrong = tmp_path / "wrong.safetensors"
    save_file({"unrelated.weight": torch.zeros(2)}, str(wrong))
    with pytest.raises(ModelConfigError, match=r"lacks .* tensors"):
        build_model(load_config(None, [*TINY, "--model.image.weights", str(wrong)]).model)
    with pytest.raises(ModelConfigError, match="no such file"):
        build_model(load_config(None, [*TINY, "--model.image.weights", str(tmp_path / "nope.pth")]).model)


def test_errors_name_the_setting(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(ModelConfigError, match=r"model.image.name='vit_bogus' is not a timm model"):
        build_model(load_config(None, [*TINY, "--model.image.name", "vit_bogus"]).model, device="meta")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # a hub id this cache lacks
    with pytest.raises(ModelConfigError, match=r"'sentence-transformers/all-MiniLM-L6-v2': a Hugging Face hub id not"):
        resolve_text_path("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ModelConfigError, match=r"is not a local folder with a config.json"):
        resolve_text_path(str(tmp_path))
    with pytest.raises(ModelConfigError, match=r"overrides.num_layerz: BertConfig has no such field"):
        TextTower("builtin:minilm", pretrained=False, overrides={"num_layerz": 2})
