"""Runs the real Trainer (real DeepSpeed engine, real distributed loss) on a fixed in-memory dataset, under a real
launcher (torchrun or deepspeed), and records what the tests compare.

    torchrun --nproc_per_node 2 tests/_train_harness.py SPEC.json

SPEC (JSON): ``overrides`` (config overrides list), ``ds`` (DeepSpeed JSON dict), ``out`` (folder for results),
``pool`` (samples in the fixed dataset), ``signal`` (send a real signal to a rank after a step), ``fault`` (storage
faults from a step on: ``{"after_step": k, "kind": "fsize", "bytes": n}`` caps the size of any file this process
writes (RLIMIT_FSIZE: writes beyond it fail with EFBIG, as on a full disk), ``"kind": "disk_free"`` makes the
free-space query report ``bytes``), ``nan`` (``{"steps": [..], "rank": r}``: that rank's first micro-batch of those
steps gets NaN images, so the global loss is non-finite), ``push_logit_scale`` (``{"step": k, "value": v}``: before
step k, the optimizer's fp32 master copy of the logit scale and the module's copy are set to v, as a scale drifting
past ``model.max_logit_scale`` would be; each rank then also records the master's final value, read through
DeepSpeed's ``safe_get_full_fp32_param``, and whether the parameter is partitioned by ZeRO-3). Nothing here calls
the clamp: what the records show is what the trainer's own steps did. ``lock_report`` (true): rank 0 saves the initial
parameters (``initial.pt``, gathered before the first step), each record carries the learning rate of every optimizer
group (``group_lrs``, as the engine steps them), and each rank records which parameters DeepSpeed's ZeRO optimizer owns
(``optimizer_owned``, names) and how many elements its Adam state holds on this rank (``optimizer_state_numel``,
``exp_avg`` of the rank's fp32 partitions, padding included) and the padding (``optimizer_padding``, ZeRO-1/2).
A run that ends in a ``TrainingError`` writes ``{"error": message}`` and exits with 1.
Each rank writes ``<out>/rank<r>.json`` with the per-step scalars; rank 0 also writes the embeddings of a fixed
probe batch (``probe_emb.pt``) computed by the live model after training.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from rankclip_ds.config import load_config
from rankclip_ds.dist import read_dist_env, setup_logging
from rankclip_ds.resolved import resolve_run
from rankclip_ds.trainer import Trainer, TrainingError

SEQ_LEN = 12
VOCAB_LOW, VOCAB_HIGH = 1000, 5000


def make_pool(n: int, image_size: int, seed: int = 1234) -> dict[str, torch.Tensor]:
    """A fixed dataset of ``n`` (image, caption tokens) pairs, identical in every process."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    ids = torch.randint(VOCAB_LOW, VOCAB_HIGH, (n, SEQ_LEN), generator=g)
    lengths = torch.randint(4, SEQ_LEN + 1, (n,), generator=g)
    mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 101  # [CLS]
    ids = ids * mask
    return {"image": images, "input_ids": ids, "attention_mask": mask}


class FixedBatches:
    """Deterministic batches: step s's global batch is the same set of samples whatever the world size, micro
    batch or accumulation split (micro-batch t of rank r in step s holds global rows ((s·W + r)·A + t)·b …)."""

    def __init__(self, pool: dict[str, torch.Tensor], rank: int, world: int, micro: int, accum: int) -> None:
        self.pool, self.rank, self.world, self.micro, self.accum = pool, rank, world, micro, accum
        n = len(pool["image"])
        self.global_batch = micro * accum * world
        self.steps_per_epoch = n // self.global_batch
        self.start = 0

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accum

    def resume(self, epoch: int, *, samples: int = 0, state=None) -> None:
        self.start = samples // self.micro

    def skip_counts(self) -> dict[str, int]:
        return {}

    def epoch_iter(self, epoch: int):
        perm = torch.randperm(len(self.pool["image"]), generator=torch.Generator().manual_seed(epoch))
        start, self.start = self.start, 0
        for j in range(start, len(self)):
            s, t = divmod(j, self.accum)
            first = ((s * self.world + self.rank) * self.accum + t) * self.micro
            rows = perm[first : first + self.micro]
            yield {k: v[rows] for k, v in self.pool.items()}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, spec["overrides"])
    info = read_dist_env()
    setup_logging(info, "INFO")
    image_size = cfg.model.image.image_size
    pool = make_pool(spec.get("pool", 64), image_size)
    accum = cfg.optim.grad_accum_steps

    def factory(rank, world, micro):
        return FixedBatches(pool, rank, world, micro, accum)

    trainer = Trainer(cfg, resolve_run(cfg, spec["ds"], info.world_size), info, data_factory=factory)
    lock_report = spec.get("lock_report", False)
    if lock_report:
        initial = trainer.unpartitioned_model()  # a collective under ZeRO-3: every rank calls it
        if info.is_main:
            torch.save({k: v.detach().clone() for k, v in initial.named_parameters()}, out / "initial.pt")
    records = []
    step_fn = trainer.train_step

    send = spec.get("signal")  # {"rank": r, "step": k, "name": "SIGUSR1"}: deliver a real signal to that rank

    nan = spec.get("nan")
    push = spec.get("push_logit_scale")

    def recording_step(micro_batches):
        if push and trainer.step + 1 == push["step"]:
            push_logit_scale(trainer, push["value"])
        if nan and info.rank == nan["rank"] and trainer.step + 1 in nan["steps"]:
            micro_batches[0] = {**micro_batches[0], "image": torch.full_like(micro_batches[0]["image"], float("nan"))}
        lrs_before = [float(g["lr"]) for g in trainer.engine.optimizer.param_groups]
        result = step_fn(micro_batches)
        scalars = {k: float(v) for k, v in result.items()}  # the loss components are device tensors
        records.append({"step": trainer.step + 1, **scalars, "logit_scale_raw": trainer.logit_scale_value()})
        if lock_report:  # the rates this step used (the scheduler steps after the optimizer, inside engine.step)
            records[-1]["group_lrs"] = lrs_before
        if send and info.rank == send["rank"] and trainer.step + 1 == send["step"]:
            os.kill(os.getpid(), getattr(signal, send["name"]))
        return result

    fault = spec.get("fault")

    def faulty_step(micro_batches):
        result = recording_step(micro_batches)
        if trainer.step + 1 == fault["after_step"] and fault.get("rank", info.rank) == info.rank:
            inject_storage_fault(fault)
        return result

    trainer.train_step = faulty_step if fault else recording_step
    try:
        summary = trainer.train()
    except TrainingError as exc:
        (out / f"rank{info.rank}.json").write_text(
            json.dumps({"error": str(exc), "records": records, "nonfinite_total": trainer.nonfinite.total})
        )
        trainer.metrics.close()
        sys.exit(1)
    result = {"records": records, "summary": summary, "world": info.world_size,
              "nonfinite_total": trainer.nonfinite.total,
              "skipped_steps": int(getattr(trainer.engine, "skipped_steps", 0))}  # fmt: skip

    probe = {k: v[:8] for k, v in pool.items()}
    model = trainer.unpartitioned_model()  # a collective under ZeRO-3: every rank calls it
    with torch.no_grad():
        emb_img = model.encode_image(probe["image"])
        emb_txt = model.encode_text(probe["input_ids"], probe["attention_mask"])
    live = {k: v.detach().clone() for k, v in model.named_parameters()}
    if info.is_main:
        torch.save({"image": emb_img, "text": emb_txt, "probe": probe, "live": live}, out / "probe_emb.pt")

    if lock_report:
        result.update(optimizer_report(trainer))
    if push:
        from deepspeed.utils import safe_get_full_fp32_param

        p = trainer.model.logit_scale
        result["master_logit_scale"] = float(safe_get_full_fp32_param(p))  # a collective
        result["logit_scale_partitioned"] = bool(getattr(p, "ds_numel", None)) and p.numel() == 0
    trainer.close()
    (out / f"rank{info.rank}.json").write_text(json.dumps(result, default=str))
    if summary["stopped_by_signal"]:
        sys.exit(trainer_exit_code())


def push_logit_scale(trainer: Trainer, value: float) -> None:
    """Set the logit scale's fp32 master (DeepSpeed's own API, any ZeRO stage) and the module's copy to ``value``."""
    import deepspeed
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

    p = trainer.model.logit_scale
    if hasattr(p, "ds_id"):  # ZeRO-3: each rank's partition (the full setter fails for a parameter of 1 element)
        safe_set_local_fp32_param(p, torch.full_like(safe_get_local_fp32_param(p), value))
    else:
        safe_set_full_fp32_param(p, torch.full((1,), value, device=trainer.device))
    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        if trainer.info.rank == 0 or trainer.run.zero_stage < 3:
            p.data.fill_(value)


def optimizer_report(trainer: Trainer) -> dict:
    """What DeepSpeed's ZeRO optimizer holds on this rank: the parameters it owns (by name), the elements of its
    Adam first moments, and its flat groups' padding (ZeRO-1/2)."""
    opt = trainer.engine.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    zero12 = hasattr(opt, "bit16_groups")
    groups = opt.bit16_groups if zero12 else opt.fp16_groups  # ZeRO-1/2, ZeRO-3
    owned = sorted(names[id(p)] for group in groups for p in group)
    state = opt.optimizer.state  # the torch AdamW stepping the fp32 partitions
    numel = sum(s["exp_avg"].numel() for s in state.values() if "exp_avg" in s)
    return {"optimizer_owned": owned, "optimizer_state_numel": numel,
            "optimizer_padding": int(sum(opt.groups_padding)) if zero12 else 0}  # fmt: skip


def inject_storage_fault(fault: dict) -> None:
    if fault["kind"] == "fsize":
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fault["bytes"], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    elif fault["kind"] == "disk_free":
        import shutil

        import rankclip_ds.trainer.checkpoint as ckpt

        usage = shutil.disk_usage("/")
        ckpt.shutil.disk_usage = lambda path: usage._replace(free=fault["bytes"])  # type: ignore[attr-defined]
    else:
        raise ValueError(f"unknown fault {fault}")


def trainer_exit_code() -> int:
    from rankclip_ds.trainer import REQUEUE_EXIT_CODE

    return REQUEUE_EXIT_CODE


if __name__ == "__main__":
    main()
