"""Distributed setup: one reader of the launchers' environment, one frozen record, one process-group init.

Supported launchers, in order of precedence:

- ``torchrun`` / ``torch.distributed.run``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (recognised by ``TORCHELASTIC_RUN_ID``).
- the DeepSpeed launcher (``deepspeed train.py``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_SIZE``,
  ``CROSS_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (it also passes ``--local_rank``, which the entry point accepts).
- OpenMPI (``mpirun``, ``deepspeed --launcher openmpi``): ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``,
  ``OMPI_COMM_WORLD_LOCAL_RANK``, ``OMPI_COMM_WORLD_LOCAL_SIZE``, with ``MASTER_ADDR``/``MASTER_PORT`` exported.
- SLURM with one task per device (``srun python train.py``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS_PER_NODE``/``SLURM_TASKS_PER_NODE``, ``SLURM_NODEID``; the master address is the first host of
  ``SLURM_JOB_NODELIST`` (expanded here, no ``scontrol`` needed) and the port ``MASTER_PORT`` or one derived from
  the job id, so that two jobs sharing a node do not collide.
- none of these: a single process (rank 0 of 1).

The generic ``RANK`` variables win over SLURM's, because under ``sbatch`` + ``deepspeed --launcher`` or ``srun
torchrun`` both are present and the launcher's describe the actual processes.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "NCCL_DUMP_DIRNAME",
    "DistInfo",
    "expand_slurm_nodelist",
    "init_distributed",
    "nccl_diagnostics_env",
    "read_dist_env",
    "setup_logging",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Who this process is in the job. Built once by :func:`read_dist_env`, never mutated."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """``torchrun``, ``deepspeed``, ``openmpi``, ``slurm``, ``env`` (RANK/WORLD_SIZE set by hand) or ``single``."""
    device_type: str
    """``cuda`` or ``cpu``."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str:
        """``nccl`` on CUDA, ``gloo`` on CPU."""
        return "nccl" if self.device_type == "cuda" else "gloo"

    @property
    def device(self) -> str:
        """``cuda:<local rank>`` (modulo the visible devices: a site that binds one GPU per task shows each task
        a single ``cuda:0``), or ``cpu``."""
        if self.device_type != "cuda":
            return "cpu"
        import torch

        return f"cuda:{self.local_rank % max(1, torch.cuda.device_count())}"


class DistEnvError(RuntimeError):
    """The launcher environment is inconsistent; the message names the variables."""


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise DistEnvError(f"environment variable {name} is missing; the launcher should set it")
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise DistEnvError(f"environment variable {name}={raw!r} is not an integer") from exc


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list such as ``gpu[001-003,007],login-a1`` into host names, in order.

    Handles ranges with zero padding, several bracket groups in one name (``r[1-2]n[01-02]``) and commas both
    between hosts and inside brackets. This is what ``scontrol show hostnames`` prints, without needing it.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_host(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise DistEnvError(f"SLURM node list {text!r} has unbalanced brackets")
    if cur:
        parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_host(pattern: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    out = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            width = len(lo)
            out.extend(f"{head}{i:0{width}d}{tail}" for i in range(int(lo), int(hi) + 1))
        else:
            out.append(f"{head}{rng}{tail}")
    return [h for item in out for h in _expand_host(item)]


def _slurm_tasks_per_node(env: Mapping[str, str], ntasks: int, nnodes: int) -> int:
    # SLURM_NTASKS_PER_NODE is only set with --ntasks-per-node; SLURM_TASKS_PER_NODE is always set,
    # in a compressed form like "4(x2)" or "2,1".
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _int(env, "SLURM_NTASKS_PER_NODE")
    raw = env.get("SLURM_TASKS_PER_NODE", "")
    m = re.match(r"^(\d+)", raw)
    if m:
        return int(m.group(1))
    return max(1, ntasks // max(1, nnodes))


def _slurm_port(env: Mapping[str, str]) -> int:
    # Derive a port from the job id so that two jobs sharing a node do not collide; MASTER_PORT wins.
    if env.get("MASTER_PORT"):
        return _int(env, "MASTER_PORT")
    job = _int(env, "SLURM_JOB_ID", 0)
    return 20000 + job % 20000


def read_dist_env(env: Mapping[str, str] | None = None, device_type: str | None = None) -> DistInfo:
    """Read rank/world/local rank and the rendezvous address from the launcher's environment.

    Pure: reads ``env`` (default ``os.environ``) and returns a frozen record; nothing is initialised.
    ``device_type`` defaults to ``cuda`` when CUDA is available, else ``cpu``.
    """
    env = os.environ if env is None else env
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"

    if "RANK" in env and "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
            launcher = "deepspeed"
        else:
            launcher = "env"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK", 0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", world))
        node_rank = _int(env, "GROUP_RANK", _int(env, "CROSS_RANK", _int(env, "NODE_RANK", rank // local_world)))
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT", 29500)
    elif "OMPI_COMM_WORLD_RANK" in env:
        # mpirun / `deepspeed --launcher openmpi`: the master address must come with the job (mpirun -x).
        launcher = "openmpi"
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world)
        node_rank = _int(env, "OMPI_COMM_WORLD_NODE_RANK", rank // local_world)
        if world > 1 and not env.get("MASTER_ADDR"):
            raise DistEnvError(
                "OpenMPI launch without MASTER_ADDR: export it to every rank (mpirun -x MASTER_ADDR -x MASTER_PORT)"
            )
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT", 29500)
    elif "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        launcher = "slurm"
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        nnodes = _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", 1))
        local_world = _slurm_tasks_per_node(env, world, nnodes)
        local_rank = _int(env, "SLURM_LOCALID", rank % local_world)
        node_rank = _int(env, "SLURM_NODEID", rank // local_world)
        if env.get("MASTER_ADDR"):
            addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise DistEnvError(
                    "SLURM_PROCID is set but SLURM_JOB_NODELIST is not, so the master address is unknown; "
                    "export MASTER_ADDR in the job script"
                )
            addr = expand_slurm_nodelist(nodelist)[0]
        port = _slurm_port(env)
    else:
        launcher = "single"
        rank, world, local_rank, local_world, node_rank = 0, 1, 0, 1, 0
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT", 29500)

    if not 0 <= rank < world:
        raise DistEnvError(f"rank {rank} is outside world size {world} (launcher {launcher})")
    if not 0 <= local_rank < max(local_world, 1):
        raise DistEnvError(f"local rank {local_rank} is outside local world size {local_world} (launcher {launcher})")
    return DistInfo(rank, world, local_rank, local_world, node_rank, addr, port, launcher, device_type)


# ------------------------------------------------------------------------------------------------ NCCL diagnostics
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


def _apply_nccl_diagnostics(run_dir: str | os.PathLike[str]) -> None:
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


def init_distributed(
    info: DistInfo,
    timeout_minutes: float = 30.0,
    use_deepspeed: bool = True,
    single_process: bool = False,
    diagnostics_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Create the default process group for ``info`` (for a single process only with ``single_process=True``,
    as DeepSpeed's engine wants a process group even then; it then rendezvous on a free loopback port).

    Exports the variables ``env://`` rendezvous reads (so SLURM-launched tasks work like torchrun ones), sets the
    CUDA device from the local rank, and initialises through DeepSpeed (which the engine expects) or plain
    ``torch.distributed``. The timeout bounds every collective: a stuck rank fails instead of hanging forever.
    With the NCCL backend and a ``diagnostics_dir`` (the run folder), the flight recorder is set up first
    (:func:`nccl_diagnostics_env`, the dump folder created); gloo gets none of it.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized() or not (info.distributed or single_process):
        return
    port = info.master_port
    if not info.distributed and "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:  # a lone process must not collide with another job's default port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    for name, value in (
        ("RANK", info.rank),
        ("WORLD_SIZE", info.world_size),
        ("LOCAL_RANK", info.local_rank),
        ("LOCAL_WORLD_SIZE", info.local_world_size),
        ("MASTER_ADDR", info.master_addr),
        ("MASTER_PORT", port),
    ):
        os.environ[name] = str(value)
    if info.device_type == "cuda":
        torch.cuda.set_device(torch.device(info.device))
    if info.backend == "nccl" and diagnostics_dir is not None:
        # ProcessGroupNCCL reads these once, when the group is constructed below.
        _apply_nccl_diagnostics(diagnostics_dir)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    log.info(
        "init process group: backend=%s rank=%d/%d local=%d master=%s:%d launcher=%s",
        info.backend,
        info.rank,
        info.world_size,
        info.local_rank,
        info.master_addr,
        port,
        info.launcher,
    )
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=info.backend, timeout=timeout, auto_mpi_discovery=False)
    else:
        dist.init_process_group(backend=info.backend, timeout=timeout)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(info: DistInfo, level: str = "INFO") -> None:
    """Rank-filtered logging: rank 0 logs at ``level``, other ranks warnings and errors only, each line tagged
    with its rank. Replaces handlers installed by an earlier call (idempotent)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_rankclip", False):
            root.removeHandler(h)
    handler = logging.StreamHandler()
    handler._rankclip = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter(info.rank))
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level) if info.is_main else logging.WARNING)
