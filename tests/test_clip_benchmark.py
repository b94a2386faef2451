"""A consumer no one here wrote reads our output: a run starts from a (tiny) Hugging Face CLIP checkpoint through the
real entry point (2 ranks, ZeRO-2, the WebDataset pipeline), exports, and ``clip_benchmark`` (PyPI
``clip-benchmark``) evaluates the export's open_clip checkpoint through its own open_clip loader, on a small local
webdataset in its layout. Its zero-shot and retrieval numbers equal ``python -m rankclip_ds.evaluate`` on the same
data; and ``transformers.CLIPModel`` reads the export's Hugging Face folder."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO_ROOT, free_port, openai_clip_tokenizer, skip_unless_ci, tiny_clip_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
pytest.importorskip("clip_benchmark")

IMAGE_SIZE = 32  # the shards' size: no resampling on either side, so both pipelines see the same pixels
ZS_TEMPLATES = ["a photo of a {}.", "a {}.", "a drawing of a {}."]
# clip_benchmark 1.6.2 calls float() on a one-element array, which NumPy 2.4 refuses: its process gets the NumPy of
# requirements-consumer.txt first on its path (`make setup` installs it there).
CONSUMER_NUMPY = Path(REPO_ROOT, ".venv", "clip-benchmark-numpy")


@pytest.fixture(scope="module")
def hf_clip_folder(tmp_path_factory) -> Path:
    """A tiny random Hugging Face CLIPModel with OpenAI's vocabulary, saved with its tokenizer."""
    torch.manual_seed(0)
    config = tiny_clip_config(intermediate=64, projection=32, image_size=IMAGE_SIZE)
    folder = tmp_path_factory.mktemp("tiny_clip")
    transformers.CLIPModel(config).save_pretrained(folder)
    openai_clip_tokenizer().save_pretrained(folder)
    return folder


def _train(shards: Path, init_from: Path, out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER"))}
    env.update(HF_HOME=str(out / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(Path(REPO_ROOT, "rankclip_ds", "train.py")),
        "--deepspeed", str(Path(REPO_ROOT, "ds_configs", "zero2.json")),
        "--run.output_dir", str(out / "runs"), "--run.name", "from_clip",
        "--model.init_from", str(init_from),
        "--data.train_data", str(shards / "train" / "synth-train-{000000..000003}.tar"),
        "--data.num_workers", "1",
        "--optim.micro_batch_size", "16",
        "--optim.lr", "1e-3",
        "--schedule.total_steps", "12", "--schedule.warmup_steps", "2",
        "--logging.log_every", "6", "--checkpoint.every_steps", "12", "--eval.every_steps", "0",
        "--eval.zeroshot_data", str(shards / "zeroshot" / "synth-zs-{000000..000000}.tar"),
        "--eval.templates", str(shards / "zeroshot" / "templates.txt"),
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def _benchmark_layout(root: Path, shard: Path, classnames: list[str], *, retrieval: bool) -> Path:
    """clip_benchmark's local webdataset layout: ``test/nshards.txt`` + ``test/0.tar``, class names and templates
    (``{c}`` placeholders), and ``dataset_type.txt`` for a retrieval set."""
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text("1")
    shutil.copy(shard, root / "test" / "0.tar")
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in ZS_TEMPLATES))
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval")
    return root


def _unique_caption_shard(source: Path, target: Path, count: int) -> Path:
    """The first ``count`` training samples with their captions made unique (identical captions would tie, and a
    tie's order is each implementation's own choice, not a property of the model)."""
    with tarfile.open(source) as src, tarfile.open(target, "w") as dst:
        members = {}
        for member in src.getmembers():
            key, _, ext = member.name.partition(".")
            members.setdefault(key, {})[ext] = src.extractfile(member).read()
        for i, (key, files) in enumerate(sorted(members.items())[:count]):
            files = {"jpg": files["jpg"], "txt": f"{files['txt'].decode().strip()} number {i}".encode()}
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    return target


def _clip_benchmark(export: Path, dataset_root: Path, task: str, output: Path) -> dict:
    cmd = [
        sys.executable, "-m", "clip_benchmark.cli", "eval",
        "--model", f"local-dir:{export / 'open_clip'}",
        "--pretrained", str(export / "open_clip" / "open_clip_model.safetensors"),
        "--dataset", "wds/synth", "--dataset_root", str(dataset_root), "--task", task,
        "--no_amp", "--batch_size", "16", "--num_workers", "0", "--recall_k", "1", "5",
        "--output", str(output),
    ]  # fmt: skip
    if not (CONSUMER_NUMPY / "numpy").is_dir():
        skip_unless_ci(f"{CONSUMER_NUMPY} is missing: run `make setup` (clip_benchmark needs NumPy < 2.4)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(CONSUMER_NUMPY)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(output.read_text())["metrics"]


def _ours(export: Path, task: str, data: Path, output: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "rankclip_ds.evaluate", task, "--model", str(export), "--data", str(data)]
    cmd += ["--output", str(output), "--no-progress", "--batch-size", "16", *extra]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(output.read_text())


def test_clip_benchmark_reads_our_export_and_agrees_with_our_evaluation(shards, hf_clip_folder, tmp_path):
    proc = _train(shards, hf_clip_folder, tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    run = tmp_path / "runs" / "from_clip"
    # The run folder describes the model that trained: CLIP's towers, derived from the checkpoint.
    model_section = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert model_section["init_from"] == str(hf_clip_folder)
    assert model_section["image"]["name"].startswith("vit_") and "_clip_" in model_section["image"]["name"]
    assert model_section["text"]["pooling"] == "eos" and model_section["embed_dim"] == 32
    export = run / "export"
    assert (export / "open_clip" / "open_clip_model.safetensors").is_file()

    # The Hugging Face folder loads in transformers with our trained weights (not the starting checkpoint's).
    from rankclip_ds.export import load_model

    ours_model = load_model(export)
    hf = transformers.CLIPModel.from_pretrained(export / "hf_clip").eval()
    start = transformers.CLIPModel.from_pretrained(hf_clip_folder).eval()
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours_img = ours_model.encode_image(pixels)
        hf_img = hf.get_image_features(pixel_values=pixels).pooler_output
        start_img = start.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(hf_img, ours_img, atol=1e-5, rtol=1e-5)
    assert (start_img - ours_img).abs().max() > 1e-3  # twelve steps moved the weights

    classnames = (shards / "zeroshot" / "classnames.txt").read_text().split("\n")
    classnames = [c for c in classnames if c.strip()]
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(ZS_TEMPLATES))

    # Zero-shot classification on the held-out colour×shape pairs.
    zs_root = _benchmark_layout(
        tmp_path / "zs", shards / "zeroshot" / "synth-zs-000000.tar", classnames, retrieval=False
    )
    theirs = _clip_benchmark(export, zs_root, "zeroshot_classification", tmp_path / "cb_zs.json")
    ours = _ours(
        export, "zeroshot", zs_root / "test" / "0.tar", tmp_path / "zs.json",
        "--classnames", str(zs_root / "classnames.txt"), "--templates", str(templates),
    )  # fmt: skip
    assert ours["num_samples"] == 64
    assert theirs["acc1"] == pytest.approx(ours["top1"], abs=1e-9)
    assert theirs["acc5"] == pytest.approx(ours["top5"], abs=1e-9)
    assert theirs["mean_per_class_recall"] == pytest.approx(ours["mean_per_class"], abs=1e-9)

    # Retrieval, both directions, on 64 image-caption pairs.
    shard = _unique_caption_shard(shards / "train" / "synth-train-000000.tar", tmp_path / "pairs.tar", 64)
    rt_root = _benchmark_layout(tmp_path / "rt", shard, classnames, retrieval=True)
    theirs = _clip_benchmark(export, rt_root, "zeroshot_retrieval", tmp_path / "cb_rt.json")
    ours = _ours(export, "retrieval", rt_root / "test" / "0.tar", tmp_path / "rt.json", "--captions", "txt")
    assert ours["num_images"] == 64
    for k in (1, 5):
        assert theirs[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"text_to_image_R@{k}"], abs=1e-9)
        assert theirs[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"image_to_text_R@{k}"], abs=1e-9)
