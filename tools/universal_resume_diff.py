#!/usr/bin/env python
"""Measures what a resume through DeepSpeed's universal checkpoint changes, on the tiny CPU model of
``tests/test_trainer.py`` (the real Trainer and engines, the fixed in-memory data of ``tests/_train_harness.py``).

    python tools/universal_resume_diff.py --stages 2 3 --json /tmp/universal_diff.json [--without-fix]

For each ZeRO stage it runs the 2-rank source (6 steps, checkpoint at step 3), resumes that checkpoint on 1 rank
(universal), on 2 ranks through the universal form (forced) and natively, and runs the whole thing uninterrupted on
1 rank. Every run dumps, just before step 4, the optimizer's view of every parameter (fp32 master, Adam ``exp_avg``
/ ``exp_avg_sq``, gathered whole by DeepSpeed's ``safe_get_full_*``), the Adam step counts, the optimizer groups'
settings and the scheduler state. The table compares each run with the 2-rank source: those tensors (max absolute
difference), the group settings that differ, and the losses of steps 4-6 (max relative difference).
``--without-fix`` turns off the trainer's repair of ZeRO-3's universal load (the Adam step tensors and the group
settings: ``rankclip_ds/trainer/universal.py::repair_zero3_universal_load``) to show what DeepSpeed alone leaves.
Runs one multi-process job at a time; about a minute per run on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_trainer import TINY, ZERO  # noqa: E402  (the tiny run of the resume tests, dropout off)

DUMP_BEFORE_STEP = 4


# ---------------------------------------------------------------------------------------------- worker (torchrun)
def optimizer_dump(trainer) -> dict:
    """The optimizer's state of every parameter, whole (a collective under ZeRO-3: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero3 = trainer.run.zero_stage == 3
    tensors = {}
    for name, p in trainer.model.named_parameters():
        tensors[f"{name}/fp32"] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            full = safe_get_full_optimizer_state(p, key) if zero3 else full_state_zero12(trainer, p, key)
            tensors[f"{name}/{key}"] = full.detach().float().cpu().clone()
    opt = trainer.base_optimizer
    steps = sorted({float(s["step"]) for s in opt.state.values() if "step" in s})
    step_objects = len({id(s["step"]) for s in opt.state.values() if "step" in s})  # < states: one tensor shared
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    sched = {k: v for k, v in trainer.engine.lr_scheduler.state_dict().items() if k != "lr_lambdas"}
    return {"tensors": tensors, "adam_steps": steps, "groups": groups, "scheduler": sched,
            "global_steps": int(trainer.engine.global_steps),
            "step_objects": [step_objects, sum("step" in st for st in opt.state.values())]}  # fmt: skip


def full_state_zero12(trainer, p: torch.Tensor, key: str) -> torch.Tensor:
    """ZeRO-1/2: one parameter's Adam state, whole, from each rank's flat fp32 partition (a collective).
    DeepSpeed's ``safe_get_full_optimizer_state`` reads views linked when the engine was built, before Adam made
    its state, and fails on a run that did not load a checkpoint."""
    import torch.distributed as dist

    opt = trainer.engine.optimizer
    full = torch.zeros(p.numel(), dtype=torch.float32)
    mapping = p._hp_mapping
    if mapping is not None:
        flat = opt.single_partition_of_fp32_groups[mapping.param_group_index]
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        full.narrow(0, lp.start, lp.numel).copy_(opt.optimizer.state[flat][key].narrow(0, hp.start, hp.numel))
    dist.all_reduce(full, group=opt.dp_process_group)
    return full.view(p.shape)


def worker(spec_path: str) -> None:
    import _train_harness as harness

    from rankclip_ds.config import load_config
    from rankclip_ds.dist import read_dist_env, setup_logging
    from rankclip_ds.resolved import resolve_run
    from rankclip_ds.trainer import Trainer
    from rankclip_ds.trainer import checkpoint as ckpt_mod

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    cfg = load_config(None, spec["overrides"])
    info = read_dist_env()
    setup_logging(info, "WARNING")
    if spec.get("force_universal"):  # the universal path on the checkpoint's own world size
        plain = ckpt_mod.CheckpointManager.load_target

        def forced(self, path, **kw):
            return dataclasses.replace(plain(self, path, **kw), universal=True)

        ckpt_mod.CheckpointManager.load_target = forced
    if spec.get("without_fix"):
        from rankclip_ds.trainer import universal

        universal.repair_zero3_universal_load = lambda engine, target: None  # checkpoint.load imports it when called
    pool = harness.make_pool(64, cfg.model.image.image_size)

    def factory(rank, world, micro):
        return harness.FixedBatches(pool, rank, world, micro, cfg.optim.grad_accum_steps)

    trainer = Trainer(cfg, resolve_run(cfg, spec["ds"], info.world_size), info, data_factory=factory)
    records, step_fn = [], trainer.train_step

    def recording_step(micro_batches):
        if trainer.step + 1 == DUMP_BEFORE_STEP:
            dump = optimizer_dump(trainer)
            if info.is_main:
                torch.save(dump, out / "dump.pt")
        result = step_fn(micro_batches)
        scale = trainer.logit_scale_value()
        adam = sorted({float(s["step"]) for s in trainer.base_optimizer.state.values() if "step" in s})
        records.append({"step": trainer.step + 1, "loss": float(result["loss"]), "logit_scale": scale,
                        "adam_steps": adam})  # fmt: skip
        return result

    trainer.train_step = recording_step
    summary = trainer.train()
    trainer.close()
    if info.is_main:
        (out / "records.json").write_text(json.dumps({"records": records, "run_dir": summary["run_dir"]}))


# ---------------------------------------------------------------------------------------------- driver
def launch(out: Path, overrides: list[str], stage: int, nproc: int, **extra) -> dict:
    """One run under torchrun (reused when ``out`` holds a finished one); its losses, logit scales and dump."""
    if not (out / "records.json").is_file():
        if not extra.pop("keep_folder", False):  # a resume's folder holds the copied checkpoint
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        run_worker(out, overrides, stage, nproc, **extra)
    run = json.loads((out / "records.json").read_text())
    records = run["records"]
    return {"losses": {r["step"]: r["loss"] for r in records}, "run_dir": Path(run["run_dir"]),
            "logit_scale": {r["step"]: r["logit_scale"] for r in records},
            "final_adam_steps": records[-1].get("adam_steps"),
            "dump": torch.load(out / "dump.pt", weights_only=False)}  # fmt: skip


def run_worker(out: Path, overrides: list[str], stage: int, nproc: int, **extra) -> None:
    spec = {"overrides": [*TINY, "--run.output_dir", str(out / "runs"), *overrides],
            "ds": {"zero_optimization": ZERO[stage]}, "out": str(out), **extra}  # fmt: skip
    (out / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 1000), __file__, "--worker", str(out / "spec.json")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"run {out} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def resume(source: dict, out: Path, stage: int, nproc: int, micro: int, overrides: list[str], **extra) -> dict:
    """Resume ``source``'s step-3 checkpoint (copied, without any universal form) on ``nproc`` ranks."""
    if not (out / "records.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        src = source["run_dir"] / "checkpoints" / "step_00000003"
        dst = out / "shared" / source["run_dir"].name / "checkpoints" / src.name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("universal*"))
    args = [*overrides, "--optim.micro_batch_size", str(micro), "--checkpoint.resume", "latest",
            "--run.output_dir", str(out / "shared")]  # fmt: skip
    return launch(out, args, stage, nproc, keep_folder=True, **extra)


def compare(run: dict, ref: dict) -> dict:
    """``run`` against ``ref``: max |Δ| per tensor kind (and the worst tensor) just before step 4, Adam steps, the
    group settings that differ, the scheduler, the max relative loss difference of steps 1-3 and 4-6 (those both
    ran) and the max |Δ| of the logit scale after steps 4-6."""
    a, b = run["dump"], ref["dump"]
    kinds = {}
    for key, t in a["tensors"].items():
        name, kind = key.rsplit("/", 1)
        diff = (t - b["tensors"][key]).abs().max().item() if t.numel() else 0.0
        if diff > kinds.get(kind, (-1.0, ""))[0]:
            kinds[kind] = (diff, name)
    pairs = zip(a["groups"], b["groups"], strict=True)
    group_diffs = [f"group {i} {k}: {g.get(k)!r} vs {h.get(k)!r}" for i, (g, h) in enumerate(pairs)
                   for k in sorted(set(g) | set(h)) if g.get(k) != h.get(k)]  # fmt: skip

    def rel(steps):
        both = [(run["losses"][s], ref["losses"][s]) for s in steps if s in run["losses"]]
        return max((abs(x - y) / abs(y) for x, y in both), default=None)

    scale = max(abs(run["logit_scale"][s] - ref["logit_scale"][s]) for s in (4, 5, 6))
    return {"max_abs": {k: v[0] for k, v in kinds.items()}, "worst": {k: v[1] for k, v in kinds.items()},
            "adam_steps": [a["adam_steps"], b["adam_steps"]], "group_diffs": group_diffs,
            "scheduler_same": a["scheduler"] == b["scheduler"], "loss_rel_1_3": rel([1, 2, 3]),
            "loss_rel_4_6": rel([4, 5, 6]), "logit_scale_abs_4_6": scale,
            "step_tensors_distinct_of_states": a.get("step_objects"),
            "adam_steps_after_step_6": [run["final_adam_steps"], ref["final_adam_steps"]]}  # fmt: skip


def experiments(stage: int, base: Path, without_fix: bool, overrides: list[str]) -> dict[str, dict]:
    src = launch(base / f"z{stage}_src", [*overrides, "--optim.micro_batch_size", "8"], stage, 2)
    fix = {"without_fix": without_fix}
    runs = {
        "2->1 universal": resume(src, base / f"z{stage}_2to1", stage, 1, 16, overrides, **fix),
        "2->2 universal (forced)": resume(
            src, base / f"z{stage}_2to2u", stage, 2, 8, overrides, force_universal=True, **fix
        ),
        "2->2 native": resume(src, base / f"z{stage}_2to2n", stage, 2, 8, overrides),
        "1 rank uninterrupted": launch(
            base / f"z{stage}_1rank", [*overrides, "--optim.micro_batch_size", "16"], stage, 1
        ),
    }
    return {name: compare(run, src) for name, run in runs.items()}


def table(results: dict[int, dict[str, dict]]) -> str:
    lines = ["| stage | run vs 2-rank source | loss rel. steps 1-3 | loss rel. steps 4-6 | logit scale abs 4-6 | "
             "max abs fp32 | max abs exp_avg | max abs exp_avg_sq | Adam step before 4 / after 6 | "
             "group settings that differ |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def fmt(v):
        return "-" if v is None else f"{v:.2e}"

    for stage, rows in results.items():
        for name, c in rows.items():
            m = c["max_abs"]
            cells = [str(stage), name, fmt(c["loss_rel_1_3"]), fmt(c["loss_rel_4_6"]), fmt(c["logit_scale_abs_4_6"]),
                     fmt(m["fp32"]), fmt(m["exp_avg"]), fmt(m["exp_avg_sq"]),
                     f"{c['adam_steps'][0]} vs {c['adam_steps'][1]} / {c['adam_steps_after_step_6'][0]} vs "
                     f"{c['adam_steps_after_step_6'][1]}",
                     "; ".join(c["group_diffs"]) or "none"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[1, 2, 3])
    parser.add_argument("--json", type=Path, help="write the comparison here")
    parser.add_argument("--without-fix", action="store_true", help="DeepSpeed's ZeRO-3 universal load alone")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it; its finished runs are reused")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more config overrides, every run")
    args = parser.parse_args()
    base = (args.keep or Path(tempfile.mkdtemp(prefix="universal_diff_"))) / ("nofix" if args.without_fix else "fix")
    results = {}
    for stage in args.stages:  # printed (and written) as each stage finishes
        results[stage] = experiments(stage, base, args.without_fix, args.extra)
        print(table({stage: results[stage]}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(base.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
