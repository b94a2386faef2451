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

__all__ = ["HEARTBEAT_RE", "Heartbeat", "read_heartbeats"]

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
