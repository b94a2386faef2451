"""One rank of the collective-timeout test (tests/test_watchdog.py), run as a subprocess.

Usage: ``python _watchdog_worker.py SCENARIO HEARTBEAT_DIR OUT_JSON`` with ``RANK``, ``WORLD_SIZE`` (2),
``MASTER_ADDR``, ``MASTER_PORT`` and ``TIMEOUT_S`` in the environment.

Rank 1 writes its heartbeat at step 4 in phase ``forward`` and then never joins a collective again: it sleeps
(``sleep``), stops itself with SIGSTOP (``stop``), or exits without cleaning up (``die``). Rank 0 runs the
collective of the scenario inside :meth:`CollectiveTracker.guard` and writes what it caught to ``OUT_JSON``:
``all_reduce`` (the stop flag) for ``sleep`` and ``die``, the loss's ``batch_isend_irecv`` ring exchange for ``stop``.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from rankclip_ds.losses.exchange import BlockLayout, gather_blocks
from rankclip_ds.trainer.errors import CollectiveTimeoutError
from rankclip_ds.trainer.heartbeat import Heartbeat
from rankclip_ds.trainer.watchdog import CollectiveTracker


def main() -> None:
    scenario, hb_dir, out_path = sys.argv[1:4]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout_s = float(os.environ["TIMEOUT_S"])
    torch.set_num_threads(1)
    # Start-up gets a long timeout (a loaded CI machine may start the two processes seconds apart); only the
    # collective under test runs in a group with the short one.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    group = dist.new_group(ranks=list(range(world)), timeout=datetime.timedelta(seconds=timeout_s))
    heartbeat = Heartbeat(hb_dir, rank, min_interval_s=0.5)
    if rank == 1:
        heartbeat.beat(4, "forward")
        dist.barrier()  # rank 0 starts its collective only after this heartbeat is on disk
        if scenario == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif scenario == "die":
            time.sleep(0.5)
            os._exit(3)
        time.sleep(600)  # the test kills this process long before
        return
    tracker = CollectiveTracker(
        rank=rank, world_size=world, timeout_minutes=timeout_s / 60, heartbeat=heartbeat.start()
    )
    dist.barrier()
    result: dict[str, object] = {"raised": None}
    try:
        if scenario == "stop":
            local = torch.arange(8.0).reshape(4, 2)  # this rank's [T_r; I_r] block, b_r = 2 rows each
            with tracker.guard("loss ring exchange (forward)", step=7):
                gather_blocks(local, BlockLayout([2, 2], rank), group, "ring")
        else:
            with tracker.guard("stop-flag all_reduce", step=4):
                dist.all_reduce(torch.zeros(1, dtype=torch.int64), op=dist.ReduceOp.MAX, group=group)
    except CollectiveTimeoutError as exc:
        cause = exc.__cause__
        result = {
            "raised": type(exc).__name__,
            "message": str(exc),
            "cause_type": type(cause).__name__ if cause is not None else None,
            "cause": str(cause) if cause is not None else None,
        }
    except Exception as exc:  # recorded for the test's assertion message rather than lost in stderr
        result = {"raised": type(exc).__name__, "message": str(exc), "cause_type": None, "cause": None}
    heartbeat.stop()
    with open(out_path, "w") as fh:
        json.dump(result, fh)
    print(result.get("message"), flush=True)
    os._exit(0)  # no process-group teardown handshake with a peer that will never answer


if __name__ == "__main__":
    main()
