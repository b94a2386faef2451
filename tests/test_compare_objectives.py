"""``tools/compare_objectives.py``: its statistics against hand-computed values, its reading of dataset folders, and
(slow tier) a tiny comparison through the real entry point and the evaluation CLI, rerun to show it resumes."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY_MODEL, clean_launcher_env

TOOL = Path(REPO_ROOT, "tools", "compare_objectives.py")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compare_objectives", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sign_test_exact_values(tool):
    # two-sided: 2 × P(X <= min) under Binomial(n, 1/2)
    assert tool.sign_test(3, 0) == pytest.approx(2 / 8)  # the best 3 seeds can do
    assert tool.sign_test(5, 0) == pytest.approx(2 / 32)
    assert tool.sign_test(6, 0) == pytest.approx(2 / 64)
    assert tool.sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert tool.sign_test(2, 2) == 1.0
    assert tool.sign_test(0, 0) == 1.0


def test_paired_bootstrap_enumerates_three_seeds(tool):
    # every one of the 27 resamples of (1, 2, 6): their means by hand
    diffs = [1.0, 2.0, 6.0]
    means = sorted((a + b + c) / 3 for a in diffs for b in diffs for c in diffs)
    result = tool.paired_bootstrap(diffs)
    assert result["resamples"] == 27
    assert result["mean_diff"] == pytest.approx(3.0)
    assert means[0] <= result["ci95"][0] <= result["ci95"][1] <= means[-1]
    assert result["ci95"][0] == pytest.approx(1.0 + 0.025 * 26 * (4 / 3 - 1.0))  # between the two smallest means
    assert result["p_boot"] == 0.0  # the three agree in sign: "every seed agreed", not significance
    mixed = tool.paired_bootstrap([-1.0, 1.0, 3.0])
    below = sum((a + b + c) / 3 <= 0 for a in (-1, 1, 3) for b in (-1, 1, 3) for c in (-1, 1, 3))
    assert mixed["p_boot"] == pytest.approx(2 * below / 27)
    assert tool.paired_bootstrap([0.5])["ci95"] is None  # one seed: nothing to resample


def test_paired_comparison_and_directions(tool):
    per_seed = {
        "zeroshot/top1": {"clip": {0: 0.5, 1: 0.6, 2: 0.7}, "rankclip": {0: 0.6, 1: 0.6, 2: 0.9}},
        "relevance/alignment": {"clip": {0: 1.0, 1: 1.0, 2: 1.0}, "rankclip": {0: 0.9, 1: 1.1, 2: 0.8}},
        "relevance/modality_gap": {"clip": {0: 1.0, 1: 1.0, 2: 1.0}, "rankclip": {0: 2.0, 1: 2.0, 2: 2.0}},
    }
    paired = tool.compare_to_baseline(per_seed, "clip")["rankclip"]
    top1 = paired["metrics"]["zeroshot/top1"]
    assert top1["diff_per_seed"] == pytest.approx({"0": 0.1, "1": 0.0, "2": 0.2})
    assert top1["sign"]["better"] == 2 and top1["sign"]["worse"] == 0  # the tie is left out
    alignment = paired["metrics"]["relevance/alignment"]["sign"]
    assert (alignment["better"], alignment["worse"]) == (2, 1)  # lower alignment is better
    assert paired["metrics"]["relevance/modality_gap"]["sign"] is None  # no better direction
    assert paired["pooled_sign"] == {"better": 4, "worse": 1, "p": pytest.approx(2 * 6 / 32)}
    table = tool.summarise(per_seed, ["clip", "rankclip"])
    assert table["zeroshot/top1"]["rankclip"]["mean"] == pytest.approx(0.7)
    assert table["zeroshot/top1"]["rankclip"]["std"] == pytest.approx(math.sqrt((0.01 + 0.01 + 0.04) / 2))


def test_dataset_splits_of_both_layouts(tool, tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    info = {"train_spec": "train/synth-train-{000000..000019}.tar", "zeroshot_spec": "zeroshot/synth-zs-000000.tar",
            "classnames": "zeroshot/classnames.txt", "templates": "zeroshot/templates.txt", "seed": 0}  # fmt: skip
    (demo / "info.json").write_text(json.dumps(info))
    splits = tool.dataset_splits(demo)
    assert splits["train"] == str(demo / "train/synth-train-{000000..000019}.tar")
    assert splits["eval"] is None and splits["zeroshot"] == str(demo / "zeroshot/synth-zs-000000.tar")
    assert splits["classnames"] == str(demo / "zeroshot/classnames.txt")
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    nested = {"splits": {"train": {"spec": "train/scenes-train-{000000..000003}.tar"},
                         "eval": {"spec": "eval/scenes-eval-000000.tar"},
                         "zeroshot": {"spec": "zeroshot/scenes-zs-000000.tar"}}}  # fmt: skip
    (scenes / "info.json").write_text(json.dumps(nested))
    splits = tool.dataset_splits(scenes)
    assert splits["eval"] == str(scenes / "eval/scenes-eval-000000.tar")
    assert splits["templates"] == str(scenes / "zeroshot/templates.txt")  # beside the zero-shot shards


def test_sweeps_become_variants_on_top_of_rankclip(tool):
    args = tool.build_parser().parse_args(
        ["--variants", "clip,topk", "--top-k", "8", "--sweep", "loss.rank_weight_schedule=step,constant"]
    )
    assert tool.build_variants(args) == {
        "clip": ["--loss.ranking", "false"],
        "topk": ["--loss.impl", "top_k", "--loss.top_k", "8"],
        "rankclip+rank_weight_schedule=step": ["--loss.rank_weight_schedule", "step"],
        "rankclip+rank_weight_schedule=constant": ["--loss.rank_weight_schedule", "constant"],
    }
    with pytest.raises(SystemExit, match="not one of"):
        tool.build_variants(tool.build_parser().parse_args(["--variants", "clip,ranknet"]))


def compare(shards: Path, out: Path) -> subprocess.CompletedProcess:
    tiny = [f"{k[2:]}={v}" for k, v in zip(TINY_MODEL[::2], TINY_MODEL[1::2], strict=True)]
    sets = [*tiny, "optim.micro_batch_size=16", "logging.log_every=1", "data.num_workers=0", "eval.batch_size=32"]
    cmd = [sys.executable, str(TOOL), "--data", str(shards), "--variants", "clip,rankclip", "--seeds", "0,1",
           "--steps", "3", "--nproc", "1", "--out", str(out), *(a for s in sets for a in ("--set", s))]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=550, env=clean_launcher_env(), cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory) -> Path:
    """A tiny many-to-many scenes dataset (32 px), so that the relevance evaluation runs too."""
    from rankclip_ds.data.scenes import write_scene_dataset

    out = tmp_path_factory.mktemp("scenes")
    write_scene_dataset(out, num_train=256, num_eval=48, num_zeroshot=64, image_size=32, samples_per_shard=64)
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_tiny_comparison_resumes(tiny_scenes, tmp_path):
    shards = tiny_scenes
    out = tmp_path / "compare"
    proc = compare(shards, out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    table = summary["table"]
    assert {"zeroshot/top1", "zeroshot/top5", "retrieval/mean_recall", "retrieval/image_to_text_R@1"} <= set(table)
    assert {"relevance/i2t_ndcg@10", "relevance/t2t_spearman", "relevance/modality_gap"} <= set(table)
    for metric, row in table.items():
        for variant in ("clip", "rankclip"):
            task, name = metric.split("/")
            for seed in (0, 1):  # every per-seed value is the one the evaluation CLI wrote
                written = json.loads((out / "runs" / f"{variant}-s{seed}" / f"eval-{task}.json").read_text())
                assert row[variant]["per_seed"][str(seed)] == written[name], (metric, variant, seed)
            assert row[variant]["n"] == 2
        diffs = summary["paired"]["rankclip"]["metrics"][metric]["diff_per_seed"]
        assert diffs == pytest.approx({str(s): row["rankclip"]["per_seed"][str(s)] - row["clip"]["per_seed"][str(s)]
                                       for s in (0, 1)})  # fmt: skip
    # the table is printed: a header naming both variants, a mean ± sd row per metric, the paired section
    assert "| clip" in proc.stdout and "| rankclip" in proc.stdout
    assert any(line.startswith("zeroshot/top1") and "±" in line for line in proc.stdout.splitlines()), proc.stdout
    assert "rankclip − clip, paired over 2 seeds" in proc.stdout
    # the variants really differ: the learning curves read back from TensorBoard show w(t) = 0 for CLIP only
    for seed in (0, 1):
        clip_run = json.loads((out / "results" / f"clip-s{seed}.json").read_text())
        rank_run = json.loads((out / "results" / f"rankclip-s{seed}.json").read_text())
        assert [s for s, _ in clip_run["curves"]["train/clip"]] == [1, 2, 3]
        assert all(w == 0 for _, w in clip_run["curves"]["train/rank_weight"])
        assert rank_run["curves"]["train/rank_weight"][-1][1] > 0
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:
        image.verify()
    # a rerun trains and evaluates nothing again
    stamps = {p: p.stat().st_mtime_ns for p in [*(out / "results").glob("*.json"), *(out / "logs").glob("*.log")]}
    assert len(stamps) == 4 + 4 * 4  # results; a training log and three evaluation logs per run
    again = compare(shards, out)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert again.stdout.count("done before, skipped") == 4, again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no result rewritten, no log: nothing ran
    assert json.loads((out / "summary.json").read_text())["table"] == table
