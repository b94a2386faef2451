"""Name the collective and the stuck rank when a collective times out.

When one rank stops (a hung data loader or file system, a dead or SIGSTOPped process, a wedged GPU, a lost node), the
others block in their next collective until ``dist.timeout_minutes`` and then fail with the backend's raw words, for
example gloo's ``Timed out waiting 1800000ms for recv operation to complete``: neither the collective nor the stuck
rank is named, and every rank's log says the same thing. This module supplies the missing facts:

- :class:`~rankclip_ds.trainer.heartbeat.Heartbeat` (heartbeat.py): each rank keeps ``<directory>/rank{rank:05d}.json``
  = ``{rank, node, host, pid, step, phase, time, since, interval_s, alive_interval_s}`` up to date, written atomically
  and at most every ``min_interval_s`` (cheap on a shared file system), rewritten by a daemon thread while the main
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

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CollectiveTimeoutError
from .heartbeat import FAILED_PHASE, Heartbeat, is_silent, lost_nodes, read_heartbeats, settle_seconds

__all__ = [
    "CollectiveTracker",
    "collective_timeout_error",
    "is_collective_failure",
    "is_collective_timeout",
]

log = logging.getLogger(__name__)

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
    Ranks in the same step and collective were waiting too and are only counted, unless their heartbeat thread went
    silent (dead, stopped or cut off, wherever they were). A node whose every reporting rank is silent is named as a
    lost node. When every rank that reported was in this collective and alive, the oldest heartbeats are listed (the
    stuck rank hangs inside it: a GPU or network fault).
    ``started`` (this process's start, e.g. :attr:`Heartbeat.created`) marks heartbeats left by an earlier attempt of
    a requeued job; ``now`` is for tests.
    """
    now = time.time() if now is None else now
    peer_lost = not is_collective_timeout(exc)
    what = "lost a peer" if peer_lost else f"timed out after {timeout_minutes:g} min ({CONFIG_KEY})"
    lines = [f"rank {rank} of {world_size} {what} in the collective '{collective}' at step {step}."]
    beats = read_heartbeats(heartbeat_dir)
    if heartbeat_dir is None:
        lines.append(
            "No heartbeat folder was configured, so the stuck rank cannot be named here; compare the ranks' logs."
        )
    else:
        others = [r for r in range(world_size) if r != rank]
        silent = {r for r in others if r in beats and is_silent(beats[r], now)}
        lines += _heartbeat_report(
            beats,
            others,
            silent,
            collective=collective,
            step=step,
            heartbeat_dir=heartbeat_dir,
            started=started,
            now=now,
            max_listed=max_listed,
        )
        lines += _lost_node_lines({r: b for r, b in beats.items() if r < world_size}, silent, now)
    lines.append(_fix_advice(peer_lost, timeout_minutes))
    # The backend's own error, not one raised while it propagated (e.g. a DataLoader worker the launcher killed).
    origin = next((e for e in _chain(exc) if _is_failure_one(e)), exc)
    lines.append(f"Original error: {_short(origin)}")
    return CollectiveTimeoutError("\n".join(lines))


def _suspects(
    beats: dict[int, dict], reported: list[int], silent: set[int], *, step: int, collective: str
) -> tuple[list[int], str, list[int]]:
    """``(behind, head, listed)``: the reported ranks not in this collective at this step or silent, and the heading
    and the ranks to list, silent longest first: ``behind``, or when it is empty every reported rank (the stuck one
    hangs inside the collective)."""
    behind = [r for r in reported if (beats[r].get("step"), beats[r].get("phase")) != (step, collective) or r in silent]
    if behind:
        head = "Ranks not in this collective or silent, silent longest first; likely stuck or dead"
        listed = behind
    elif reported:
        head = "Every rank that reported was in this collective too; oldest heartbeats first"
        listed = reported
    else:
        head = ""
        listed = []
    return behind, head, sorted(listed, key=lambda r: float(beats[r]["time"]))  # silent longest first


def _heartbeat_line(r: int, b: dict, *, now: float, started: float | None) -> str:
    """One listed rank: host, pid, age of its last heartbeat, its step and phase (and for how long), and whether the
    heartbeat predates this process."""
    ago = _fmt_seconds(max(0.0, now - float(b["time"])))
    since = b.get("since")
    in_phase = f" for {_fmt_seconds(max(0.0, now - float(since)))}" if isinstance(since, (int, float)) else ""
    stale = (
        " [heartbeat older than this process: left by an earlier attempt, no report in this one]"
        if started is not None and float(b["time"]) < started
        else ""
    )
    node = f", node {b['node']}" if isinstance(b.get("node"), int) else ""
    return (
        f"  rank {r} on host {b.get('host', '?')} pid {b.get('pid', '?')}: last heartbeat {ago} ago, "
        f"at step {b.get('step', '?')} in '{b.get('phase', '?')}'{in_phase}{node}{stale}"
    )


def _lost_node_lines(beats: dict[int, dict], silent: set[int], now: float) -> list[str]:
    """One line per node whose every reporting rank went silent (a lost node, not one rank)."""
    lines = []
    for node, host, ranks in lost_nodes(beats, silent):
        newest = max(float(beats[r]["time"]) for r in ranks)
        lines.append(
            f"Lost node: node {node} (host {host}), ranks {_rank_list(ranks)}: every one of its ranks went silent "
            f"(newest heartbeat {_fmt_seconds(max(0.0, now - newest))} ago); its launcher or host died, it became "
            "unreachable, or its processes were stopped."
        )
    return lines


def _heartbeat_report(
    beats: dict[int, dict],
    others: list[int],
    silent: set[int],
    *,
    collective: str,
    step: int,
    heartbeat_dir: str | Path,
    started: float | None,
    now: float,
    max_listed: int,
) -> list[str]:
    """The lines that name the likely stuck ranks from the heartbeats of the ``others``: the suspects (at most
    ``max_listed`` in detail), the ranks that never reported, and how many were waiting in the same collective."""
    lines = []
    never = [r for r in others if r not in beats]
    reported = [r for r in others if r in beats]
    behind, head, listed = _suspects(beats, reported, silent, step=step, collective=collective)
    waiting = len(reported) - len(behind)
    if listed:
        lines.append(f"{head} (heartbeats in {heartbeat_dir}):")
    lines += [_heartbeat_line(r, beats[r], now=now, started=started) for r in listed[:max_listed]]
    if len(listed) > max_listed:
        lines.append(f"  ... and {len(listed) - max_listed} more: ranks {_rank_list(listed[max_listed:])}")
    if never:
        lines.append(f"Never reported (no heartbeat file; likely stuck at start-up or dead): ranks {_rank_list(never)}")
    if behind and waiting:
        lines.append(f"{waiting} other rank(s) were in this collective at step {step} as well (waiting, healthy).")
    return lines


def _fix_advice(peer_lost: bool, timeout_minutes: float) -> str:
    """What to do: read the named ranks' logs; for a timeout, also when raising the timeout is the answer."""
    if peer_lost:
        return (
            "Fix: a rank died or its node became unreachable; read the logs of the ranks named above (an exception, "
            "an out-of-memory kill, a node failure) and restart from the latest checkpoint."
        )
    return (
        "Fix: look at the logs and the node of the ranks named above (a hung data loader or file system, a dead "
        "or stopped process, a GPU error, a network fault). If the phase is legitimately slow on some ranks (a "
        f"long checkpoint write or evaluation while the others wait), raise {CONFIG_KEY} (now {timeout_minutes:g})."
    )


def _wait(seconds: float) -> None:
    """Sleep ``seconds`` even if a signal handler raises meanwhile: when the launcher tears this rank down after a
    peer failed, the DataLoader's SIGCHLD handler raises for its killed workers, which must not replace the report
    this rank is about to give."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except Exception as exc:  # any exception of a handler: the report matters more
            log.debug("ignored during the heartbeat wait: %s", exc)


# ---------------------------------------------------------------------------------------------------- the tracker
class CollectiveTracker:
    """The collective-bearing phase this rank is in, and the guard that turns a timeout there into a named error.

    ``enter`` costs a few attribute writes (and a heartbeat write when the interval passed), so the trainer can mark
    every phase of a step: ``"forward and loss embedding exchange (micro-batch 0)"``, ``"backward gradient
    reduction (micro-batch 0)"``, ``"stop-flag all_reduce"``, ``"checkpoint save (barriers, error agreement)"``, and
    the non-collective ones where a rank can hang (``"data loading"``) so the heartbeat shows where a stuck rank
    stopped.
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

    def enter(self, name: str, step: int, *, force: bool = False) -> None:
        """This rank now runs phase ``name`` of optimizer step ``step``."""
        self.phase, self.step = name, step
        if self.heartbeat is not None:
            self.heartbeat.beat(self.step, name, force=force)

    def error(self, exc: BaseException) -> CollectiveTimeoutError:
        """The named error for a collective failure ``exc`` raised in the current phase.

        A lost peer is reported at once (gloo's ``Connection closed by peer``), before the dead ranks' heartbeats
        are older than the live ones': this rank first waits a few heartbeat intervals
        (:func:`~rankclip_ds.trainer.heartbeat.settle_seconds`, at most 30 s) so that the silent ranks, and a
        whole lost node, can be told apart from the survivors."""
        hb = self.heartbeat
        if hb is not None and not is_collective_timeout(exc):
            settle = settle_seconds(read_heartbeats(hb.directory))
            log.warning(
                "rank %d lost a peer; reading the heartbeats in %.1f s to name the silent ranks", self.rank, settle
            )
            _wait(settle)
        err = collective_timeout_error(
            exc,
            collective=self.phase,
            rank=self.rank,
            world_size=self.world_size,
            step=self.step,
            timeout_minutes=self.timeout_minutes,
            heartbeat_dir=hb.directory if hb is not None else None,
            started=hb.created if hb is not None else None,
        )
        if hb is not None:  # the others' reports show that this rank failed with its own error, not silently
            hb.beat(self.step, f"{FAILED_PHASE} {str(err).splitlines()[0]}", force=True)
        return err

    @contextmanager
    def guard(self, name: str | None = None, step: int | None = None) -> Iterator[CollectiveTracker]:
        """Run the block (as phase ``name`` of ``step`` if given; without a name, in the phases its body enters); a
        collective timeout or lost peer raised in it becomes a :class:`CollectiveTimeoutError` (``from`` the
        original), every other exception passes unchanged."""
        if name is not None:
            if step is None:
                raise TypeError(f"CollectiveTracker.guard({name!r}) needs the step it runs in")
            self.enter(name, step)
        try:
            yield self
        except CollectiveTimeoutError:
            raise  # already named by an inner guard
        except Exception as exc:
            if not is_collective_failure(exc):
                raise
            raise self.error(exc) from exc
