"""CLIP checkpoints in and out: ``model.init_from`` a Hugging Face ``CLIPModel`` (folder or hub id) or an open_clip
checkpoint gives our model the source's embeddings and logits; the export's ``open_clip/`` and ``hf_clip/`` load in
open_clip and transformers and give ours. Tiny random models, same pixels, real CLIP tokens (OpenAI's BPE); the
references are the source libraries' own forward passes and tokenizers."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import openai_clip_tokenizer, tiny_clip_config
from rankclip_ds.model import ModelConfig, build_model, build_tokenizer
from rankclip_ds.model.clip_init import check_init_from, resolve_init_from
from rankclip_ds.problems import ConfigError

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a cat.", "Two dogs, playing in the snow!", "it's a diagram of 42 red squares"]
ATOL = 1e-5


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    """Converted checkpoints go to this test's own HF_HOME (huggingface_hub reads the variable at import, so the
    constant is patched)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path / "hf_home"


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value (LayerNorms start at 1 and 0, which hides swapped norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _pixels(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))


def _ours(model, tokenizer, pixels):
    """Our model's image embeddings, text embeddings and scaled image→text logits."""
    tokens = tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.encode_image(pixels)
        txt = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        logits = model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    return img, txt, logits, tokens["input_ids"]


# ------------------------------------------------------------------------------------------------ Hugging Face in
@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny random CLIPModel (OpenAI's 49408-token vocabulary) saved with its tokenizer and image processor."""
    torch.manual_seed(0)
    config = tiny_clip_config(intermediate=37, projection=16)
    model = transformers.CLIPModel(config).eval()
    _perturb(model, 1)
    folder = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(folder)
    openai_clip_tokenizer().save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(folder)
    return model, folder


def _hf_reference(model, tokenizer, pixels):
    tokens = tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return img, txt.pooler_output, out.logits_per_image, tokens["input_ids"]


def _assert_same(ours, reference) -> None:
    assert len(ours) == len(reference)
    for name, a, b in zip(("image", "text", "logits", "tokens"), ours, reference, strict=False):
        torch.testing.assert_close(
            a, b, rtol=0, atol=ATOL if name != "tokens" else 0, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_init_from_a_hugging_face_clip_folder_gives_its_embeddings_and_logits(hf_clip):
    source, folder = hf_clip
    derived = resolve_init_from(ModelConfig(init_from=str(folder)), local_files_only=True)
    assert (derived.image.name, derived.image.model_kwargs, derived.image.image_size) == (
        "vit_base_patch16_clip_quickgelu_224",
        {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 37 / 32},
        32,
    )
    assert (derived.text.pooling, derived.text.max_length, derived.text.pretrained, derived.embed_dim) == (
        "eos",
        77,
        False,
        16,
    )
    model = build_model(derived).eval()
    pixels = _pixels()
    ref = _hf_reference(source, transformers.AutoTokenizer.from_pretrained(folder), pixels)
    _assert_same(_ours(model, build_tokenizer(derived.text.name_or_path), pixels), ref)
    assert resolve_init_from(derived, local_files_only=True) == derived  # idempotent


def test_a_converted_checkpoint_is_reused_without_conversion(hf_clip, monkeypatch, hf_home):
    from rankclip_ds.model import clip_init

    cfg = ModelConfig(init_from=str(hf_clip[1]))
    first = resolve_init_from(cfg, local_files_only=True)
    folders = list((hf_home / "rankclip_ds" / "init_from").iterdir())
    assert [p.name for p in folders] == [folders[0].name] and not folders[0].name.startswith(".")  # no temp left

    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(clip_init, "_write_converted", refuse)
    monkeypatch.setattr(clip_init, "_first_mismatch", refuse)
    assert resolve_init_from(cfg, local_files_only=True) == first


def _hub_cache(root, folder, repo="tiny-org/tiny-clip", commit="0123456789abcdef0123456789abcdef01234567"):
    """``folder`` laid out as huggingface_hub's cache keeps a download: ``models--org--name/snapshots/<commit>/``
    and ``refs/main``."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return repo


def test_init_from_a_hub_id_reads_the_hub_cache_offline(hf_clip, tmp_path, monkeypatch):
    from huggingface_hub import constants

    source, folder = hf_clip
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = _hub_cache(tmp_path / "hub", folder)
    cfg = ModelConfig(init_from=repo)
    assert check_init_from(cfg) == []
    derived = resolve_init_from(cfg, local_files_only=False)  # offline: the cache is all there is
    pixels = _pixels()
    ref = _hf_reference(source, transformers.AutoTokenizer.from_pretrained(folder), pixels)
    _assert_same(_ours(build_model(derived).eval(), build_tokenizer(derived.text.name_or_path), pixels), ref)


def test_an_offline_hub_miss_names_the_id_the_cache_and_the_command(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = ModelConfig(init_from="tiny-org/not-downloaded")
    with pytest.raises(ConfigError) as exc:
        resolve_init_from(cfg, local_files_only=False)
    for part in (
        "model.init_from='tiny-org/not-downloaded'",
        str(tmp_path / "hub"),
        "hf download tiny-org/not-downloaded",
    ):
        assert part in str(exc.value)
    (problem,) = check_init_from(cfg)
    assert problem.machine and "hf download tiny-org/not-downloaded" in problem.message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert check_init_from(cfg) == []  # online, rank 0 will download it


# ------------------------------------------------------------------------------------------------ open_clip in
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def open_clip_ckpt(tmp_path_factory):
    """A tiny random open_clip CLIP registered as ``rankclip-test-tiny`` and saved as .pt and .safetensors."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("open_clip_src")
    config = folder / "rankclip-test-tiny.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("rankclip-test-tiny").eval()
    _perturb(model, 2)
    state = model.state_dict()
    torch.save(
        {"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "epoch_3.pt"
    )
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "tiny.safetensors"))
    return model, folder, config


def _open_clip_reference(model, pixels):
    tokens = open_clip.get_tokenizer("rankclip-test-tiny")(TEXTS)
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(tokens)
        logits = model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    return img, txt, logits, tokens


@pytest.mark.parametrize(("by", "file"), [("name", "epoch_3.pt"), ("json", "tiny.safetensors")])
def test_init_from_an_open_clip_checkpoint_gives_its_embeddings_and_logits(open_clip_ckpt, by, file):
    source, folder, config = open_clip_ckpt
    name = "rankclip-test-tiny" if by == "name" else str(config)
    derived = resolve_init_from(ModelConfig(init_from=str(folder / file), open_clip_name=name), local_files_only=True)
    assert derived.image.name == "vit_base_patch16_clip_224" and derived.text.max_length == 77
    pixels = _pixels()
    img, txt, logits, ids = _ours(build_model(derived).eval(), build_tokenizer(derived.text.name_or_path), pixels)
    ref_img, ref_txt, ref_logits, ref_ids = _open_clip_reference(source, pixels)
    # Same ids up to the padding: ours pads with <|endoftext|> (49407), open_clip's SimpleTokenizer with 0.
    after_eot = ids.eq(49407).cumsum(dim=1) > 1
    assert torch.equal(ids.masked_fill(after_eot, 0), ref_ids)
    _assert_same((img, txt, logits), (ref_img, ref_txt, ref_logits))


def test_an_open_clip_name_that_does_not_fit_the_checkpoint_names_the_first_mismatching_tensor(open_clip_ckpt):
    _, folder, _ = open_clip_ckpt
    wider = {**TINY_OPEN_CLIP, "vision_cfg": {**TINY_OPEN_CLIP["vision_cfg"], "patch_size": 16}}
    wrong = folder / "rankclip-test-wrong.json"
    wrong.write_text(json.dumps(wider))
    cfg = ModelConfig(init_from=str(folder / "tiny.safetensors"), open_clip_name=str(wrong))
    # The grid is 4×4 patches of 8 px in the checkpoint, 2×2 of 16 px by this config: the class token matches, the
    # position embedding (1 + G² rows) is the first tensor that does not.
    expected = "tensor 'visual.positional_embedding' has shape [17, 32] in the checkpoint, but"
    with pytest.raises(ConfigError, match=r"model.open_clip_name=.*" + re.escape(expected) + r".*expects \[5, 32\]"):
        resolve_init_from(cfg, local_files_only=True)
    (problem,) = check_init_from(cfg)
    assert expected in problem.message and problem.field == "model.open_clip_name"


def test_an_unknown_open_clip_name_is_named(open_clip_ckpt):
    _, folder, _ = open_clip_ckpt
    cfg = ModelConfig(init_from=str(folder / "tiny.safetensors"), open_clip_name="ViT-B-61")
    (problem,) = check_init_from(cfg)
    assert "model.open_clip_name='ViT-B-61': is not an open_clip model name" in problem.message


# ------------------------------------------------------------------------------------------------ contradictions
def test_per_tower_weights_and_contradicting_fields_are_refused(hf_clip, tmp_path):
    folder = str(hf_clip[1])
    weights = ModelConfig(init_from=folder)
    weights.image.weights = str(tmp_path / "vit.safetensors")
    with pytest.raises(ConfigError, match=r"model.image.weights=.*is set together with model.init_from="):
        resolve_init_from(weights, local_files_only=True)
    embed = ModelConfig(init_from=folder, embed_dim=512)
    with pytest.raises(
        ConfigError, match=r"model.embed_dim=512: contradicts model.init_from=.*embed_dim=16.*Fix: remove"
    ):
        resolve_init_from(embed, local_files_only=True)
    assert [p.field for p in check_init_from(embed)] == ["model.embed_dim"]
    same = ModelConfig(init_from=folder, embed_dim=16)  # the derived value itself is no contradiction
    assert resolve_init_from(same, local_files_only=True).embed_dim == 16


def test_build_model_refuses_a_config_that_was_not_derived(hf_clip):
    with pytest.raises(ConfigError, match=r"has not been derived from it.*resolve_init_from"):
        build_model(ModelConfig(init_from=str(hf_clip[1])))


def test_the_preflight_checks_init_from_instead_of_the_text_tower(hf_clip):
    from rankclip_ds.config import load_config
    from rankclip_ds.preflight import preflight

    cfg = load_config(None, ["--model.init_from", str(hf_clip[1]), "--model.embed_dim", "64"])
    _, problems = preflight(cfg, {}, 1, ds_source="ds.json")
    fields = [p.field for p in problems]
    assert "model.embed_dim" in fields and not any(f.startswith("model.text") for f in fields), problems


# ------------------------------------------------------------------------------------------------ out
@pytest.fixture(scope="module")
def clip_type_export(tmp_path_factory):
    """Our CLIP-type model from scratch (a timm CLIP ViT, a CLIPTextModel with QuickGELU) and its export."""
    from rankclip_ds.export import save_export

    root = tmp_path_factory.mktemp("ours")
    # eos_token_id 2 as in OpenAI's own config.json (transformers reads it as "pool at the largest id"): the
    # open_clip export must still pool at <|endoftext|> = 49407.
    text_config = transformers.CLIPTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, eos_token_id=2
    )
    text_config.save_pretrained(root / "text")
    openai_clip_tokenizer().save_pretrained(root / "text")
    cfg = ModelConfig(embed_dim=16)
    cfg.image = dataclasses.replace(
        cfg.image,
        name="vit_base_patch16_clip_quickgelu_224",
        image_size=32,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 1.5},
    )
    cfg.text = dataclasses.replace(
        cfg.text, name_or_path=str(root / "text"), pretrained=False, pooling="eos", max_length=77
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _perturb(model, 3)
    out = save_export(model.state_dict(), cfg, root / "export")
    return model, cfg, out


def test_the_export_of_a_clip_type_model_loads_in_open_clip_with_the_same_embeddings(clip_type_export):
    model, cfg, out = clip_type_export
    pixels = _pixels()
    img, txt, logits, our_ids = _ours(model, build_tokenizer(cfg.text.name_or_path), pixels)
    (name,) = [p.stem for p in (out / "open_clip").glob("*.json") if p.name != "open_clip_config.json"]
    loaded_local, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(out / "open_clip"))
    open_clip.add_model_config(str(out / "open_clip" / f"{name}.json"))
    loaded_named, _, _ = open_clip.create_model_and_transforms(
        name, pretrained=str(out / "open_clip" / "open_clip_model.safetensors")
    )
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(out / "open_clip"))
    assert preprocess.transforms[0].size == 32
    for loaded in (loaded_local.eval(), loaded_named.eval()):
        with torch.no_grad():
            oc_img, oc_txt = loaded.encode_image(pixels), loaded.encode_text(tokenizer(TEXTS))
            padded_with_eot = loaded.encode_text(our_ids)  # our padding (49407) instead of open_clip's 0
            oc_logits = loaded.logit_scale.exp() * F.normalize(oc_img, dim=-1) @ F.normalize(oc_txt, dim=-1).T
        _assert_same((oc_img, oc_txt, oc_logits), (img, txt, logits))
        torch.testing.assert_close(padded_with_eot, txt, rtol=0, atol=ATOL)


def test_the_export_of_a_clip_type_model_loads_as_a_hugging_face_clip_model(clip_type_export):
    model, cfg, out = clip_type_export
    pixels = _pixels()
    loaded = transformers.CLIPModel.from_pretrained(out / "hf_clip").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf_clip")
    assert transformers.CLIPImageProcessor.from_pretrained(out / "hf_clip").crop_size == {"height": 32, "width": 32}
    _assert_same(_hf_reference(loaded, tokenizer, pixels), _ours(model, build_tokenizer(cfg.text.name_or_path), pixels))


def test_a_model_that_is_not_clip_type_gets_no_clip_exports(tmp_path):
    from rankclip_ds.export import save_export

    cfg = ModelConfig(embed_dim=8)
    cfg.text = dataclasses.replace(
        cfg.text, pretrained=False, overrides={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2}
    )
    cfg.image = dataclasses.replace(cfg.image, image_size=32, model_kwargs={"patch_size": 8, "depth": 1})
    out = save_export(build_model(cfg).state_dict(), cfg, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_clip_type_needs_a_clip_vit_a_clip_text_model_and_end_of_text_pooling(clip_type_export):
    from rankclip_ds.model.clip_arch import is_clip_type

    _, cfg, _ = clip_type_export
    assert is_clip_type(cfg)
    assert not is_clip_type(
        dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, name="vit_small_patch16_224"))
    )
    assert not is_clip_type(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pooling="mean")))
    assert not is_clip_type(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, name_or_path="builtin:minilm")))


# ------------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize(
    ("patch", "width", "depth", "heads", "quick", "name"),
    [
        (32, 768, 12, 12, False, "vit_base_patch32_clip_224"),
        (16, 768, 12, 12, True, "vit_base_patch16_clip_quickgelu_224"),
        (14, 1024, 24, 16, True, "vit_large_patch14_clip_quickgelu_224"),
        (14, 1280, 32, 16, False, "vit_huge_patch14_clip_224"),
    ],
)
def test_standard_clip_sizes_get_timm_names_without_kwargs(patch, width, depth, heads, quick, name):
    import timm

    from rankclip_ds.model.clip_arch import vit_name_and_kwargs

    got = vit_name_and_kwargs(
        patch_size=patch, width=width, depth=depth, heads=heads, mlp_dim=4 * width, quick_gelu=quick
    )
    assert got == (name, {})
    with torch.device("meta"):
        trunk = timm.create_model(name, pretrained=False, num_classes=0)
    assert (trunk.patch_embed.patch_size[0], trunk.embed_dim, len(trunk.blocks), trunk.blocks[0].attn.num_heads) == (
        patch,
        width,
        depth,
        heads,
    )
    assert trunk.blocks[0].mlp.fc1.out_features == 4 * width


@pytest.mark.parametrize(
    ("name", "image_name", "kwargs", "size"),
    [
        ("ViT-B-16", "vit_base_patch16_clip_224", {}, 224),
        ("ViT-B-32-quickgelu", "vit_base_patch32_clip_quickgelu_224", {}, 224),
        ("ViT-L-14-336", "vit_large_patch14_clip_224", {}, 336),
        ("ViT-B-16-plus-240", "vit_base_patch16_clip_224", {"embed_dim": 896, "num_heads": 14}, 240),
    ],
)
def test_open_clip_model_configs_derive_timm_clip_vits(name, image_name, kwargs, size):
    from rankclip_ds.model.clip_arch import arch_from_open_clip_config

    arch = arch_from_open_clip_config(open_clip.get_model_config(name), name)
    assert (arch.image_name, arch.model_kwargs, arch.image_size) == (image_name, kwargs, size)
    assert arch.text_config["hidden_act"] == ("quick_gelu" if "quickgelu" in name else "gelu")


@pytest.mark.parametrize(
    ("name", "what"), [("RN50", "ResNet"), ("ViT-B-16-SigLIP", "init_logit_bias"), ("EVA02-B-16", "timm_model_name")]
)
def test_open_clip_models_our_towers_cannot_reproduce_are_refused(name, what):
    from rankclip_ds.model.clip_arch import arch_from_open_clip_config

    with pytest.raises(ConfigError, match=rf"model.open_clip_name='{name}': settings .* do not reproduce: .*{what}"):
        arch_from_open_clip_config(open_clip.get_model_config(name), name)


def test_a_concurrent_conversion_that_finished_first_wins(hf_clip, hf_home):
    """Two ranks converting at once: the second rename finds the finished folder, keeps it, and removes its copy."""
    from rankclip_ds.model import clip_init
    from rankclip_ds.model.clip_source import locate_source

    cfg = ModelConfig(init_from=str(hf_clip[1]))
    derived = resolve_init_from(cfg, local_files_only=True)
    folder = hf_home / "rankclip_ds" / "init_from"
    (converted,) = folder.iterdir()
    before = (converted / "model.safetensors").stat().st_mtime_ns
    source = locate_source(cfg.init_from, None, local_files_only=True)
    clip_init._write_converted(source, clip_init._source_arch(source, None), cfg, converted)
    assert [p.name for p in folder.iterdir()] == [converted.name]  # no temporary folder left
    assert (converted / "model.safetensors").stat().st_mtime_ns == before
    assert resolve_init_from(cfg, local_files_only=True) == derived


def test_an_open_clip_model_with_another_vocabulary_is_refused():
    from rankclip_ds.model.clip_arch import arch_from_open_clip_config

    small_vocab = {**TINY_OPEN_CLIP, "text_cfg": {**TINY_OPEN_CLIP["text_cfg"], "vocab_size": 1000}}
    with pytest.raises(ConfigError, match=r"do not reproduce: \[.a tokenizer other than OpenAI's 49408-token BPE.\]"):
        arch_from_open_clip_config(small_vocab, "tiny-small-vocab")
