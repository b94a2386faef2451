"""Graceful stop on SIGTERM / SIGUSR1 (preemption, time limits): finish the step, save, exit with a known code.

A signal may reach one rank only (``kill`` of one process, ``scancel --signal`` to the batch step). Each rank's
handler just records it; after every step the ranks agree with one tiny all-reduce (MAX), so all of them stop
after the same step, save the same checkpoint together and exit with :data:`REQUEUE_EXIT_CODE`. A second signal
while stopping exits at once (exit code 128 + signal number), for when saving itself hangs.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import torch
import torch.distributed as dist

__all__ = ["REQUEUE_EXIT_CODE", "StopRequest"]

log = logging.getLogger("rankclip_ds.train")

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". The SLURM scripts requeue the
# job when the training exits with it; any other non-zero code is a real failure.
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs the handlers; :meth:`agreed` tells, collectively, whether to stop after this step."""

    def __init__(
        self, group=None, device: torch.device | str = "cpu", signals: tuple[signal.Signals, ...] = STOP_SIGNALS
    ) -> None:
        self.group = group
        self.device = torch.device(device)  # nccl reduces CUDA tensors only
        self.signum: int | None = None
        # DataLoader workers are forked after this and inherit the handler; srun signals every process of the
        # step, so the handler acts only in the process that installed it.
        self.pid = os.getpid()
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def attach(self, group, device: torch.device | str) -> None:
        """Set the process group and device once they exist (the handlers are installed before, at start-up)."""
        self.group, self.device = group, torch.device(device)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            return  # a forked data worker: the training process decides
        if self.signum is not None:
            # Second signal: the graceful path is taking too long or is stuck; leave now.
            os._exit(128 + signum)
        self.signum = signum
        log.warning("received %s: finishing the current step, then saving and exiting", signal.Signals(signum).name)

    def agreed(self) -> int | None:
        """The signal number if any rank received one (the same answer on every rank), else None."""
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=self.device)
        if self.group is not None and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        value = int(flag.item())
        if value and self.signum is None:
            self.signum = value  # another rank got it; from here on a second signal here exits at once
        return value or None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()
