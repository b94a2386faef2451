"""Hub names for both towers, offline: a text hub id and timm's published weights resolve from a real Hugging Face
cache layout built here (``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` symlinks into the
blobs, ``refs/main``); the pre-flight names the id, the cache and the command on an offline miss and says nothing
online; rank 0 fills the cache before any other rank reads it (two real processes).

huggingface_hub reads ``HF_HUB_CACHE``/``HF_HUB_OFFLINE`` once, at import, into ``huggingface_hub.constants``. The
in-process tests monkeypatch those constants (``hub_env``); the subprocess tests (the dry run, the two-rank fetch)
set the real environment variables. Nothing here reaches the network: the conftest sets ``HF_HUB_OFFLINE=1``, and
the online-mode tests replace the two download functions and point ``HF_ENDPOINT`` at a closed port.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO_ROOT, free_port
from rankclip_ds.config import load_config
from rankclip_ds.model import ImageTowerConfig, ModelConfigError, TextTowerConfig, build_model, resolve_text_path
from rankclip_ds.model.checks import check_image_tower, check_text_tower
from rankclip_ds.model.hub import fetch_model_files

TEXT_ID = "tiny-org/tiny-bert"
TIMM_NAME = "test_vit.r160_in1k"  # timm registers it with hf_hub_id "timm/test_vit.r160_in1k"
TIMM_REPO = "timm/test_vit.r160_in1k"
TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 37}
SMALL_IMAGE = ["--model.image.image_size", "32", "--model.image.model_kwargs", "{patch_size: 8, depth: 1}"]
CLOSED_ENDPOINT = "http://127.0.0.1:9"  # the discard port: any request that slipped through fails at once


# ------------------------------------------------------------------------------------------------ the cache layout
def write_cache_entry(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Write ``files`` into ``cache`` as huggingface_hub does: each file's bytes once under ``blobs/<sha256>``, a
    relative symlink to it under ``snapshots/<commit>/<name>``, and ``refs/main`` holding the commit (no trailing
    newline: huggingface_hub compares it verbatim). Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40 hex digits
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT and the builtin:minilm tokenizer, saved with save_pretrained (what a hub repo holds)."""
    from transformers import AutoConfig, AutoTokenizer, BertModel

    builtin = resolve_text_path("builtin:minilm")
    config = AutoConfig.from_pretrained(builtin, local_files_only=True, **TINY_BERT)
    torch.manual_seed(123)
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(builtin, local_files_only=True).save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    return folder


@pytest.fixture(scope="module")
def timm_weights_file(tmp_path_factory) -> Path:
    """Random weights of timm's test_vit with its 1000-class head, as timm's hub repositories hold them."""
    import timm

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("timm") / "model.safetensors"
    save_file(timm.create_model("test_vit", num_classes=1000).state_dict(), str(path))
    return path


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty cache in ``tmp_path/hub``, offline (set ``offline(False)`` for online mode): huggingface_hub's
    constants monkeypatched, as it read the environment when first imported."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    class Env:
        path = cache

        @staticmethod
        def offline(value: bool) -> None:
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", value)

    return Env


# ------------------------------------------------------------------------------------------------ (a) text tower
def test_text_hub_id_resolves_from_the_cache_and_loads_its_weights(tiny_bert, hub_env):
    from rankclip_ds.export import load_model, save_export

    snapshot = write_cache_entry(hub_env.path, TEXT_ID, folder_files(tiny_bert))
    assert resolve_text_path(TEXT_ID) == str(snapshot)
    assert check_text_tower(TextTowerConfig(name_or_path=TEXT_ID)) == []
    cfg = load_config(None, [*SMALL_IMAGE, "--model.text.name_or_path", TEXT_ID]).model
    model = build_model(cfg)
    saved = load_file(str(tiny_bert / "model.safetensors"))
    loaded = model.text_tower.encoder.state_dict()
    assert sorted(loaded) == sorted(saved)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    # An export of it loads offline from the cached config and tokenizer (the evaluation CLI's path).
    export = save_export(model.state_dict(), cfg, hub_env.path.parent / "export")
    reloaded, tokenizer = load_model(export, with_tokenizer=True)
    assert torch.equal(
        reloaded.text_tower.encoder.embeddings.word_embeddings.weight, saved["embeddings.word_embeddings.weight"]
    )
    assert tokenizer("a red circle")["input_ids"][:2] == [101, 1037]  # [CLS] a: the BERT vocabulary saved there


def test_local_folder_wins_over_a_hub_id_of_the_same_name(tiny_bert, hub_env, tmp_path, monkeypatch):
    local = tmp_path / "tiny-org" / "tiny-bert"
    local.mkdir(parents=True)
    for name, data in folder_files(tiny_bert).items():
        (local / name).write_bytes(data)
    write_cache_entry(hub_env.path, TEXT_ID, folder_files(tiny_bert))
    monkeypatch.chdir(tmp_path)
    assert resolve_text_path(TEXT_ID) == TEXT_ID  # the relative folder, not the snapshot


# ------------------------------------------------------------------------------------------------ (b) timm weights
def test_timm_pretrained_loads_the_cached_published_weights(timm_weights_file, hub_env, monkeypatch):
    import timm.models
    import timm.models._hub

    def ask_the_hub(*args, **kwargs):
        raise AssertionError("building asked the hub: it must read the cache only")

    assert timm.models.get_pretrained_cfg(TIMM_NAME).hf_hub_id == TIMM_REPO
    hub_env.offline(False)  # online: timm would ask the hub for its file; the build reads the cached one instead
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", ask_the_hub)
    write_cache_entry(hub_env.path, TIMM_REPO, {"model.safetensors": timm_weights_file.read_bytes()})
    assert check_image_tower(ImageTowerConfig(name=TIMM_NAME, image_size=160, pretrained=True)) == []
    saved = load_file(str(timm_weights_file))
    for name in (TIMM_NAME, "test_vit"):  # the bare name takes timm's default tag: the same weights
        overrides = ["--model.image.name", name, "--model.image.image_size", "160", "--model.image.pretrained", "true"]
        trunk = build_model(load_config(None, overrides).model).image_tower.trunk.state_dict()
        assert sorted(trunk) == sorted(k for k in saved if not k.startswith("head."))  # the classifier dropped
        for key, tensor in trunk.items():
            assert torch.equal(tensor, saved[key]), key
    reshaped = [*overrides, "--model.image.model_kwargs", "{embed_dim: 32}"]
    with pytest.raises(ModelConfigError, match=r"model.image.model_kwargs=\{'embed_dim': 32\}: reshapes"):
        build_model(load_config(None, reshaped).model)
    # On the meta device nothing is read: the same build succeeds with an empty cache.
    for entry in hub_env.path.iterdir():
        entry.rename(hub_env.path.parent / entry.name)
    overrides = ["--model.image.name", TIMM_NAME, "--model.image.image_size", "160", "--model.image.pretrained", "true"]
    build_model(load_config(None, overrides).model, device="meta")


def test_timm_pretrained_without_published_weights_is_refused(hub_env):
    (problem,) = check_image_tower(ImageTowerConfig(name="botnet50ts_256", pretrained=True))
    assert problem.field == "model.image.pretrained" and "no published weights for 'botnet50ts_256'" in problem.message
    assert not problem.machine
    with pytest.raises(ModelConfigError, match=r"model.image.pretrained=True: timm has no published weights"):
        build_model(
            load_config(None, ["--model.image.name", "botnet50ts_256", "--model.image.pretrained", "true"]).model
        )


# ------------------------------------------------------------------------------------------------ (c) offline miss
def test_offline_miss_names_the_id_the_cache_and_the_command(hub_env):
    cache = str(hub_env.path)
    (problem,) = check_text_tower(TextTowerConfig(name_or_path="bert-base-uncased"))
    assert problem.field == "model.text.name_or_path" and not problem.machine  # no config: no architecture either
    for part in ("'bert-base-uncased'", cache, "`hf download bert-base-uncased`", "HF_HUB_OFFLINE"):
        assert part in problem.message, part
    with pytest.raises(ModelConfigError) as err:  # the build says the same
        resolve_text_path("bert-base-uncased")
    assert cache in str(err.value) and "`hf download bert-base-uncased`" in str(err.value)

    (problem,) = check_image_tower(ImageTowerConfig(name=TIMM_NAME, pretrained=True))
    assert problem.field == "model.image.pretrained" and problem.machine  # the architecture still builds
    for part in (TIMM_REPO, cache, f"`hf download {TIMM_REPO} model.safetensors`", "HF_HUB_OFFLINE"):
        assert part in problem.message, part
    with pytest.raises(ModelConfigError, match=r"hf download timm/test_vit.r160_in1k model.safetensors"):
        build_model(load_config(None, ["--model.image.name", TIMM_NAME, "--model.image.pretrained", "true"]).model)

    # A path that is no hub id (and no folder) is still "no such folder".
    (problem,) = check_text_tower(TextTowerConfig(name_or_path=str(hub_env.path / "no" / "such" / "model")))
    assert "no such folder on this machine" in problem.message and "hf download" not in problem.message


def test_offline_partial_snapshot_names_the_command(tiny_bert, hub_env):
    write_cache_entry(hub_env.path, TEXT_ID, {"config.json": (tiny_bert / "config.json").read_bytes()})
    problems = check_text_tower(TextTowerConfig(name_or_path=TEXT_ID))
    assert [p.field for p in problems] == ["model.text.name_or_path", "model.text.pretrained"]
    assert all(p.machine and f"`hf download {TEXT_ID}`" in p.message for p in problems)


# ------------------------------------------------------------------------------------------------ (d) online miss
def test_online_miss_is_no_preflight_problem(tiny_bert, hub_env):
    hub_env.offline(False)
    assert check_text_tower(TextTowerConfig(name_or_path="bert-base-uncased")) == []
    assert check_image_tower(ImageTowerConfig(name=TIMM_NAME, pretrained=True)) == []
    # A snapshot with only its config: the overrides are checked, the missing files are rank 0's to fetch.
    write_cache_entry(hub_env.path, TEXT_ID, {"config.json": (tiny_bert / "config.json").read_bytes()})
    assert check_text_tower(TextTowerConfig(name_or_path=TEXT_ID)) == []
    (problem,) = check_text_tower(TextTowerConfig(name_or_path=TEXT_ID, overrides={"num_layerz": 2}))
    assert problem.field == "model.text.overrides.num_layerz"
    # Building still reads the cache only, and says who fills it.
    with pytest.raises(ModelConfigError, match=r"fetch_model_files"):
        resolve_text_path("bert-base-uncased")


def test_fetch_downloads_what_the_cache_lacks_and_nothing_else(tiny_bert, timm_weights_file, hub_env, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns, **kwargs):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(write_cache_entry(hub_env.path, repo_id, folder_files(tiny_bert)))

    def fake_hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(write_cache_entry(hub_env.path, repo_id, {filename: timm_weights_file.read_bytes()}) / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    cfg = load_config(
        None,
        ["--model.text.name_or_path", TEXT_ID, "--model.image.name", TIMM_NAME, "--model.image.pretrained", "true"],
    ).model
    assert fetch_model_files(cfg) == []  # offline: nothing
    hub_env.offline(False)
    fetched = fetch_model_files(cfg)
    assert [f.split(" → ")[0] for f in fetched] == [
        f"text model {TEXT_ID}",
        f"timm weights {TIMM_REPO} (model.safetensors or pytorch_model.bin)",
    ]
    (text_call, timm_call) = calls
    assert text_call[0] == TEXT_ID and "config.json" in text_call[1] and "model.safetensors" in text_call[1]
    assert not any(p.endswith((".h5", ".msgpack", ".onnx")) or p == "*" for p in text_call[1])
    assert timm_call == (TIMM_REPO, "model.safetensors")  # the file timm looks for first
    assert fetch_model_files(cfg) == [] and len(calls) == 2  # cached now: nothing downloads again
    assert fetch_model_files(load_config(None, []).model) == []  # builtin:minilm, no timm weights


# ------------------------------------------------------------------------------------------------ real env vars
def _env(cache: Path, *, offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE", "RANK", "WORLD"))}
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT=CLOSED_ENDPOINT, PYTHONPATH=REPO_ROOT)
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    return env


def test_dry_run_and_preflight_read_the_cache_named_by_the_environment(tiny_bert, timm_weights_file, tmp_path, shards):
    cache = tmp_path / "hf_cache"
    args = [sys.executable, "rankclip_ds/train.py", "--dry-run", "--model.text.name_or_path", TEXT_ID]
    # Shards that exist, so that any "not ready on this machine" note would be about the model's files.
    args += ["--data.train_data", str(shards / "train" / "synth-train-{000000..000003}.tar")]
    args += ["--model.image.name", TIMM_NAME, "--model.image.image_size", "160", "--model.image.pretrained", "true"]
    miss = subprocess.run(args, cwd=REPO_ROOT, env=_env(cache, offline=True), capture_output=True, text=True)
    assert miss.returncode == 2, miss.stderr
    assert f"`hf download {TEXT_ID}`" in miss.stderr and str(cache) in miss.stderr
    write_cache_entry(cache, TEXT_ID, folder_files(tiny_bert))
    write_cache_entry(cache, TIMM_REPO, {"model.safetensors": timm_weights_file.read_bytes()})
    hit = subprocess.run(args, cwd=REPO_ROOT, env=_env(cache, offline=True), capture_output=True, text=True)
    assert hit.returncode == 0, hit.stderr
    assert TEXT_ID in hit.stdout and "not ready on this machine" not in hit.stdout


# ------------------------------------------------------------------------------------------------ (e) rank 0 first
_RANK_SCRIPT = r"""
import json, os, sys, time
from pathlib import Path
import shutil
import huggingface_hub
from rankclip_ds.config import load_config
from rankclip_ds.dist import read_dist_env
from rankclip_ds.model import build_model
import torch
import torch.distributed as dist
from rankclip_ds.trainer.setup import Process, fetch_pretrained
from rankclip_ds.trainer.watchdog import CollectiveTracker

out, prepared, repo_id = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
info = read_dist_env()

def download(repo_id, **kwargs):
    # Stands in for huggingface_hub's download: copies a prepared cache entry into HF_HUB_CACHE, slowly.
    if info.rank != 0:
        raise AssertionError("only rank 0 may download")
    time.sleep(2.0)  # without the wait in fetch_pretrained, rank 1 reads the still-empty cache meanwhile
    entry = "models--" + repo_id.replace("/", "--")
    shutil.copytree(prepared / entry, Path(os.environ["HF_HUB_CACHE"]) / entry, symlinks=True)
    (out / "downloaded").write_text(repr(time.time()))
    return str(next((Path(os.environ["HF_HUB_CACHE"]) / entry / "snapshots").iterdir()))

huggingface_hub.snapshot_download = download
cfg = load_config(None, ["--model.text.name_or_path", repo_id, "--model.image.image_size", "32",
                         "--model.image.model_kwargs", "{patch_size: 8, depth: 1}"])
# A plain gloo group (the trainer's start_process also initialises DeepSpeed's communication: 30 s on a CPU).
dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size)
tracker = CollectiveTracker(rank=info.rank, world_size=info.world_size, timeout_minutes=2)
process = Process(dist.group.WORLD, torch.device("cpu"), None, tracker)
fetch_pretrained(cfg, info, out, process)
read_at = time.time()
model = build_model(cfg.model)  # every rank reads the cache
weight = model.text_tower.encoder.embeddings.word_embeddings.weight
(out / f"rank{info.rank}.json").write_text(json.dumps({"read_at": repr(read_at), "sum": float(weight.sum())}))
dist.barrier()
dist.destroy_process_group()
"""


def test_rank0_fetches_before_the_other_rank_reads(tiny_bert, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    write_cache_entry(tmp_path / "prepared", TEXT_ID, folder_files(tiny_bert))  # what the download will bring
    cache, port = tmp_path / "hf_cache", free_port()
    procs = []
    for rank in (0, 1):
        env = _env(cache, offline=False)
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(script), str(tmp_path), str(tmp_path / "prepared"), TEXT_ID]
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    downloaded = float((tmp_path / "downloaded").read_text())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert float(ranks[1]["read_at"]) >= downloaded  # rank 1 read the cache only after rank 0's download finished
    expected = float(load_file(str(tiny_bert / "model.safetensors"))["embeddings.word_embeddings.weight"].sum())
    assert ranks[0]["sum"] == ranks[1]["sum"] == pytest.approx(expected)


def test_rank0_fetch_failure_is_raised_as_a_named_error(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from rankclip_ds.problems import ConfigError
    from rankclip_ds.trainer import setup
    from rankclip_ds.trainer.errors import TrainingError
    from rankclip_ds.trainer.watchdog import CollectiveTracker

    info = SimpleNamespace(is_main=True, distributed=False, rank=0)
    process = setup.Process(None, torch.device("cpu"), None, CollectiveTracker(rank=0, world_size=1, timeout_minutes=1))
    cfg = load_config(None, [])

    def unreachable(model_cfg):
        raise ConnectionError("huggingface.co unreachable")

    monkeypatch.setattr(setup, "fetch_model_files", unreachable)
    with pytest.raises(TrainingError, match=r"rank 0 could not fetch .*ConnectionError: huggingface.co unreachable"):
        setup.fetch_pretrained(cfg, info, tmp_path, process)

    def bad_id(model_cfg):
        raise ConfigError("model.text.name_or_path='no/such': the Hugging Face hub has no model repository")

    monkeypatch.setattr(setup, "fetch_model_files", bad_id)
    with pytest.raises(ConfigError, match=r"no/such"):
        setup.fetch_pretrained(cfg, info, tmp_path, process)
