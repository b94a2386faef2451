"""NCCL diagnostics: PyTorch's flight recorder and error handling, set up before the NCCL process group exists, so
that a collective timeout leaves one dump per rank inside the run folder (docs/reliability.md). Only for NCCL: gloo
gets none of it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["NCCL_DUMP_DIRNAME", "apply_nccl_diagnostics", "nccl_diagnostics_env"]

log = logging.getLogger("rankclip_ds.dist")

NCCL_DUMP_DIRNAME = "nccl_dumps"
"""Folder of the run folder that receives the NCCL flight recorder's dumps, one file per rank: ``rank_<rank>``."""
NCCL_DUMP_FILE_PREFIX = "rank_"

# What ProcessGroupNCCL and its flight recorder read when the NCCL process group is constructed, as PyTorch 2.14.1
# (requirements.txt) declares them in torch/include/torch/csrc/distributed/c10d/ (ProcessGroupNCCL.hpp,
# FlightRecorder.hpp, Utils.hpp). Each entry: the name we set, the other names PyTorch reads for the same setting (a
# user who set any of them keeps it), the value. The values equal 2.14's defaults except the dump file; they are set
# anyway so that a site, a container or another launcher's default cannot quietly turn the dump off.
_NCCL_DIAGNOSTICS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # Flight recorder ring buffer, in events (a collective's start or end). FlightRecorder.hpp reads
    # {"TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"} and warns that the second name is deprecated, so we
    # set the first; ProcessGroupNCCL reads the second alone, default 2000 (> 0, which the dump needs).
    ("TORCH_FR_BUFFER_SIZE", ("TORCH_NCCL_TRACE_BUFFER_SIZE",), "2000"),
    # Dump on a watchdog timeout or NCCL error (ProcessGroupNCCL.hpp: "must be set together with
    # TORCH_NCCL_ENABLE_MONITORING=1 and TORCH_NCCL_TRACE_BUFFER_SIZE > 0").
    ("TORCH_NCCL_DUMP_ON_TIMEOUT", (), "1"),
    # The heartbeat monitor, the thread that polls the store for another rank's dump signal (ProcessGroupNCCL.hpp,
    # class HeartbeatMonitor), so that every rank dumps, not only the one whose watchdog saw the timeout.
    ("TORCH_NCCL_ENABLE_MONITORING", (), "1"),
    # 3 = SkipCleanUp: tear the process down without ncclCommAbort, which can itself hang on a broken communicator
    # (ProcessGroupNCCL.hpp, enum ErrorHandlingMode; "make users to use the default value (3 - SkipCleanUp)"). The
    # watchdog signals the dump and waits for it before any teardown (4 x TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC), so 1
    # (abort, then tear down) dumps too; torchrun's agent exports 1 when unset, which is then kept as the user's.
    # Not 0 (nothing handled: the rank waits on) or 2 (communicators aborted, the process left running on them).
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", ("NCCL_ASYNC_ERROR_HANDLING",), "3"),
)
# The dump file prefix (the rank is appended). The writer reads {"TORCH_FR_DUMP_TEMP_FILE",
# "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"}, the second deprecated; its default, ~/.cache/torch/comm_lib_trace_rank_ on
# each node, is where nobody looks after a failed job, and it creates no folder on its own.
_NCCL_DUMP_FILE_VARIABLES = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")


def nccl_diagnostics_env(run_dir: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The NCCL flight recorder and error-handling variables to export before the NCCL process group is created, so
    that a collective timeout leaves one dump per rank in ``<run_dir>/nccl_dumps/rank_<rank>``.

    Pure: reads ``env`` (default ``os.environ``) and returns only the variables that neither the user nor a launcher
    set (an empty value counts as unset, as in the Slurm scripts' ``${VAR:=value}``), under none of the names PyTorch
    reads for the same setting. The dump path is absolute: the ranks may not share the caller's working directory.
    """
    env = os.environ if env is None else env
    dump_prefix = str(Path(run_dir).absolute() / NCCL_DUMP_DIRNAME / NCCL_DUMP_FILE_PREFIX)
    dump_file = (_NCCL_DUMP_FILE_VARIABLES[0], _NCCL_DUMP_FILE_VARIABLES[1:], dump_prefix)
    return {
        name: value
        for name, aliases, value in (*_NCCL_DIAGNOSTICS, dump_file)
        if not any(env.get(n) for n in (name, *aliases))
    }


def apply_nccl_diagnostics(run_dir: str | os.PathLike[str]) -> None:
    """Export :func:`nccl_diagnostics_env` and create the dump folder (a failure only warns: training works without
    it). Call before the NCCL process group is created: ProcessGroupNCCL reads the variables then."""
    os.environ.update(nccl_diagnostics_env(run_dir))
    dump_prefix = next(os.environ[n] for n in _NCCL_DUMP_FILE_VARIABLES if os.environ.get(n))
    dump_dir = Path(dump_prefix).parent
    try:
        dump_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # Not fatal: training works without it, only the post-mortem of a timeout is lost.
        log.warning(
            "cannot create the NCCL flight recorder's dump folder %s (%s): a collective timeout will leave no dump; "
            "point TORCH_FR_DUMP_TEMP_FILE at a writable folder (the file prefix, e.g. /scratch/run/nccl_dumps/rank_)",
            dump_dir,
            exc,
        )
        return
    log.info(
        "NCCL flight recorder: a collective timeout dumps each rank's last collectives to %s<rank> "
        "(read them with: torchfrtrace %s)",
        dump_prefix,
        dump_dir,
    )
