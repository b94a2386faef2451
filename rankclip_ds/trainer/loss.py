"""The objective as the trainer uses it, built once from the loss section: the RankCLIP loss over the data-parallel
group, its rank-weight schedule w(t), and (``logging.profile_loss``) the time spent in it.

Everything the loss needs that the trainer knows is bound here, once: the group and its block sizes (every rank's
rows are known, so the loss runs without a host read: docs/loss.md §8), the model's ``max_logit_scale`` (the one
clamp), the schedule's length. The training step then calls ``loss(img, txt, logit_scale, w)``.
"""

from __future__ import annotations

import time

import torch

from ..config import LossConfig
from ..losses import epoch_rank_weight, rankclip_loss, step_rank_weight
from .setup import TrainingLength

__all__ = ["TrainingLoss"]


class TrainingLoss:
    """``loss(img, txt, logit_scale, w)``: :func:`rankclip_ds.losses.rankclip_loss` with this run's settings.

    Args:
        cfg: the loss section. group: the data-parallel group (None for one process). world_size: its size.
        local_rows: every rank's rows in one call (equal on every rank: the loader yields full batches only; a batch
            of another size is refused by the loss with a message instead of a hang in the exchange).
        max_logit_scale: the model's bound on ``s``. length: for the rank-weight schedule.
        device: where the loss runs (timing synchronises it). profile: time each call (``logging.profile_loss``).
    """

    def __init__(
        self,
        cfg: LossConfig,
        *,
        group,
        world_size: int,
        local_rows: int,
        max_logit_scale: float,
        length: TrainingLength,
        device: torch.device,
        profile: bool = False,
    ) -> None:
        self.cfg, self.group, self.length, self.device, self.profile = cfg, group, length, device, profile
        self.max_logit_scale = max_logit_scale
        self.block_sizes = None if group is None else [local_rows] * world_size
        self.seconds = 0.0  # time inside the loss since the last take_seconds() (profile)

    def rank_weight(self, step: int) -> float:
        """w(t) for optimizer step ``step`` (0-based); 0 for the plain-CLIP baseline (``loss.ranking: false``)."""
        cfg, length = self.cfg, self.length
        if not cfg.ranking:
            return 0.0
        if cfg.rank_weight_schedule == "constant":
            return cfg.rank_weight_max
        if cfg.rank_weight_schedule == "epoch":
            epoch = step // length.steps_per_epoch + 1  # the released code counts epochs from 1
            return epoch_rank_weight(epoch, length.epochs, w_max=cfg.rank_weight_max)
        hold_from = cfg.rank_weight_hold_from
        return step_rank_weight(step, length.total_steps, w_max=cfg.rank_weight_max, hold_from=hold_from)

    def __call__(self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, w: float) -> dict:
        if not self.profile:
            return self._loss(img, txt, logit_scale, w)
        # The loss forms its gradients in its forward (its backward only scales them): timing the call measures its
        # whole cost. Synchronised before and after, so slightly slower.
        self._sync()
        t0 = time.perf_counter()
        out = self._loss(img, txt, logit_scale, w)
        self._sync()
        self.seconds += time.perf_counter() - t0
        return out

    def take_seconds(self) -> float:
        """Seconds spent in the loss since the last call (``logging.profile_loss``), and reset."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def _loss(self, img, txt, logit_scale, w) -> dict:
        cfg = self.cfg
        return rankclip_loss(
            img,
            txt,
            logit_scale,
            rank_weight=w,
            lambda_cross=cfg.lambda_cross,
            lambda_in=cfg.lambda_in,
            impl=cfg.impl,
            comm=cfg.comm,
            chunk_size=cfg.chunk_size,
            top_k=cfg.top_k,
            position_weighting=cfg.position_weighting,
            group=self.group,
            max_logit_scale=self.max_logit_scale,
            block_sizes=self.block_sizes,
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
