"""Evaluation with a real (tiny) dual encoder: zero-shot on the embedded synthetic held-out set (plumbing, and a
briefly trained model above chance), ImageFolder = shards, multi-caption retrieval, linear probe, CLI, trainer log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_eval_datasets import COLOURS, make_images, write_image_folder, write_labelled_shards, write_shards

from rankclip_ds.config import load_config
from rankclip_ds.data.synthetic import write_synthetic_dataset
from rankclip_ds.data.transforms import build_image_transform
from rankclip_ds.evaluate import (
    build_zeroshot_classifier,
    extract_image_features,
    linear_probe_eval,
    linear_probe_from_features,
    log_eval,
    open_eval_data,
    resolve_templates,
    retrieval_eval,
    retrieval_metrics,
    scalar_summary,
    write_json,
    zeroshot_eval,
)
from rankclip_ds.evaluate.__main__ import main as evaluate_main
from rankclip_ds.model import build_model, build_tokenizer

TINY = [
    "--model.image.image_size", "32",
    "--model.image.model_kwargs", "{patch_size: 8, depth: 1, embed_dim: 48, num_heads: 2}",
    "--model.text.pretrained", "false",
    "--model.text.overrides", "{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}",
    "--model.text.max_length", "16",
    "--model.embed_dim", "16",
]  # fmt: skip
ZEROSHOT_FIELDS = {"top1", "top5", "mean_per_class", "num_samples", "num_classes", "per_class", "num_templates"}


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, TINY)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


@pytest.fixture(scope="module")
def tokenizer(cfg):
    return build_tokenizer(cfg.model.text.name_or_path)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(out, num_train=400, num_zeroshot=96, image_size=32, samples_per_shard=40)


def transform_kwargs(model) -> dict:
    dc = model.image_tower.data_config()
    return {"image_size": 32, "mean": dc["mean"], "std": dc["std"], "progress": False}


def test_zeroshot_result_fields_and_determinism(model, tokenizer, synthetic, tmp_path):
    kw = transform_kwargs(model)
    result = zeroshot_eval(
        model, tokenizer, data=synthetic["zeroshot_spec"], templates=synthetic["templates"], batch_size=16, **kw
    )
    assert set(result) >= ZEROSHOT_FIELDS
    assert result["num_samples"] == 96 and result["num_classes"] == 8 and result["num_templates"] == 4
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0 and 0.0 <= result["mean_per_class"] <= 1.0
    assert [c["name"] for c in result["per_class"]] == synthetic["held_out"]
    assert sum(c["count"] for c in result["per_class"]) == 96
    assert result["skipped"] == {}
    assert not model.training
    # same numbers with another batch size, DataLoader workers, and the classnames given explicitly
    again = zeroshot_eval(
        model,
        tokenizer,
        data=synthetic["zeroshot_spec"],
        classnames=synthetic["classnames"],
        templates=synthetic["templates"],
        batch_size=7,
        num_workers=2,
        **kw,
    )
    assert again == result
    # a directory of shards reads like its brace expression (classnames.txt beside them)
    folder = str(Path(synthetic["zeroshot_spec"]).parent)
    by_folder = zeroshot_eval(model, tokenizer, data=folder, templates=synthetic["templates"], batch_size=32, **kw)
    assert by_folder.pop("data") == folder and by_folder == {k: v for k, v in result.items() if k != "data"}
    path = write_json(result, tmp_path / "out" / "zeroshot.json")
    assert json.loads(path.read_text()) == result


def test_model_mode_is_restored(model, tokenizer, synthetic):
    model.train()
    try:
        zeroshot_eval(model, tokenizer, data=synthetic["zeroshot_spec"], batch_size=32, **transform_kwargs(model))
        assert model.training
    finally:
        model.eval()


def test_wrapped_and_bf16_models(model, tokenizer, synthetic):
    import copy

    class Engine(torch.nn.Module):  # what DeepSpeed and DDP look like: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    kw = {
        **transform_kwargs(model),
        "data": synthetic["zeroshot_spec"],
        "templates": synthetic["templates"],
        "batch_size": 32,
    }
    assert zeroshot_eval(Engine(model), tokenizer, **kw) == zeroshot_eval(model, tokenizer, **kw)
    half = copy.deepcopy(model).to(torch.bfloat16)  # a bf16 engine's module: inputs are cast to its dtype
    result = zeroshot_eval(half, tokenizer, **kw)
    assert result["num_samples"] == 96 and 0.0 <= result["top1"] <= 1.0
    # The bf16 model's embeddings are the fp32 model's up to bf16 rounding. bf16 keeps 8 significant bits
    # (2⁻⁹ ≈ 0.2 % relative per rounding); through the tiny towers the unit-norm class weights and image features
    # moved by at most 2.3e-3 and 5.9e-3 per entry (three model seeds): tolerance 2e-2. A wrong cast, scale or
    # normalisation moves them by O(0.1-1).
    tol = 2e-2
    templates = resolve_templates(synthetic["templates"])
    dc = model.image_tower.data_config()
    transform = build_image_transform(32, mean=dc["mean"], std=dc["std"], train=False)
    classifiers, images = [], []
    for m in (model, half):
        data = open_eval_data(synthetic["zeroshot_spec"], image_transform=transform, batch_size=32)
        images.append(extract_image_features(m, data, progress=False))
        classifiers.append(
            build_zeroshot_classifier(m, tokenizer, data.classnames, templates, max_length=32, progress=False)
        )
    assert (classifiers[1] - classifiers[0]).abs().max() <= tol
    assert images[1].keys == images[0].keys and torch.equal(images[1].labels, images[0].labels)
    assert images[1].features.dtype == torch.float32
    assert (images[1].features - images[0].features).abs().max() <= tol
    # The accuracy follows from those values: top-1 of the bf16 logits, and a prediction changes only where the
    # fp32 top-1 margin is below twice the logits' largest difference.
    logits = [f.features @ c.T for f, c in zip(images, classifiers, strict=True)]  # (96, 8) each
    assert result["top1"] == pytest.approx((logits[1].argmax(1) == images[1].labels).float().mean().item())
    top2 = logits[0].topk(2, dim=1).values
    changed = logits[1].argmax(1) != logits[0].argmax(1)
    assert (top2[changed, 0] - top2[changed, 1] <= 2 * (logits[1] - logits[0]).abs().max()).all()
    with pytest.raises(TypeError, match="has no encode_image/encode_text"):
        zeroshot_eval(torch.nn.Linear(2, 2), tokenizer, **kw)


def test_classifier_averages_normalised_template_embeddings(model, tokenizer):
    names, templates = ["red circle", "blue star"], ["a photo of a {}.", "a {}.", "itap of the {}."]
    got = build_zeroshot_classifier(model, tokenizer, names, templates, batch_size=4, max_length=16, progress=False)
    rows = []
    for name in names:
        tok = tokenizer(
            [t.replace("{}", name) for t in templates],
            padding="max_length",
            truncation=True,
            max_length=16,
            return_tensors="pt",
        )
        with torch.no_grad():
            emb = F.normalize(model.encode_text(tok["input_ids"], tok["attention_mask"]), dim=-1)  # (T, D)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_image_folder_and_shards_give_the_same_numbers(model, tokenizer, tmp_path, fmt):
    images = make_images(30, seed=7, fmt=fmt)
    spec = write_labelled_shards(tmp_path / "shards", images, [11, 19], fmt=fmt)
    (tmp_path / "shards" / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
    folder = write_image_folder(tmp_path / "folder", images, [f"{i}_{c}" for i, c in enumerate(COLOURS)], fmt=fmt)
    (folder / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
    kw = {**transform_kwargs(model), "templates": "a photo of a {} square.", "batch_size": 8}
    from_shards = zeroshot_eval(model, tokenizer, data=spec, **kw)
    from_folder = zeroshot_eval(model, tokenizer, data=str(folder), **kw)
    assert from_shards.pop("data") != from_folder.pop("data")
    assert from_shards == from_folder
    assert from_shards["num_samples"] == 30
    probe = {"image_size": 32, "mean": kw["mean"], "std": kw["std"], "progress": False, "max_iter": 20}
    lp_shards = linear_probe_eval(model, train_data=spec, test_data=spec, weight_decays=(1e-3,), **probe)
    lp_folder = linear_probe_eval(model, train_data=str(folder), test_data=str(folder), weight_decays=(1e-3,), **probe)
    for key in ("top1", "mean_per_class", "per_class", "num_train", "num_test"):
        assert lp_shards[key] == lp_folder[key]


def test_zeroshot_errors_name_the_fix(model, tokenizer, tmp_path):
    spec = write_shards(tmp_path / "no-names", [{"png": data, "cls": "3"} for data, _ in make_images(3)], [3])
    kw = transform_kwargs(model)
    with pytest.raises(ValueError, match=r"needs class names.*pass classnames=FILE"):
        zeroshot_eval(model, tokenizer, data=spec, **kw)
    with pytest.raises(ValueError, match="neither 'openai'"):
        zeroshot_eval(model, tokenizer, data=spec, classnames=list(COLOURS), templates="photo", **kw)
    with pytest.raises(ValueError, match="no usable sample"):
        zeroshot_eval(model, tokenizer, data=spec, classnames=["only one"], **kw)  # label 3 is out of range


def test_retrieval_with_several_captions_matches_manual_embeddings(model, tokenizer, tmp_path):
    images = make_images(9, seed=4)
    captions = [
        [f"a {list(COLOURS)[label]} square", f"caption {i} b"][: 1 + i % 2] for i, (_, label) in enumerate(images)
    ]
    captions[4] = ["one", "two", "three"]
    samples = [
        {"png": data, "json": json.dumps({"captions": caps})} for (data, _), caps in zip(images, captions, strict=True)
    ]
    spec = write_shards(tmp_path / "retrieval", samples, [4, 5])
    kw = transform_kwargs(model)
    got = retrieval_eval(model, tokenizer, data=spec, batch_size=4, text_batch_size=5, max_length=16, **kw)
    assert got["num_images"] == 9 and got["num_captions"] == sum(len(c) for c in captions)
    assert got["captions_per_image"] == {"min": 1, "max": 3, "mean": got["num_captions"] / 9}
    # the same numbers from embeddings computed by hand
    transform = build_image_transform(32, mean=kw["mean"], std=kw["std"], train=False)
    data = open_eval_data(spec, image_transform=transform, batch_size=100, labels=False, captions="auto")
    batch = next(iter(data.loader))
    flat = [c for caps in captions for c in caps]
    tok = tokenizer(flat, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        img = F.normalize(model.encode_image(batch["image"]), dim=-1)
        txt = F.normalize(model.encode_text(tok["input_ids"], tok["attention_mask"]), dim=-1)
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    expected = retrieval_metrics(img, txt, owner)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_linear_probe_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=g) * 3
    train_y, test_y = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (100,), generator=g)
    train_x = centres[train_y] + torch.randn(200, 8, generator=g)
    test_x = centres[test_y] + torch.randn(100, 8, generator=g)
    result = linear_probe_from_features(train_x, train_y, test_x, test_y, num_classes=5, weight_decays=(1e-4, 1e-2))
    assert result["top1"] > 0.9
    assert result["num_train"] == 160 and result["num_val"] == 40 and result["num_test"] == 100
    assert [s["weight_decay"] for s in result["sweep"]] == [1e-4, 1e-2]
    assert result["best_weight_decay"] in (1e-4, 1e-2)
    again = linear_probe_from_features(train_x, train_y, test_x, test_y, num_classes=5, weight_decays=(1e-4, 1e-2))
    assert again == result
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe_from_features(train_x, train_y, test_x, test_y, num_classes=5, val_fraction=1.0)


def test_cli_on_an_export_folder(model, cfg, synthetic, tmp_path, capsys):
    from rankclip_ds.export import save_export

    export = save_export(model.state_dict(), cfg.model, tmp_path / "export")
    out = tmp_path / "zs.json"
    argv = ["zeroshot", "--model", str(export), "--data", synthetic["zeroshot_spec"], "--templates", "openai"]
    assert evaluate_main([*argv, "--batch-size", "32", "--output", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= ZEROSHOT_FIELDS and result["num_templates"] == 80 and result["model"] == str(export)
    assert "[zeroshot] top1" in capsys.readouterr().out
    out = tmp_path / "lp.json"
    argv = ["linear-probe", "--model", str(export), "--train-data", synthetic["zeroshot_spec"]]
    argv += ["--test-data", synthetic["zeroshot_spec"], "--weight-decays", "1e-3", "--max-iter", "10"]
    assert evaluate_main([*argv, "--output", str(out), "--no-progress"]) == 0
    assert {"top1", "best_weight_decay", "sweep"} <= set(json.loads(out.read_text()))
    assert evaluate_main(["zeroshot", "--model", str(export), "--data", str(tmp_path / "none-{0..1}.tar")]) == 2
    assert "matches no file" in capsys.readouterr().err


def test_log_eval_appends_jsonl_and_scalars(tmp_path):
    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

    writer = Writer()
    result = {"task": "zeroshot", "top1": 0.5, "top5": 1.0, "num_samples": 8, "per_class": [{"index": 0}]}
    log_eval(result, step=10, run_dir=tmp_path, writer=writer)
    log_eval({**result, "top1": 0.75}, step=20, run_dir=tmp_path, writer=writer)
    lines = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(line["step"], line["top1"]) for line in lines] == [(10, 0.5), (20, 0.75)]
    assert ("eval/zeroshot/top1", 0.75, 20) in writer.scalars
    assert scalar_summary(result) == {"eval/zeroshot/top1": 0.5, "eval/zeroshot/top5": 1.0}


def train_briefly(
    model, tokenizer, train_spec: str, *, steps: int, lr: float, seed: int, rank_weight: float, impl: str
):
    """A plain AdamW loop on the synthetic train shards (all samples held in memory, random batches of 64)."""
    from rankclip_ds.losses import rankclip_loss

    dc = model.image_tower.data_config()
    transform = build_image_transform(32, mean=dc["mean"], std=dc["std"], train=False)
    data = open_eval_data(train_spec, image_transform=transform, batch_size=256, labels=False, captions="txt")
    images, captions = [], []
    for batch in data.loader:
        images.append(batch["image"])
        captions.extend(c[0] for c in batch["captions"])
    images = torch.cat(images)  # (N, 3, 32, 32)
    tok = tokenizer(captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(images.shape[0], generator=g)[:64]
        img, txt, scale = model(images[idx], tok["input_ids"][idx], tok["attention_mask"][idx])
        loss = rankclip_loss(img, txt, scale, rank_weight=rank_weight, impl=impl)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_logit_scale_()
    return model.eval()


@pytest.fixture
def single_thread():
    # the tiny model trains faster on one thread than on two contended ones (and results do not depend on it)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_briefly_trained_model_beats_chance_on_held_out_set(cfg, tokenizer, synthetic, tmp_path, single_thread):
    torch.manual_seed(1)
    trained = train_briefly(
        build_model(cfg.model), tokenizer, synthetic["train_spec"], steps=160, lr=2e-3, seed=1, rank_weight=0.0,
        impl="naive",
    )  # fmt: skip
    result = zeroshot_eval(
        trained,
        tokenizer,
        data=synthetic["zeroshot_spec"],
        templates=synthetic["templates"],
        max_length=16,
        **transform_kwargs(trained),
    )
    chance = 1 / result["num_classes"]
    assert result["top1"] > 2 * chance, result
    assert result["mean_per_class"] > 2 * chance
    assert set(result) >= ZEROSHOT_FIELDS
    saved = json.loads(write_json(result, tmp_path / "zs.json").read_text())
    assert all(set(c) == {"index", "name", "count", "top1", "top5"} for c in saved["per_class"])


@pytest.mark.slow
def test_trained_with_ranking_loss_is_well_above_chance(cfg, tokenizer, tmp_path, single_thread):
    data = write_synthetic_dataset(tmp_path / "synth", num_train=1500, num_zeroshot=400, image_size=32)
    torch.manual_seed(2)
    trained = train_briefly(
        build_model(cfg.model), tokenizer, data["train_spec"], steps=400, lr=1e-3, seed=2, rank_weight=0.5,
        impl="chunked",
    )  # fmt: skip
    kw = {**transform_kwargs(trained), "max_length": 16}
    zs = zeroshot_eval(trained, tokenizer, data=data["zeroshot_spec"], templates="openai", **kw)
    assert zs["top1"] > 0.6 and zs["mean_per_class"] > 0.6, zs
    rt = retrieval_eval(trained, tokenizer, data=data["zeroshot_spec"], captions="txt", **kw)
    # 400 held-out images and captions: chance Recall@10 is 10/400
    assert rt["image_to_text_R@10"] > 0.1 and rt["text_to_image_R@10"] > 0.1, rt
