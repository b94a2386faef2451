"""Each rank's heartbeat file: where it is (step, phase) and that it is alive, for naming a stuck rank
(watchdog.py reads them when a collective times out)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["FAILED_PHASE", "HEARTBEAT_RE", "Heartbeat", "is_silent", "lost_nodes", "read_heartbeats", "settle_seconds"]

log = logging.getLogger("rankclip_ds.trainer.watchdog")

HEARTBEAT_RE = re.compile(r"^rank(\d+)\.json$")


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

    def __init__(
        self, directory: str | Path, rank: int, *, min_interval_s: float = 10.0, node: int | None = None
    ) -> None:
        self.directory = Path(directory)
        self.rank = rank
        self.node = node
        """The node (launcher group) this rank runs on, e.g. torchrun's ``GROUP_RANK``: names a lost node, even where
        every node has the same host name (containers, one machine in tests)."""
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
                "node": self.node,
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


# A rank whose heartbeat thread runs rewrites its file every ``alive_interval_s``; one that has not written for more
# than two of them (plus some slack for a loaded file system) is dead, stopped or cut off, wherever it was.
SILENT_AFTER_INTERVALS = 2.0
# The phase of a rank's last heartbeat once it failed with its own error (then it is gone, but not silently).
FAILED_PHASE = "failed:"
SILENT_SLACK_S = 0.5
MAX_SETTLE_S = 30.0


def is_silent(record: dict[str, Any], now: float) -> bool:
    """Whether the rank of this heartbeat ``record`` went silent: it ran the heartbeat thread (``alive_interval_s``
    set) and has not written for more than two of its intervals. Records without the thread (written only at phase
    changes) never count as silent: their age says nothing about the process; nor does a rank whose last heartbeat
    says it failed with its own error (:data:`FAILED_PHASE`)."""
    alive = record.get("alive_interval_s")
    if not isinstance(alive, (int, float)) or alive <= 0 or str(record.get("phase", "")).startswith(FAILED_PHASE):
        return False
    return now - float(record["time"]) > SILENT_AFTER_INTERVALS * alive + SILENT_SLACK_S


def settle_seconds(beats: dict[int, dict[str, Any]]) -> float:
    """How long to wait after a peer vanished before :func:`is_silent` separates the dead from the living (every
    live rank has rewritten its file by then): two intervals of the slowest heartbeat thread plus slack, at most
    30 s; 0 when no rank runs the thread."""
    intervals = [
        float(b["alive_interval_s"]) for b in beats.values() if isinstance(b.get("alive_interval_s"), (int, float))
    ]
    if not intervals:
        return 0.0
    return min(MAX_SETTLE_S, (SILENT_AFTER_INTERVALS + 0.5) * max(intervals) + SILENT_SLACK_S)


def lost_nodes(beats: dict[int, dict[str, Any]], silent: set[int]) -> list[tuple[int, str, list[int]]]:
    """``(node, host, ranks)`` of every node (a heartbeat's ``node``) whose every reporting rank is in ``silent``:
    a whole node gone (its launcher killed, the host down or unreachable, its processes stopped), not one rank."""
    by_node: dict[int, list[int]] = {}
    for r, b in beats.items():
        if isinstance(b.get("node"), int):
            by_node.setdefault(b["node"], []).append(r)
    return [
        (node, str(beats[ranks[0]].get("host", "?")), sorted(ranks))
        for node, ranks in sorted(by_node.items())
        if all(r in silent for r in ranks)
    ]
