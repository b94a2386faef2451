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
from typing import NamedTuple

from .nccl_diagnostics import apply_nccl_diagnostics

__all__ = [
    "DistEnvError",
    "DistInfo",
    "RendezvousError",
    "expand_slurm_nodelist",
    "init_distributed",
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


class RendezvousError(DistEnvError):
    """The process group could not be formed: the rendezvous endpoint never answered, or not every rank joined it
    within ``dist.timeout_minutes``. The message names the endpoint, the ranks, the timeout and the fix."""


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
        v = _rank_env_vars(env)
    elif "OMPI_COMM_WORLD_RANK" in env:
        v = _openmpi_vars(env)
    elif "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        v = _slurm_vars(env)
    else:
        v = _single_process_vars(env)

    if not 0 <= v.rank < v.world_size:
        raise DistEnvError(f"rank {v.rank} is outside world size {v.world_size} (launcher {v.launcher})")
    if not 0 <= v.local_rank < max(v.local_world_size, 1):
        raise DistEnvError(
            f"local rank {v.local_rank} is outside local world size {v.local_world_size} (launcher {v.launcher})"
        )
    return DistInfo(**v._asdict(), device_type=device_type)


class _LaunchVars(NamedTuple):
    """What one launcher's variables say: :class:`DistInfo` without the device type."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _rank_env_vars(env: Mapping[str, str]) -> _LaunchVars:
    """``RANK``/``WORLD_SIZE`` and friends, set by torchrun, the DeepSpeed launcher or by hand (``env``)."""
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
    return _LaunchVars(rank, world, local_rank, local_world, node_rank, addr, port, launcher)


def _openmpi_vars(env: Mapping[str, str]) -> _LaunchVars:
    """``OMPI_COMM_WORLD_*`` (mpirun, ``deepspeed --launcher openmpi``); the master address must come with the job
    (mpirun -x)."""
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
    return _LaunchVars(rank, world, local_rank, local_world, node_rank, addr, port, "openmpi")


def _slurm_vars(env: Mapping[str, str]) -> _LaunchVars:
    """``SLURM_*`` with one task per device (``srun python train.py``); the master address is ``MASTER_ADDR`` or the
    first host of the job's node list."""
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
    return _LaunchVars(rank, world, local_rank, local_world, node_rank, addr, _slurm_port(env), "slurm")


def _single_process_vars(env: Mapping[str, str]) -> _LaunchVars:
    """No launcher: rank 0 of 1 (``MASTER_ADDR``/``MASTER_PORT`` still honoured)."""
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int(env, "MASTER_PORT", 29500)
    return _LaunchVars(0, 1, 0, 1, 0, addr, port, "single")


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
    (:func:`rankclip_ds.nccl_diagnostics.nccl_diagnostics_env`, the dump folder created); gloo gets none of it.
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
        apply_nccl_diagnostics(diagnostics_dir)
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
    try:
        attempt_store = _elastic_attempt_store(info, timeout)
        if attempt_store is not None:  # DeepSpeed adopts a group that exists
            dist.init_process_group(
                backend=info.backend, store=attempt_store, rank=info.rank, world_size=info.world_size, timeout=timeout
            )
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=info.backend, timeout=timeout, auto_mpi_discovery=False)
        elif attempt_store is None:
            dist.init_process_group(backend=info.backend, timeout=timeout)
    except (dist.DistError, RuntimeError, TimeoutError, OSError) as exc:
        raise rendezvous_error(info, port, timeout_minutes, exc) from exc


def _elastic_attempt_store(info: DistInfo, timeout: datetime.timedelta):
    """Under torchrun, this attempt's rendezvous store in a key space of its own (None for other launchers).

    torchrun's agent serves the workers' store for the whole job: after ``--max-restarts`` restarts a failed group,
    the new ranks found the addresses the dead attempt had published there (gloo: ``connectFullMesh failed ...
    Connection refused``). Keys prefixed with ``TORCHELASTIC_RESTART_COUNT`` give each attempt a clean slate."""
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if info.launcher != "torchrun" or attempt is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=info.rank, world_size=info.world_size, timeout=timeout))
    return dist.PrefixStore(f"rankclip_ds/attempt_{attempt}/", store)


def rendezvous_error(info: DistInfo, port: int, timeout_minutes: float, exc: BaseException) -> RendezvousError:
    """The :class:`RendezvousError` for a process-group initialisation that failed with ``exc`` (in torch 2.14: a
    ``DistNetworkError`` when nothing listens at the endpoint, a ``DistStoreError`` "Timed out after ... waiting for
    clients" on rank 0 or "wait timeout ... keys: /default_pg/..." when some ranks never came). Both the store's
    connect and its waits are bounded by the process-group timeout, ``dist.timeout_minutes``."""
    nodes = max(1, info.world_size // max(1, info.local_world_size))
    text = " ".join(str(exc).split())
    return RendezvousError(
        f"rank {info.rank} of {info.world_size} (node {info.node_rank}, launcher {info.launcher}) could not form the "
        f"process group at the rendezvous endpoint {info.master_addr}:{port} (MASTER_ADDR:MASTER_PORT) within "
        f"{timeout_minutes:g} min (dist.timeout_minutes): {type(exc).__name__}: {text[:400]}. Fix: check that "
        f"{info.master_addr}:{port} is the address of rank 0's host and reachable from this node (the right network "
        f"interface, no firewall), and that all {info.world_size} ranks ({nodes} node(s) × {info.local_world_size} "
        "ranks) were started; a slow start-up (a busy file system, a JIT build) needs a larger dist.timeout_minutes."
    )


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
