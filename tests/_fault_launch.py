"""Runs the real entry point (``rankclip_ds.train.main``) with one fault armed, for the crash tests.

``RANKCLIP_TEST_KILL_DURING_SAVE=<tag>:<rank>``: that rank, when it starts writing its first file of checkpoint
``<tag>``, writes half of the file and then sends itself SIGKILL: a process killed in the middle of a checkpoint
write, leaving a truncated file and no ``COMPLETE`` marker.

``RANKCLIP_TEST_PAUSE=<rank>:<step>:<seconds>``: that rank, right after step ``<step>`` (and its sample-keys line),
writes its pid to ``<run>/paused_rank<rank>`` and sleeps: the test then kills or signals it at a known step (the
steps of the tiny test model take tens of milliseconds, too fast to hit by polling).

``RANKCLIP_TEST_NO_SPACE=<tag>:<rank>``: that rank's first file write of checkpoint ``<tag>`` fails with
``OSError(ENOSPC)``, as on a full disk (nothing of the file is written).

Everything else is the unmodified entry point.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def on_checkpoint_write(spec: str, fault) -> None:
    """``spec`` = ``<tag>:<rank>``: on that rank, ``fault(real_save, obj, path, ...)`` replaces the first
    ``torch.save`` into checkpoint folder ``<tag>``."""
    tag, rank = spec.split(":")
    if os.environ.get("RANK") != rank:
        return
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and f"{os.sep}{tag}{os.sep}" in str(f):
            return fault(real_save, obj, f, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def write_half_then_die(real_save, obj, f, *args, **kwargs) -> None:
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def no_space(real_save, obj, f, *args, **kwargs) -> None:
    import errno

    raise OSError(errno.ENOSPC, "No space left on device", str(f))


def arm_pause(spec: str) -> None:
    rank, step, seconds = spec.split(":")
    if os.environ.get("RANK", "0") != rank:
        return
    from rankclip_ds.trainer.trainer import Trainer

    log_keys = Trainer._log_sample_keys

    def log_then_pause(self, micro_batches):
        log_keys(self, micro_batches)
        if self.step == int(step):
            (self.run_dir / f"paused_rank{rank}").write_text(str(os.getpid()))
            time.sleep(float(seconds))

    Trainer._log_sample_keys = log_then_pause


if __name__ == "__main__":
    if os.environ.get("RANKCLIP_TEST_PAUSE"):
        arm_pause(os.environ["RANKCLIP_TEST_PAUSE"])
    if os.environ.get("RANKCLIP_TEST_NO_SPACE"):
        on_checkpoint_write(os.environ["RANKCLIP_TEST_NO_SPACE"], no_space)
    if os.environ.get("RANKCLIP_TEST_KILL_DURING_SAVE"):
        on_checkpoint_write(os.environ["RANKCLIP_TEST_KILL_DURING_SAVE"], write_half_then_die)
    from rankclip_ds.train import main

    sys.exit(main())
