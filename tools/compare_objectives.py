"""Train the same model with each objective variant on an equal budget, over several seeds, evaluate every run, and
compare: a table of mean ± standard deviation per variant and metric, a paired significance estimate of each
variant against the baseline (``clip``), JSON with every per-seed value, and a PNG of the learning curves.

    python tools/compare_objectives.py --data data/scenes --make-data scenes --seeds 0,1,2 --steps 120 \\
        --variants clip,rankclip,cross,inmodal --out runs/compare
    python tools/compare_objectives.py --variants clip,rankclip --sweep loss.rank_weight_max=1,2,4 \\
        --sweep loss.rank_weight_schedule=epoch,step,constant --out runs/ablation

Variants (``--variants``; each is ``--config`` plus these overrides, plus every ``--set KEY=VALUE``):

- ``clip``: ``--loss.ranking false`` (InfoNCE alone; the ranking terms are still computed and logged, not trained);
- ``rankclip``: the recipe's ranking loss as it is;
- ``cross``: ``--loss.lambda_in 0`` (cross-modal ranking term only); ``inmodal``: ``--loss.lambda_cross 0``;
- ``topk``: ``--loss.impl top_k --loss.top_k K`` (``--top-k``).

``--sweep KEY=V1,V2,...`` (repeatable) adds one variant per value, ``rankclip+KEY=V`` (the ranking variant with
``--KEY V``): the rank-weight ablations (``loss.rank_weight_schedule``, ``loss.rank_weight_max``,
``loss.lambda_cross``, ``loss.lambda_in``) or any other config key.

Equal budget: every run has the same config, steps, global batch (so the same number of samples) and, for a given
seed, the same ``run.seed``: the same initial weights and the same data order; only the objective differs. Each run
is the real entry point (``python -m torch.distributed.run --nproc_per_node N rankclip_ds/train.py --deepspeed ...``)
followed by the evaluation CLI on its export (``python -m rankclip_ds.evaluate zeroshot|retrieval|relevance``). Every
(variant, seed) writes ``OUT/results/<variant>-s<seed>.json`` (its metrics, curves and wall times); a rerun skips
what is finished, evaluates what is missing, and refuses a result made with other training arguments. Logs of each
run are in ``OUT/logs/``; ``OUT/summary.json`` holds the table, the paired statistics and every per-seed value;
``OUT/curves.png`` the training-loss terms per variant (mean over seeds, band ± one standard deviation).

Statistics, and what three seeds can and cannot say. For each variant and metric the difference to the baseline is
taken per seed (same seed = same initialisation and data order, so the pairing removes most seed-to-seed variance).

- Paired bootstrap: the mean difference is recomputed on resamples of the seeds (all n^n resamples when that is at
  most 50,000, else 20,000 random ones, seeded); ``ci95`` is the 2.5-97.5 % percentile interval and ``p_boot``
  twice the smaller fraction of resampled means on either side of 0. With 3 seeds there are only 10 distinct
  resamples: the interval is essentially [smallest, largest] observed difference and ``p_boot`` is 0 whenever the
  three differences share a sign. That says "every seed agreed", not "significant": the bootstrap cannot see the
  variance it was not shown.
- Exact sign test, per metric over seeds: with 3 seeds the smallest two-sided p-value is 2/2^3 = 0.25, so no single
  metric can reach p < 0.05 (5 seeds: 0.0625; 6 seeds: 0.031). Pooled over seeds × metrics (metrics with a known
  better direction only) the count is larger, but the metrics are strongly correlated (R@1, R@5, R@10 move
  together; image-to-text and text-to-image too), so the pooled p-value is optimistic: read it as a summary of
  consistency, not as a test with that many independent trials.

What can be concluded from 3 seeds: whether a difference is consistent in sign across seeds and how large it is
next to the seed-to-seed standard deviation. What cannot: a significance level, or that a difference holds at
another scale, dataset or budget. Use more seeds (``--seeds 0,1,2,3,4,5``) for a per-metric claim.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "clip": ["--loss.ranking", "false"],
    "rankclip": [],
    "cross": ["--loss.lambda_in", "0"],
    "inmodal": ["--loss.lambda_cross", "0"],
    "topk": None,  # needs K: built from --top-k
}
TASKS = ("zeroshot", "retrieval", "relevance")
CURVE_TAGS = ("train/loss", "train/clip", "train/cross", "train/inmodal", "train/rank_weight", "eval/zeroshot_top1")
HEADLINE = ("zeroshot/top1", "retrieval/mean_recall", "relevance/i2t_ndcg@10", "relevance/i2i_spearman")
EXACT_BOOTSTRAP_MAX = 50_000
RANDOM_BOOTSTRAP = 20_000


# ------------------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="clip,rankclip,cross,inmodal", help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--baseline", default="clip", help="the variant every other is compared with (paired by seed)")
    p.add_argument("--top-k", type=int, default=16, help="K of the topk variant")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="one variant per value")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated run.seed values (>= 3 for a table)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's)")
    p.add_argument("--config", default="configs/demo_cpu.yaml", help="the base recipe")
    p.add_argument("--deepspeed", default="ds_configs/zero2.json", help="the DeepSpeed JSON")
    p.add_argument("--nproc", type=int, default=None, help="ranks per run (default: the GPUs, or 2 on CPU)")
    p.add_argument("--data", default=None, help="dataset folder with info.json (default: data/<--make-data>)")
    p.add_argument("--make-data", choices=("scenes", "synthetic"), default=None, help="write --data if missing")
    p.add_argument("--num-train", type=int, default=20_000, help="training samples, when --make-data writes")
    p.add_argument("--num-eval", type=int, default=1_000, help="evaluation samples, when --make-data writes")
    p.add_argument("--num-zeroshot", type=int, default=800, help="zero-shot samples, when --make-data writes")
    p.add_argument("--image-size", type=int, default=64, help="image size, when --make-data writes")
    p.add_argument("--evals", default="auto", help=f"comma-separated of {TASKS}, or auto: those the data allows")
    p.add_argument("--out", default="runs/compare", help="output folder (runs, logs, results, summary, plot)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (default: export)")
    return p


def split_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def key_value(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or "." not in key:
        raise SystemExit(f"error: {flag} {text!r}: write {flag} section.key=value, e.g. {flag} loss.lambda_in=0.5")
    return key.removeprefix("--"), value


def build_variants(args: argparse.Namespace) -> dict[str, list[str]]:
    """``{variant name: its overrides}`` in the order asked: the named variants, then one per sweep value."""
    out: dict[str, list[str]] = {}
    for name in split_list(args.variants):
        if name not in VARIANTS:
            raise SystemExit(f"error: --variants {name!r} is not one of {list(VARIANTS)}")
        topk = ["--loss.impl", "top_k", "--loss.top_k", str(args.top_k)]
        out[name] = topk if name == "topk" else list(VARIANTS[name])
    for sweep in args.sweep:
        key, values = key_value(sweep, "--sweep")
        if not split_list(values):
            raise SystemExit(f"error: --sweep {sweep!r} has no values: write e.g. --sweep {key}=1,2,4")
        for value in split_list(values):
            name = f"rankclip+{key.split('.')[-1]}={value}".replace("/", "_")
            if name in out:  # two sweeps whose keys end alike (loss.x and optim.x) would share a name
                name = f"rankclip+{key}={value}".replace("/", "_")
            if name in out:
                raise SystemExit(f"error: --sweep {key}={value} is given twice; give each value once")
            out[name] = [f"--{key}", value]
    if not out:
        raise SystemExit("error: no variants: give --variants and/or --sweep")
    return out


# ------------------------------------------------------------------------------------------------------------ data
def prepare_data(args: argparse.Namespace) -> Path:
    """The dataset folder, written first when ``--make-data`` is given and it has no ``info.json``."""
    root = Path(args.data or f"data/{args.make_data or 'synthetic'}")
    if (root / "info.json").is_file():
        return root
    if not args.make_data:
        raise SystemExit(f"error: --data {root}: no info.json there. Fix: write it with --make-data scenes|synthetic")
    print(f"writing the {args.make_data} dataset to {root} ...", flush=True)
    size = args.image_size
    if args.make_data == "synthetic":
        from rankclip_ds.data.synthetic import write_synthetic_dataset

        write_synthetic_dataset(root, num_train=args.num_train, num_zeroshot=args.num_zeroshot, image_size=size)
        return root
    if importlib.util.find_spec("rankclip_ds.data.scenes") is None:
        raise SystemExit("error: --make-data scenes: rankclip_ds.data.scenes is not in this checkout; use synthetic")
    from rankclip_ds.data.scenes import write_scene_dataset

    counts = {"num_train": args.num_train, "num_eval": args.num_eval, "num_zeroshot": args.num_zeroshot}
    write_scene_dataset(root, **counts, image_size=size)
    return root


def _flatten(info: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in info.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dataset_splits(root: Path) -> dict[str, str | None]:
    """The splits of a dataset folder from its ``info.json`` (the synthetic demo's ``train_spec``/``zeroshot_spec``,
    or the scene benchmark's specs, under whatever keys name ``train``, ``eval`` and ``zeroshot``), as paths under
    ``root``; the zero-shot class names and templates beside the zero-shot shards unless the info names them."""
    flat = _flatten(json.loads((root / "info.json").read_text()))
    specs = {k.lower(): v for k, v in flat.items() if isinstance(v, str) and v.endswith(".tar")}
    found: dict[str, str | None] = {}
    for split, words in (("train", ("train",)), ("eval", ("eval",)), ("zeroshot", ("zeroshot", "zs"))):
        hits = sorted(v for k, v in specs.items() if any(w in k for w in words))
        found[split] = str(root / hits[0]) if hits else None
    if found["train"] is None:
        raise SystemExit(f"error: {root}/info.json names no training shards (a '*.tar' spec under a 'train' key)")
    for name in ("classnames", "templates"):
        named = [v for k, v in flat.items() if name in k.lower() and isinstance(v, str)]
        beside = Path(found["zeroshot"]).parent / f"{name}.txt" if found["zeroshot"] else None
        found[name] = str(root / named[0]) if named else (str(beside) if beside else None)
    return found


def relevance_available() -> bool:
    """Whether this checkout has the graded-relevance evaluation and its CLI subcommand."""
    if importlib.util.find_spec("rankclip_ds.evaluate.relevance") is None:
        return False
    from rankclip_ds.evaluate.__main__ import build_parser as eval_parser

    subparsers = [a for a in eval_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return any("relevance" in a.choices for a in subparsers)


def choose_tasks(requested: str, splits: dict) -> dict[str, str]:
    """``{task: the shards it runs on}``: zero-shot on the zero-shot split, retrieval and relevance on the eval split
    (retrieval falls back to the held-out zero-shot images, which have captions, when there is no eval split)."""
    data = {
        "zeroshot": splits["zeroshot"],
        "retrieval": splits["eval"] or splits["zeroshot"],
        "relevance": splits["eval"] if relevance_available() else None,
    }
    if requested == "auto":
        return {task: d for task, d in data.items() if d}
    tasks = {}
    for task in split_list(requested):
        if task not in TASKS:
            raise SystemExit(f"error: --evals {task!r} is not one of {list(TASKS)} (or auto)")
        if not data[task]:
            why = "no eval split with facts, or no relevance evaluation in this checkout"
            raise SystemExit(f"error: --evals {task}: this dataset/checkout cannot run it ({why})")
        tasks[task] = data[task]
    return tasks


# ------------------------------------------------------------------------------------------------------------ runs
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() or 2


def train_args(args: argparse.Namespace, splits: dict, name: str, seed: int, overrides: list[str]) -> list[str]:
    """The entry point's arguments for one run (everything but the launcher and its port): the base recipe, this
    run's folder and seed, the data, the budget, no periodic evaluation (the CLI evaluates the export), one
    checkpoint at the end, then the variant's overrides and every ``--set``."""
    out = Path(args.out).resolve()
    budget = []
    if args.steps is not None:
        warmup = max(1, args.steps // 10)
        budget = ["--schedule.total_steps", str(args.steps), "--schedule.epochs", "null"]
        budget += ["--schedule.warmup_steps", str(warmup)]
    user = [a for kv in args.set for a in (f"--{key_value(kv, '--set')[0]}", key_value(kv, "--set")[1])]
    return [
        "--deepspeed", str(ROOT / args.deepspeed), "--config", str(Path(args.config).resolve()),
        "--run.output_dir", str(out / "runs"), "--run.name", name, "--run.seed", str(seed),
        "--data.train_data", splits["train"], *budget,
        "--checkpoint.every_steps", "0", "--checkpoint.keep_last", "1",
        "--eval.every_steps", "0", "--eval.zeroshot_data", "null",
        *overrides, *user,
    ]  # fmt: skip


def input_digests(args: argparse.Namespace, data_root: Path) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of the files a run reads besides its arguments: the recipe, the DeepSpeed JSON
    and the dataset's info.json; a result made from other contents is not reused."""
    files = {"config": Path(args.config), "deepspeed": ROOT / args.deepspeed, "data": data_root / "info.json"}
    return {name: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for name, path in files.items()}


def run_logged(cmd: list[str], log: Path) -> float:
    """Runs ``cmd`` from the repository root with its output in ``log``; returns its wall time, or exits with the
    log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{tail}\nerror: exit code {proc.returncode} of: {' '.join(cmd)}\n(full log: {log})")
    return seconds


def train(args: argparse.Namespace, name: str, targs: list[str]) -> dict:
    """Trains one run from scratch (a partial run folder of an interrupted attempt is removed first); returns its
    wall time and learning curves."""
    run_dir = Path(args.out, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
    launcher += ["--master_port", str(free_port()), str(ROOT / "rankclip_ds" / "train.py")]
    seconds = run_logged(launcher + targs, Path(args.out, "logs", f"{name}.train.log"))
    if not (run_dir / "export" / "model.safetensors").is_file():
        raise SystemExit(f"error: {run_dir}/export has no model.safetensors after training (checkpoint.export off?)")
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"train_seconds": round(seconds, 1), "curves": read_curves(run_dir / "tb")}


def read_curves(tb_dir: Path) -> dict[str, list[list[float]]]:
    """``{tag: [[step, value], ...]}`` of the training-loss terms (and periodic zero-shot, if any) from the run's
    TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    return {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in CURVE_TAGS if tag in tags}


def evaluate(args: argparse.Namespace, name: str, task: str, data: str, splits: dict) -> tuple[dict, float]:
    """One evaluation CLI call on the run's export; returns its scalar metrics (``task/name``) and wall time."""
    from rankclip_ds.evaluate.report import scalar_summary

    export = Path(args.out, "runs", name, "export")
    output = Path(args.out, "runs", name, f"eval-{task}.json")
    cmd = [sys.executable, "-m", "rankclip_ds.evaluate", task, "--model", str(export), "--data", data]
    cmd += ["--output", str(output), "--no-progress"]
    if task == "zeroshot":
        cmd += ["--classnames", splits["classnames"], "--templates", splits["templates"]]
    seconds = run_logged(cmd, Path(args.out, "logs", f"{name}.eval-{task}.log"))
    return scalar_summary(json.loads(output.read_text()), prefix=task), seconds


def run_one(args: argparse.Namespace, ctx: dict, variant: str, seed: int) -> dict:
    """Trains (unless done) and evaluates (what is missing) one (variant, seed); returns its result record."""
    name = f"{variant}-s{seed}"
    path = Path(args.out, "results", f"{name}.json")
    targs = train_args(args, ctx["splits"], name, seed, ctx["variants"][variant])
    record = json.loads(path.read_text()) if path.is_file() else None
    if record is not None and (record["train_args"], record["inputs"]) != (targs, ctx["inputs"]):
        raise SystemExit(
            f"error: {path} was trained with other arguments or input files:\n  {' '.join(record['train_args'])}\n"
            f"  {record['inputs']}\nnow:\n  {' '.join(targs)}\n  {ctx['inputs']}\n"
            f"Fix: use another --out, or delete {path} to retrain it"
        )
    missing = [task for task in ctx["tasks"] if task not in record.get("evals", {})] if record else list(ctx["tasks"])
    if record is not None and not missing:
        return {**record, "skipped": True}
    if record is None:
        record = {"variant": variant, "seed": seed, "train_args": targs, "inputs": ctx["inputs"]}
        record.update(train(args, name, targs), evals={})
        write_json(path, record)
    for task in missing:
        metrics, seconds = evaluate(args, name, task, ctx["tasks"][task], ctx["splits"])
        record["evals"][task] = {"metrics": metrics, "seconds": round(seconds, 1)}
        write_json(path, record)
    return {**record, "skipped": False}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def metrics_of(record: dict) -> dict[str, float]:
    return {k: v for ev in record["evals"].values() for k, v in ev["metrics"].items()}


def progress_line(i: int, total: int, record: dict) -> str:
    metrics = metrics_of(record)
    head = "  ".join(f"{k} {metrics[k]:.4f}" for k in HEADLINE if k in metrics)
    if record["skipped"]:
        return f"[{i}/{total}] {record['variant']} seed {record['seed']}: done before, skipped | {head}"
    evals = sum(ev["seconds"] for ev in record["evals"].values())
    timing = f"train {record['train_seconds']:.0f} s, eval {evals:.0f} s"
    return f"[{i}/{total}] {record['variant']} seed {record['seed']}: {timing} | {head}"


# ------------------------------------------------------------------------------------------------------ statistics
def better_direction(metric: str) -> int:
    """+1 where higher is better (accuracy, recall, NDCG, mAP, rank correlation), -1 where lower is (alignment and
    uniformity of Wang & Isola: distances and log-potentials), 0 where neither is (the modality gap)."""
    name = metric.split("/")[-1]
    if "gap" in name:
        return 0
    return -1 if name.startswith(("alignment", "uniformity")) else 1


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def paired_bootstrap(diffs: list[float], seed: int = 0) -> dict:
    """The mean of paired differences, its 95 % percentile interval over resamples of the pairs (every resample
    when there are few, else random ones), and twice the smaller share of resampled means on either side of 0."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n < 2:  # one pair has no spread to resample
        return {"mean_diff": float(d.mean()), "ci95": None, "p_boot": None, "resamples": 0}
    if n**n <= EXACT_BOOTSTRAP_MAX:
        idx = np.array(list(itertools.product(range(n), repeat=n)), dtype=np.int64).reshape(-1, n)
    else:
        idx = np.random.default_rng(seed).integers(0, n, size=(RANDOM_BOOTSTRAP, n))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return {"mean_diff": float(d.mean()), "ci95": [float(lo), float(hi)], "p_boot": p, "resamples": len(means)}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test (ties left out): P(a count at least this far from n/2) under p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_to_baseline(per_seed: dict[str, dict[str, dict[int, float]]], baseline: str) -> dict:
    """For each variant but the baseline: per metric the per-seed differences, the paired bootstrap and the sign
    test over seeds; and the sign test pooled over seeds × metrics with a known better direction."""
    out = {}
    for variant in [v for v in next(iter(per_seed.values()), {}) if v != baseline]:
        rows, wins, losses = {}, 0, 0
        for metric, by_variant in per_seed.items():
            base, other = by_variant.get(baseline, {}), by_variant.get(variant, {})
            seeds = sorted(set(base) & set(other))
            if not seeds:
                continue
            diffs = [other[s] - base[s] for s in seeds]
            direction = better_direction(metric)
            w = sum(direction * d > 0 for d in diffs) if direction else 0
            lost = sum(direction * d < 0 for d in diffs) if direction else 0
            wins, losses = wins + w, losses + lost
            rows[metric] = {
                "diff_per_seed": dict(zip(map(str, seeds), diffs, strict=True)),
                **paired_bootstrap(diffs),
                "sign": {"better": w, "worse": lost, "p": sign_test(w, lost)} if direction else None,
            }
        pooled = {"better": wins, "worse": losses, "p": sign_test(wins, losses)}
        out[variant] = {"metrics": rows, "pooled_sign": pooled}
    return out


def collect(records: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """``{metric: {variant: {seed: value}}}``, metrics in first-seen order."""
    per_seed: dict[str, dict[str, dict[int, float]]] = {}
    for r in records:
        for metric, value in metrics_of(r).items():
            per_seed.setdefault(metric, {}).setdefault(r["variant"], {})[r["seed"]] = value
    return per_seed


def summarise(per_seed: dict, variants: list[str]) -> dict:
    """``{metric: {variant: {mean, std, n, per_seed}}}``."""
    table = {}
    for metric, by_variant in per_seed.items():
        table[metric] = {}
        for v in variants:
            if v in by_variant:
                values = [by_variant[v][s] for s in sorted(by_variant[v])]
                mean, std = mean_std(values)
                seeds = {str(s): by_variant[v][s] for s in sorted(by_variant[v])}
                table[metric][v] = {"mean": mean, "std": std, "n": len(values), "per_seed": seeds}
    return table


# ----------------------------------------------------------------------------------------------------------- table
def format_table(table: dict, paired: dict, variants: list[str], baseline: str) -> str:
    """Mean ± sd per metric (rows) and variant (columns), then the paired differences against the baseline."""
    width = max([len(m) for m in table] + [6])
    cols = [max(len(v), 17) for v in variants]
    lines = ["metric".ljust(width) + " | " + " | ".join(v.ljust(c) for v, c in zip(variants, cols, strict=True))]
    lines.append("-" * len(lines[0]))
    for metric, row in table.items():
        cells = [f"{row[v]['mean']:.4f} ± {row[v]['std']:.4f}" if v in row else "-" for v in variants]
        lines.append(metric.ljust(width) + " | " + " | ".join(c.ljust(w) for c, w in zip(cells, cols, strict=True)))
    for variant, result in paired.items():
        seeds = max((len(r["diff_per_seed"]) for r in result["metrics"].values()), default=0)
        lines += ["", f"{variant} − {baseline}, paired over {seeds} seeds: mean Δ [95% bootstrap CI] p_boot | sign"]
        for metric, r in result["metrics"].items():
            sign = f"{r['sign']['better']}+/{r['sign']['worse']}- p={r['sign']['p']:.3g}" if r["sign"] else "n/a"
            delta = f"{r['mean_diff']:+.4f} (one seed: no interval)"
            if r["ci95"] is not None:
                delta = f"{r['mean_diff']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] p={r['p_boot']:.3g}"
            lines.append(f"  {metric.ljust(width)}  {delta.ljust(40)} | {sign}")
        pooled = result["pooled_sign"]
        lines.append(
            f"  pooled sign test over seeds × metrics: better {pooled['better']}, worse {pooled['worse']}, "
            f"p={pooled['p']:.3g} (correlated metrics: optimistic)"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ plot
def mean_band(series: list[list[list[float]]]) -> tuple[list[float], list[float], list[float]]:
    """Steps every seed logged, with the mean and the standard deviation over seeds at each."""
    steps = sorted(set.intersection(*({s for s, _ in one} for one in series)))
    values = [dict((s, v) for s, v in one) for one in series]
    stats = [mean_std([vals[s] for vals in values]) for s in steps]
    return steps, [m for m, _ in stats], [sd for _, sd in stats]


def plot_curves(records: list[dict], variants: list[str], path: Path) -> Path | None:
    """One panel per logged term, one line per variant (mean over seeds, band ± one sd); ``None`` without
    matplotlib (``pip install -r requirements-bench.txt``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-bench.txt): no plot written")
        return None
    tags = [t for t in CURVE_TAGS if any(t in r["curves"] for r in records)]
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.6), squeeze=False)
    for ax, tag in zip(axes[0], tags, strict=True):
        for variant in variants:
            series = [r["curves"][tag] for r in records if r["variant"] == variant and r["curves"].get(tag)]
            if not series:
                continue
            steps, mean, sd = mean_band(series)
            line = ax.plot(steps, mean, label=f"{variant} (n={len(series)})")[0]
            low, high = [m - s for m, s in zip(mean, sd, strict=True)], [m + s for m, s in zip(mean, sd, strict=True)]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("training curves: mean over seeds, band ± 1 sd", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    variants = build_variants(args)
    seeds = [int(s) for s in split_list(args.seeds)]
    args.nproc = args.nproc or default_nproc()
    root = prepare_data(args)
    splits = dataset_splits(root)
    ctx = {"splits": splits, "variants": variants, "tasks": choose_tasks(args.evals, splits)}
    ctx["inputs"] = input_digests(args, root)
    baseline = args.baseline if args.baseline in variants else next(iter(variants))
    print(f"{len(variants)} variants × {len(seeds)} seeds on {root} ({args.nproc} ranks per run); "
          f"evaluations: {', '.join(ctx['tasks'])}; baseline {baseline}", flush=True)  # fmt: skip
    records, jobs = [], [(v, s) for s in seeds for v in variants]
    for i, (variant, seed) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {variant} seed {seed} ...", flush=True)
        records.append(run_one(args, ctx, variant, seed))
        print(progress_line(i, len(jobs), records[-1]), flush=True)
    ctx["command"] = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
    return report(args, records, list(variants), baseline, ctx)


def report(args: argparse.Namespace, records: list[dict], variants: list[str], baseline: str, ctx: dict) -> dict:
    """Prints the table, writes ``summary.json`` and ``curves.png``; returns the summary."""
    per_seed = collect(records)
    table = summarise(per_seed, variants)
    paired = compare_to_baseline(
        {m: {v: per_seed[m][v] for v in variants if v in per_seed[m]} for m in per_seed}, baseline
    )
    print(format_table(table, paired, variants, baseline))
    png = plot_curves(records, variants, Path(args.out, "curves.png"))
    summary = {
        "command": ctx["command"],
        "baseline": baseline,
        "variants": ctx["variants"],
        "data": ctx["splits"],
        "evaluations": ctx["tasks"],
        "table": table,
        "paired": paired,
        "runs": [{k: r[k] for k in ("variant", "seed", "train_seconds", "skipped")} for r in records],
        "curves_png": str(png) if png else None,
    }
    write_json(Path(args.out, "summary.json"), summary)
    print(f"wrote {Path(args.out, 'summary.json')}" + (f" and {png}" if png else ""))
    return summary


if __name__ == "__main__":
    main()
