"""Name the collective and the stuck rank when a collective times out.

When one rank stops (a hung data loader or file system, a dead or SIGSTOPped process, a wedged GPU, a lost node), the
others block in their next collective until ``dist.timeout_minutes`` and then fail with the backend's raw words, for
example gloo's ``Timed out waiting 1800000ms for recv operation to complete``: neither the collective nor the stuck
rank is named, and every rank's log says the same thing. This module supplies the missing facts:

- :class:`Heartbeat`: each rank keeps ``<directory>/rank{rank:05d}.json`` = ``{rank, host, pid, step, phase, time,
  since, interval_s, alive_interval_s}`` up to date, written atomically and at most every ``min_interval_s`` (cheap
  on a shared file system). :meth:`Heartbeat.start` adds a daemon thread that keeps rewriting the file while the main
  thread is blocked in a collective (the backends release the GIL there), so a healthy rank waiting on the stuck one
  stays fresh, while a dead, stopped or unreachable rank goes silent.
- :class:`CollectiveTracker`: remembers the collective-bearing phase the rank is in (``enter``, several times a step,
  no I/O unless the heartbeat interval passed) and, through :meth:`CollectiveTracker.guard`, turns a collective
  timeout into a :class:`~rankclip_ds.trainer.errors.CollectiveTimeoutError` naming this rank, the phase, the step,
  the timeout and ``dist.timeout_minutes``, and, from the heartbeats, the ranks that were not in that collective,
  silent longest first: those are the likely stuck or dead ones.
- :func:`is_collective_timeout` / :func:`is_collective_failure`: recognisers for the exceptions torch raises.

What torch 2.14 raises (recorded on CPU with gloo, ``timeout=timedelta(seconds=3)``, the peer sleeping or
SIGSTOPped; no traceback chain):

- ``all_reduce``, ``barrier``, ``recv``: ``RuntimeError('[.../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78]
  Timed out waiting 3000ms for recv operation to complete')``;
- ``all_gather``, ``batch_isend_irecv`` + ``wait()``: the same with ``send`` (``unbound_buffer.cc:129``);
- the peer process dead (exit or kill), at once rather than after the timeout: ``RuntimeError('[.../gloo/transport/
  tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:41386. This is typically caused by a remote worker
  crashing. ...')``.

NCCL (from torch's ProcessGroupNCCL): a ``torch.distributed.DistBackendError`` whose text contains ``Watchdog caught
collective operation timeout: WorkNCCL(SeqNum=57, OpType=ALLGATHER, NumelIn=191, NumelOut=1528, Timeout(ms)=200000)
ran for 200059 milliseconds before timing out.`` or, with ``TORCH_NCCL_BLOCKING_WAIT=1``, ``Work WorkNCCL(...) timed
out in blocking wait``; later calls on the aborted communicator say ``NCCL communicator was aborted on rank N``. By
default (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``) NCCL's watchdog thread tears the process down itself, so Python never
sees the exception; the heartbeat files still tell which rank stopped first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import CollectiveTimeoutError

__all__ = [
    "CollectiveTracker",
    "Heartbeat",
    "collective_timeout_error",
    "guard",
    "is_collective_failure",
    "is_collective_timeout",
    "read_heartbeats",
]

log = logging.getLogger(__name__)

HEARTBEAT_RE = re.compile(r"^rank(\d+)\.json$")
CONFIG_KEY = "dist.timeout_minutes"

# Words of a timeout that only a collective backend writes (matched case-insensitively). A bare "timed out" is not
# enough: the DataLoader's "DataLoader timed out after 5 seconds" must pass through the guard unchanged.
_TIMEOUT_PATTERNS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"timed out waiting \d+\s*ms for (?:send|recv)",  # gloo unbound_buffer.cc
        r"gloo.*(?:timed out|timeout)",  # any other gloo timeout (the message starts with gloo's source path)
        r"watchdog caught collective operation timeout",  # ProcessGroupNCCL watchdog
        r"WorkNCCL\(.*\) ran for \d+ milliseconds before timing out",
        r"timed out in blocking wait",  # TORCH_NCCL_BLOCKING_WAIT=1
        r"NCCL (?:operation )?timed out",
        r"NCCL timeout",
        r"failed to pass monitoredBarrier",  # monitored_barrier (it even names the rank)
        r"timed out in monitoredBarrier",
    )
]
# Timeout words that count only on torch.distributed's own error types (store and socket waits under a collective).
_DIST_TIMEOUT_RE = re.compile(r"time(?:d)? ?out|timeout", re.IGNORECASE)
# A peer that vanished: not a timeout, but the same diagnosis (which rank, in which collective) applies.
_PEER_LOST_PATTERNS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"gloo.*connection closed by peer",
        r"gloo.*(?:connection reset by peer|broken pipe)",
        r"NCCL communicator was aborted",
        r"ncclRemoteError",
        r"Some NCCL operations have failed or timed out",
    )
]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, each once (cycles are possible)."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 32:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def _dist_error_types() -> tuple[type[BaseException], ...]:
    try:
        import torch.distributed as dist

        return (dist.DistError,)
    except (ImportError, AttributeError):  # a torch built without distributed support
        return ()


def _is_timeout_one(e: BaseException) -> bool:
    if isinstance(e, CollectiveTimeoutError):
        return True
    text = str(e)
    if any(p.search(text) for p in _TIMEOUT_PATTERNS):
        return True
    return isinstance(e, _dist_error_types()) and bool(_DIST_TIMEOUT_RE.search(text))


def is_collective_timeout(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception in its ``__cause__``/``__context__`` chain) is a collective that ran into the
    process-group timeout: gloo's ``Timed out waiting ...ms for recv/send``, NCCL's watchdog or blocking-wait
    timeout, or a ``torch.distributed.DistError`` about a timeout. Backend markers are required, so an unrelated
    timeout (a DataLoader's, an HTTP client's) is not mistaken for one."""
    return any(_is_timeout_one(e) for e in _chain(exc))


def _is_failure_one(e: BaseException) -> bool:
    return _is_timeout_one(e) or any(p.search(str(e)) for p in _PEER_LOST_PATTERNS)


def is_collective_failure(exc: BaseException) -> bool:
    """:func:`is_collective_timeout`, or a collective that failed because a peer vanished (gloo's ``Connection
    closed by peer``, an aborted NCCL communicator, ``ncclRemoteError``). Under gloo a dead rank is reported this
    way at once instead of after the timeout; it needs the same diagnosis."""
    return any(_is_failure_one(e) for e in _chain(exc))


# ---------------------------------------------------------------------------------------------------- heartbeats
class Heartbeat:
    """One rank's heartbeat file ``<directory>/rank{rank:05d}.json``, rewritten atomically (temporary file +
    ``os.replace``) so a reader never sees half a file.

    :meth:`beat` records the step and phase in memory every time (cheap) and writes at most every ``min_interval_s``
    unless forced: thousands of ranks renaming files several times a step would load a shared file system's metadata
    server for nothing. I/O errors never propagate (a full or read-only disk must not kill training for a
    diagnostic): the first is logged as a warning, later ones at debug level.

    :meth:`start` runs a daemon thread that rewrites the file every ``min_interval_s`` with the latest state. Use it
    in training: without it, every rank blocked in a collective stops writing, and after a long timeout the healthy
    waiters look as silent as the stuck rank. ``time`` is when the file was written (the rank is alive), ``since``
    when the rank entered ``phase`` (its progress).
    """

    def __init__(self, directory: str | Path, rank: int, *, min_interval_s: float = 10.0) -> None:
        self.directory = Path(directory)
        self.rank = rank
        self.min_interval_s = float(min_interval_s)
        self.path = self.directory / f"rank{rank:05d}.json"
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.created = time.time()
        self._state: tuple[int, str, float] = (-1, "start-up", self.created)  # step, phase, since (wall clock)
        self._last_write = -math.inf  # time.monotonic() of the last write attempt
        self._lock = threading.Lock()
        self._warned = False
        self._dir_ready = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def step(self) -> int:
        return self._state[0]

    @property
    def phase(self) -> str:
        return self._state[1]

    def beat(self, step: int, phase: str, force: bool = False) -> bool:
        """Record ``step`` and ``phase``; write the file if ``force`` or ``min_interval_s`` passed since the last
        write. While the background thread runs, only ``force`` writes here: the thread does the periodic writes,
        so a hung shared file system stalls the thread, never the training loop. Returns whether it wrote."""
        old_step, old_phase, since = self._state
        if step != old_step or phase != old_phase:
            since = time.time()
        self._state = (step, phase, since)  # one tuple assignment: the thread never sees a half-updated state
        if not force and (self._thread is not None or time.monotonic() - self._last_write < self.min_interval_s):
            return False
        return self._write()

    def _write(self) -> bool:
        with self._lock:
            self._last_write = time.monotonic()
            step, phase, since = self._state
            record = {
                "rank": self.rank,
                "host": self.host,
                "pid": self.pid,
                "step": step,
                "phase": phase,
                "time": time.time(),
                "since": since,
                "interval_s": self.min_interval_s,
                "alive_interval_s": self.min_interval_s if self._thread is not None else None,
            }
            tmp = self.path.with_name(f"{self.path.name}.tmp{self.pid}")
            try:
                if not self._dir_ready:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    self._dir_ready = True
                tmp.write_text(json.dumps(record))
                os.replace(tmp, self.path)
            except OSError as exc:
                self._dir_ready = False  # the folder may have been removed: try to recreate it next time
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "cannot write heartbeat %s (%s); training continues, but a collective timeout will not be "
                        "able to name this rank's last step (further heartbeat errors are logged at debug level)",
                        self.path,
                        exc,
                    )
                else:
                    log.debug("cannot write heartbeat %s: %s", self.path, exc)
                return False
            return True

    def start(self) -> Heartbeat:
        """Start the daemon thread that keeps the file fresh while the main thread is blocked (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{self.rank}", daemon=True)
            self._thread.start()
            self._write()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.min_interval_s):
            if time.monotonic() - self._last_write >= self.min_interval_s * 0.9:
                self._write()

    def stop(self) -> None:
        """Stop the thread (the file stays, with its last state)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=max(1.0, self.min_interval_s))

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def read_heartbeats(directory: str | Path | None) -> dict[int, dict[str, Any]]:
    """Every rank's last heartbeat in ``directory``, by rank; a missing folder or an unreadable file (another
    writer's temporary file, a foreign file) is skipped, never an error: this runs while reporting another one."""
    out: dict[int, dict[str, Any]] = {}
    if directory is None:
        return out
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for name in names:
        m = HEARTBEAT_RE.match(name)
        if m is None:
            continue
        try:
            record = json.loads((Path(directory) / name).read_text())
            float(record["time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(record, dict):
            out[int(m.group(1))] = record
    return out


# ---------------------------------------------------------------------------------------------------- the error
def _fmt_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _rank_list(ranks: list[int], limit: int = 32) -> str:
    text = ", ".join(str(r) for r in ranks[:limit])
    return text + (f" and {len(ranks) - limit} more" if len(ranks) > limit else "")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def collective_timeout_error(
    exc: BaseException,
    *,
    collective: str,
    rank: int,
    world_size: int,
    step: int,
    timeout_minutes: float,
    heartbeat_dir: str | Path | None,
    started: float | None = None,
    now: float | None = None,
    max_listed: int = 8,
) -> CollectiveTimeoutError:
    """The :class:`CollectiveTimeoutError` for ``exc``, raised on ``rank`` in ``collective`` at ``step``.

    The heartbeats of the other ranks decide whom to name. Ranks whose last heartbeat shows another step or phase
    than this rank's were not in this collective: those are the likely stuck or dead ones, listed silent longest
    first (a rank with a live heartbeat thread goes silent only when its process is dead, stopped or unreachable).
    Ranks in the same step and collective were waiting too and are only counted. When every rank that reported was
    in this collective, the oldest heartbeats are listed (the stuck rank hangs inside it: a GPU or network fault).
    ``started`` (this process's start, e.g. :attr:`Heartbeat.created`) marks heartbeats left by an earlier attempt of
    a requeued job; ``now`` is for tests.
    """
    now = time.time() if now is None else now
    peer_lost = not is_collective_timeout(exc)
    what = "lost a peer" if peer_lost else f"timed out after {timeout_minutes:g} min ({CONFIG_KEY})"
    lines = [f"rank {rank} of {world_size} {what} in the collective '{collective}' at step {step}."]
    beats = read_heartbeats(heartbeat_dir)
    others = [r for r in range(world_size) if r != rank]
    never = [r for r in others if r not in beats]
    reported = [r for r in others if r in beats]
    if heartbeat_dir is None:
        lines.append(
            "No heartbeat folder was configured, so the stuck rank cannot be named here; compare the ranks' logs."
        )
    else:
        behind = [r for r in reported if (beats[r].get("step"), beats[r].get("phase")) != (step, collective)]
        waiting = len(reported) - len(behind)
        if behind:
            head = "Ranks not in this collective, silent longest first; likely stuck or dead"
            listed = behind
        elif reported:
            head = "Every rank that reported was in this collective too; oldest heartbeats first"
            listed = reported
        else:
            head = ""
            listed = []
        listed = sorted(listed, key=lambda r: float(beats[r]["time"]))  # silent longest first
        if listed:
            lines.append(f"{head} (heartbeats in {heartbeat_dir}):")
        for r in listed[:max_listed]:
            b = beats[r]
            ago = _fmt_seconds(max(0.0, now - float(b["time"])))
            since = b.get("since")
            in_phase = f" for {_fmt_seconds(max(0.0, now - float(since)))}" if isinstance(since, (int, float)) else ""
            stale = (
                " [heartbeat older than this process: left by an earlier attempt, no report in this one]"
                if started is not None and float(b["time"]) < started
                else ""
            )
            lines.append(
                f"  rank {r} on host {b.get('host', '?')} pid {b.get('pid', '?')}: last heartbeat {ago} ago, "
                f"at step {b.get('step', '?')} in '{b.get('phase', '?')}'{in_phase}{stale}"
            )
        if len(listed) > max_listed:
            lines.append(f"  ... and {len(listed) - max_listed} more: ranks {_rank_list(listed[max_listed:])}")
        if never:
            lines.append(
                f"Never reported (no heartbeat file; likely stuck at start-up or dead): ranks {_rank_list(never)}"
            )
        if behind and waiting:
            lines.append(f"{waiting} other rank(s) were in this collective at step {step} as well (waiting, healthy).")
    if peer_lost:
        lines.append(
            "Fix: a rank died or its node became unreachable; read the logs of the ranks named above (an exception, "
            "an out-of-memory kill, a node failure) and restart from the latest checkpoint."
        )
    else:
        lines.append(
            "Fix: look at the logs and the node of the ranks named above (a hung data loader or file system, a dead "
            "or stopped process, a GPU error, a network fault). If the phase is legitimately slow on some ranks (a "
            f"long checkpoint write or evaluation while the others wait), raise {CONFIG_KEY} (now {timeout_minutes:g})."
        )
    # The backend's own error, not one raised while it propagated (e.g. a DataLoader worker the launcher killed).
    origin = next((e for e in _chain(exc) if _is_failure_one(e)), exc)
    lines.append(f"Original error: {_short(origin)}")
    return CollectiveTimeoutError("\n".join(lines))


# ---------------------------------------------------------------------------------------------------- the tracker
class CollectiveTracker:
    """The collective-bearing phase this rank is in, and the guard that turns a timeout there into a named error.

    ``enter`` costs a few attribute writes (and a heartbeat write when the interval passed), so the trainer can mark
    every phase of a step: ``"loss ring exchange (forward)"``, ``"gradient all-reduce (backward)"``, ``"stop-flag
    all_reduce"``, ``"checkpoint barrier"``, and the non-collective ones where a rank can hang (``"data loading"``,
    ``"evaluation"``) so the heartbeat shows where a stuck rank stopped.
    """

    def __init__(
        self, *, rank: int, world_size: int, timeout_minutes: float, heartbeat: Heartbeat | None = None
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_minutes = timeout_minutes
        self.heartbeat = heartbeat
        self.phase = "start-up"
        self.step = 0

    def enter(self, name: str, step: int | None = None, *, force: bool = False) -> None:
        """This rank now runs phase ``name`` of ``step`` (default: the current step)."""
        self.phase = name
        if step is not None:
            self.step = step
        if self.heartbeat is not None:
            self.heartbeat.beat(self.step, name, force=force)

    def error(self, exc: BaseException) -> CollectiveTimeoutError:
        """The named error for a collective failure ``exc`` raised in the current phase."""
        hb = self.heartbeat
        return collective_timeout_error(
            exc,
            collective=self.phase,
            rank=self.rank,
            world_size=self.world_size,
            step=self.step,
            timeout_minutes=self.timeout_minutes,
            heartbeat_dir=hb.directory if hb is not None else None,
            started=hb.created if hb is not None else None,
        )

    @contextmanager
    def guard(self, name: str | None = None, step: int | None = None) -> Iterator[CollectiveTracker]:
        """Run the block (as phase ``name`` if given); a collective timeout or lost peer raised in it becomes a
        :class:`CollectiveTimeoutError` (``from`` the original), every other exception passes unchanged."""
        if name is not None:
            self.enter(name, step)
        try:
            yield self
        except CollectiveTimeoutError:
            raise  # already named by an inner guard
        except Exception as exc:
            if not is_collective_failure(exc):
                raise
            raise self.error(exc) from exc


def guard(tracker: CollectiveTracker, name: str | None = None, step: int | None = None):
    """Function form of :meth:`CollectiveTracker.guard`."""
    return tracker.guard(name, step)
