"""One optimizer step: the forward passes, the distributed RankCLIP loss, backward and DeepSpeed's step, with
plain gradient accumulation or gradient caching, and the non-finite-loss policy."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..config import LossConfig
from ..losses import rankclip_loss
from .errors import TrainingError

__all__ = ["NonFiniteLossError", "StepRunner"]

log = logging.getLogger("rankclip_ds.train")

COMPONENTS = ("loss", "clip", "cross", "inmodal")


class NonFiniteLossError(TrainingError):
    """Too many consecutive non-finite losses: the run stops instead of training on garbage."""


class StepRunner:
    """Runs optimizer steps on a DeepSpeed ``engine`` whose module returns ``(image_emb, text_emb, logit_scale)``.

    Gradient contract: ``rankclip_loss`` gives each rank the gradient of the *global* loss for its embeddings and
    its share of the logit-scale gradient; DeepSpeed averages gradients over ranks, so every backward is scaled by
    the world size.

    Host reads: the loss runs without any (every rank's rows are known: ``micro_batch_size``, or all accumulated
    micro-batches with gradient caching, passed as ``block_sizes``); the step reads one flag per loss call (is the
    loss finite? It decides what is back-propagated) and returns its loss components as device tensors, read by
    the trainer once per logging window.
    """

    def __init__(
        self,
        engine,
        loss_cfg: LossConfig,
        *,
        group,
        world_size: int,
        device: torch.device,
        dtype: torch.dtype,
        micro_batch_size: int,
        max_logit_scale: float = 100.0,
        profile_loss: bool = False,
        max_nonfinite_streak: int = 5,
        tracker=None,
    ) -> None:
        self.engine, self.loss_cfg, self.group = engine, loss_cfg, group
        self.world_size, self.device, self.dtype = world_size, device, dtype
        self.micro_batch_size, self.max_logit_scale = micro_batch_size, max_logit_scale
        self.profile_loss = profile_loss
        self.loss_seconds = 0.0  # time inside the loss since the last read (profile_loss)
        self.nonfinite_total = 0
        self.nonfinite_streak = 0  # optimizer steps in a row with a non-finite loss
        self.max_nonfinite_streak = max_nonfinite_streak
        self.last_bad: list[str] = []
        self.step = 0  # the optimizer step being run, for messages
        self.tracker = tracker  # watchdog.CollectiveTracker: names the phase a collective timeout happens in
        # DeepSpeed's ZeRO optimizers (every stage, every precision) discard an optimizer step whose gradient is not
        # finite, as for an fp16 overflow: no parameter, moment or schedule update, counted in skipped_steps.
        self.can_discard = hasattr(engine.optimizer, "overflow")

    def _phase(self, name: str) -> None:
        if self.tracker is not None:
            self.tracker.enter(name)

    def run(
        self, micro_batches: list[dict], rank_weight: float, *, grad_cache: bool, step: int
    ) -> dict[str, torch.Tensor]:
        """One optimizer step over the micro-batches; returns the step's loss components (global values, 0-d
        tensors on the device: reading them is left to the caller's logging)."""
        self.step = step
        if grad_cache:
            return self._grad_cache_step(micro_batches, rank_weight)
        return self._accumulation_step(micro_batches, rank_weight)

    def take_loss_seconds(self) -> float:
        seconds, self.loss_seconds = self.loss_seconds, 0.0
        return seconds

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Non-blocking: from pinned host memory (data.pin_memory) the copies run on the stream without stalling
        # the host; kernels queued after them on that stream wait for them. From pageable memory they are plain
        # synchronous copies, and on the CPU no-ops.
        images, ids, mask = (
            batch[k].to(self.device, non_blocking=True) for k in ("image", "input_ids", "attention_mask")
        )
        if images.is_floating_point():
            images = images.to(self.dtype)
        return images, ids, mask

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _loss(self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, w: float, rows: int) -> dict:
        if not self.profile_loss:
            return self._loss_call(img, txt, logit_scale, w, rows)
        # The loss forms its gradients in its forward (its backward only scales them), so timing the call
        # measures its whole cost.
        self._sync()
        t0 = time.perf_counter()
        out = self._loss_call(img, txt, logit_scale, w, rows)
        self._sync()
        self.loss_seconds += time.perf_counter() - t0
        return out

    def _loss_call(self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, w: float, rows: int) -> dict:
        """``rows``: every rank's local rows (equal on all ranks: the loader yields only full batches). A batch of
        another size on this rank is refused by the loss with a message, instead of a hang in the exchange."""
        lc = self.loss_cfg
        return rankclip_loss(
            img,
            txt,
            logit_scale,
            rank_weight=w,
            lambda_cross=lc.lambda_cross,
            lambda_in=lc.lambda_in,
            impl=lc.impl,
            comm=lc.comm,
            chunk_size=lc.chunk_size,
            top_k=lc.top_k,
            position_weighting=lc.position_weighting,
            group=self.group,
            max_logit_scale=self.max_logit_scale,
            block_sizes=None if self.group is None else [rows] * self.world_size,
        )

    def _finite_or_skip(self, out: dict, where: str) -> bool:
        """True if the loss is finite. The loss is a global value, so every rank takes the same branch."""
        if torch.isfinite(out["loss"]).item():
            return True
        self.nonfinite_total += 1
        self.last_bad = [k for k in ("clip", "cross", "inmodal") if k in out and not torch.isfinite(out[k]).item()]
        log.warning(
            "step %d (%s): non-finite loss (components %s); %s (non-finite losses so far: %d)",
            self.step + 1,
            where,
            self.last_bad or "unknown",
            "the optimizer step is discarded" if self.can_discard else "this micro-batch contributes no gradient",
            self.nonfinite_total,
        )
        return False

    def _end_step(self, hit: bool) -> None:
        """Counts the optimizer steps in a row that had a non-finite loss (a step is discarded whole, so one bad
        micro-batch per step is as bad as all of them); ``max_nonfinite_streak`` of them stop the run."""
        if not hit:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        if self.nonfinite_streak >= self.max_nonfinite_streak:
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} optimizer steps in a row had a non-finite loss, up to step {self.step + 1} "
                f"(components {self.last_bad}); lower optim.lr, use bf16 instead of fp16, or check the data"
            )

    def _discard_loss(self, *outputs: torch.Tensor) -> torch.Tensor:
        """The stand-in loss of a non-finite micro-batch, built from this forward's outputs so DeepSpeed's backward
        hooks run for every parameter and every rank keeps the same reduction schedule. Its gradient is NaN, which
        makes the ZeRO optimizer discard the whole optimizer step; without ZeRO (no overflow handling) it is zero
        instead, and the micro-batch just contributes nothing."""
        return sum(o.float().sum() for o in outputs) * (float("nan") if self.can_discard else 0.0)

    @contextmanager
    def _discarding(self, on: bool) -> Iterator[None]:
        """ZeRO stages 1-2 check the gradient for inf/NaN only in fp16 (or with bf16's check_grad_overflow): turn
        the check on for a step that must be discarded (stage 3 always checks the gradient norm)."""
        opt = self.engine.optimizer
        if not (on and self.can_discard and hasattr(opt, "check_grad_overflow")):
            yield
            return
        previous = opt.check_grad_overflow
        opt.check_grad_overflow = True
        try:
            yield
        finally:
            opt.check_grad_overflow = previous

    def _accumulation_step(self, micro_batches: list[dict], w: float) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        world = self.world_size
        discard = False
        for i, batch in enumerate(micro_batches):
            images, ids, mask = self._to_device(batch)
            self._phase(f"forward and loss embedding exchange (micro-batch {i})")
            img, txt, logit_scale = self.engine(images, ids, mask)
            out = self._loss(img, txt, logit_scale, w, self.micro_batch_size)
            finite = self._finite_or_skip(out, f"micro-batch {i}")
            discard |= not finite
            loss = out["loss"] if finite else self._discard_loss(img, txt, logit_scale)
            # The loss's gradients are those of the global loss; DeepSpeed averages over ranks: undo that.
            self._phase(f"backward gradient reduction (micro-batch {i})")
            self.engine.backward(loss * world)
            self._phase("optimizer step (gradient norm all-reduce, parameter all-gather)")
            with self._discarding(discard and i == len(micro_batches) - 1):
                self.engine.step()
            for k in COMPONENTS:
                sums[k] = sums.get(k, 0.0) + out[k].detach() / len(micro_batches)
        self._end_step(discard)
        return sums

    def _grad_cache_step(self, micro_batches: list[dict], w: float) -> dict[str, torch.Tensor]:
        """GradCache: embed all micro-batches without autograd, one loss over the whole global batch, then re-run
        each micro-batch with autograd and inject the cached embedding gradients (same RNG as the first pass)."""
        world = self.world_size
        rng_states, imgs, txts, scale = [], [], [], None
        self._phase("gradient-cache embedding forward")
        with torch.no_grad():
            for batch in micro_batches:
                rng_states.append(_capture_torch_rng(self.device))
                img, txt, scale = self.engine(*self._to_device(batch))
                imgs.append(img.float())
                txts.append(txt.float())
        img_all = torch.cat(imgs).requires_grad_(True)  # (accum × b, D): this rank's rows of the global list
        txt_all = torch.cat(txts).requires_grad_(True)
        scale_leaf = scale.detach().float().requires_grad_(True)
        self._phase("gradient-cache loss embedding exchange")
        out = self._loss(img_all, txt_all, scale_leaf, w, self.micro_batch_size * len(micro_batches))
        finite = self._finite_or_skip(out, "gradient-cache loss")
        if finite:
            out["loss"].backward()
        sizes = [len(x) for x in imgs]
        g_img = img_all.grad.split(sizes) if finite else None
        g_txt = txt_all.grad.split(sizes) if finite else None
        for i, batch in enumerate(micro_batches):
            self._phase(f"gradient-cache replay: forward, backward gradient reduction, step (micro-batch {i})")
            _restore_torch_rng(rng_states[i], self.device)
            img, txt, logit_scale = self.engine(*self._to_device(batch))
            if finite:
                surrogate = (img.float() * g_img[i]).sum() + (txt.float() * g_txt[i]).sum()
                if i == 0:  # the logit scale's (local share of the) gradient enters once
                    surrogate = surrogate + (logit_scale.float() * scale_leaf.grad).sum()
            else:
                surrogate = self._discard_loss(img, txt, logit_scale)
            # The surrogate carries the full gradient: no division by the accumulation steps, and undo the
            # DeepSpeed mean over ranks.
            self.engine.backward(surrogate * world, scale_wrt_gas=False)
            with self._discarding(not finite and i == len(micro_batches) - 1):
                self.engine.step()
        self._end_step(not finite)
        return {k: out[k].detach() for k in COMPONENTS}


def _capture_torch_rng(device: torch.device) -> tuple:
    """The CPU generator, and the generator of this rank's GPU only (dropout runs there; the other GPUs belong to
    other ranks)."""
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _restore_torch_rng(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
