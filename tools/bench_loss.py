"""Benchmark the RankCLIP loss: naive vs chunked vs the arithmetic floor, and ring vs allgather on gloo.

Every configuration runs in a FRESH subprocess: a warm-up on a tiny batch (loads kernels, starts threads), then
``--repeat`` timed forward + backward runs (the minimum wall time is kept, with its process CPU time: the machine is
shared, and CPU seconds are the steadier figure), then one more run under ``torch.profiler(profile_memory=True)``
for memory.  ``peak_bytes`` replays that run's allocation and free records in time order and keeps the largest sum
of live tensor bytes: what the loss allocates at its peak, forward + backward, exact at the allocator level.
``rss_peak_bytes`` (the process's resident high-water mark over the same run, reset through
``/proc/self/clear_refs``, minus the resident set before it) is recorded too: it adds allocator fragmentation and
library code pages.  The prediction beside them is ``rankclip_ds.losses.memory_model``.  Naive runs whose
predicted peak exceeds ``--mem-limit-gib`` are reported as "does not fit" and not attempted.

    python tools/bench_loss.py --n 1024 2048 4096 8192 --d 256 --threads 1 --json bench.json
    python tools/bench_loss.py --n 16384 32768 --d 64 --impls naive chunked floor --threads 1 --repeat 0
    python tools/bench_loss.py --distributed 4 --n 4096 --d 256 --threads 1 --repeat 3

Distributed runs compare the overlapped ring (each hop posted before the work on the previous block: the first
chunk's products in the forward gather, the last chunk's gradient products in the reduce-scatter), the blocking
ring (the same work, done before each hop is posted, then the wait) and the all-gather exchange; ``wait s`` is the
exposed communication time: seconds the host spent blocked in ``Work.wait()`` of the exchange, for the slowest rank
(the median over the ``--repeat`` runs), measured by ``rankclip_ds.losses.exchange.WaitClock``; the JSON holds it
per phase (``gather``: features out, ``reduce_scatter``: gradients back), per rank and per run.

On a GPU (``--device cuda``) the same configurations run on the device: times are taken between
``torch.cuda.synchronize()`` calls (the median of ``--repeat`` runs after a warm-up), memory is the allocator's peak
above what was allocated before the loss (``torch.cuda.max_memory_allocated``).  ``--fit-fraction F`` then finds the
largest global N whose loss fits in F x the device's memory on one rank that holds ``--fit-rows`` rows of a job of
N / rows ranks (the other ranks simulated by PyTorch's fake process group: every buffer of the real loss is
allocated at its real size, no data travels), predicted by the memory model and then run for real:

    python tools/bench_loss.py --device cuda --n 65536 --d 512 --impls chunked floor --chunk-size 8 128 512 \
        --repeat 3 --fit-fraction 0.8 --json loss_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 1 << 30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """VmHWM: the resident high-water mark since the last ``_reset_peak`` (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_rss_peak() -> None:
    """Reset VmHWM (Linux: writing 5 to clear_refs) after glibc returns what earlier runs freed."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _profiled_peak(fn) -> tuple[float, int]:
    """Run ``fn`` under ``torch.profiler`` (profile_memory=True); return (seconds, peak live tensor bytes).

    The peak replays every allocation and free the profiler recorded, in time order: the largest sum of live
    tensor bytes, exact at the allocator level and blind to fragmentation and to code pages.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return seconds, peak, result


def _inputs(n, d, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=gen)
    txt = torch.randn(n, d, generator=gen) + 0.5 * img
    return img, txt


WAIT_KEYS = ("wait_seconds", "wait_gather_seconds", "wait_reduce_scatter_seconds")
RING_BLOCKING = "ring-blocking"  # the ring with the work done before each hop is posted (overlap=False)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _run_loss(rec, img, txt, group=None, block_sizes=None):
    """Time forward + backward of one configuration; returns (seconds, loss value, seconds blocked in ring waits)."""
    import torch

    from rankclip_ds.losses import rankclip_loss
    from rankclip_ds.losses.chunked import chunked_rankclip_terms
    from rankclip_ds.losses.exchange import WaitClock
    from rankclip_ds.losses.naive import normalise_inputs

    img = img.clone().requires_grad_()
    txt = txt.clone().requires_grad_()
    log_s = torch.tensor(2.6592, device=img.device, requires_grad=True)  # ln(1/0.07)
    clock = WaitClock()
    _sync(img.device)
    t0 = time.perf_counter()
    if rec["impl"] == "floor":
        _floor(img.detach(), txt.detach(), rec["chunk_size"] or img.shape[0])
        _sync(img.device)
        return time.perf_counter() - t0, float("nan"), {}
    if rec["impl"] in ("chunked-recompute", "chunked"):
        # the library's chunked path (what rankclip_loss runs), with the benchmark's knobs: the blocking ring and
        # the wait clock
        i, t, ls = normalise_inputs(img, txt, log_s)
        out = chunked_rankclip_terms(
            i, t, ls, rank_weight=2.0, lambda_cross=1.0, lambda_in=1.0,
            comm="ring" if rec["comm"] == RING_BLOCKING else rec["comm"], chunk_size=rec["chunk_size"],
            position_weighting=None, group=group, block_sizes=block_sizes,
            backward="recompute" if rec["impl"] == "chunked-recompute" else "fused",
            overlap=rec["comm"] != RING_BLOCKING, clock=clock,
        )  # fmt: skip
    else:
        kw = {"top_k": rec["top_k"]} if rec["impl"] == "top_k" else {}
        out = rankclip_loss(
            img, txt, log_s, rank_weight=2.0, impl=rec["impl"], comm=rec["comm"], chunk_size=rec["chunk_size"],
            group=group, **kw,
        )  # fmt: skip
    out["loss"].backward()
    _sync(img.device)
    return time.perf_counter() - t0, float(out["loss"].detach()), dict(clock.by_phase)


def _floor(img, txt, chunk):
    """The work no implementation avoids: 4 products (b x D by D x N) and 4 b stable argsorts of length N."""
    import torch
    import torch.nn.functional as F

    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    k_all = torch.cat([txt, img], 0)  # (2N, D)
    b = img.shape[0]
    for i0 in range(0, b, chunk):
        rc = torch.cat([img[i0 : i0 + chunk], txt[i0 : i0 + chunk]], 0)
        m = (rc @ k_all.T).view(2, -1, 2, b)
        torch.argsort(m, dim=-1, descending=True, stable=True)


def _device_worker(rec):
    """One configuration on a CUDA device: warm up, ``repeat`` timed runs (the median), the allocator's peak."""
    import statistics

    import torch

    device = torch.device(rec["device"])
    torch.cuda.set_device(device)
    warm = dict(rec, chunk_size=min(rec["chunk_size"] or 64, 64))
    _run_loss(warm, *(x.to(device) for x in _inputs(256, rec["D"])))  # loads the kernels and the allocator
    img, txt = (x.to(device) for x in _inputs(rec["N"], rec["D"]))
    runs = [_run_loss(rec, img, txt) for _ in range(max(1, rec["repeat"]))]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _, value, _ = _run_loss(rec, img, txt)
    peak = torch.cuda.max_memory_allocated(device) - base
    return {"seconds": statistics.median(r[0] for r in runs), "peak_bytes": peak, "loss": value,
            "device_name": torch.cuda.get_device_name(device)}  # fmt: skip


def _fit_worker(rec):
    """One rank of a job of ``N / rows`` ranks, the others simulated by the fake process group: the loss's real
    buffers at their real sizes (``K_all``, its gradient, the chunk workspace), forward + backward; returns the
    peak, or ``{"oom": ...}``."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    device = torch.device(rec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world, rows = rec["P"], rec["N"] // rec["P"]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        img, txt = (x.to(device) for x in _inputs(rows, rec["D"]))

        def run():
            return _run_loss(rec, img, txt, group=dist.group.WORLD, block_sizes=[rows] * world)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            seconds = run()[0]
            peak = torch.cuda.max_memory_allocated(device) - base
        else:  # the profiler's allocation records, as for the CPU rows
            seconds, peak, _ = _profiled_peak(run)
    except torch.OutOfMemoryError as exc:
        return {"oom": str(exc).splitlines()[0]}
    finally:
        dist.destroy_process_group()
    return {"seconds": seconds, "peak_bytes": peak}


def _worker(rec):
    """One configuration in this (fresh) process: warm up on a tiny batch, then ``repeat`` timed runs."""
    import torch

    if rec.get("fit"):
        return _fit_worker(rec)
    if rec.get("device", "cpu") != "cpu":
        return _device_worker(rec)
    torch.set_num_threads(rec["threads"])
    _run_loss(dict(rec, chunk_size=min(rec["chunk_size"] or 64, 64)), *_inputs(64, rec["D"]))  # load kernels
    img, txt = _inputs(rec["N"], rec["D"])
    runs = []
    for _ in range(rec["repeat"]):  # timed with the default allocator
        cpu0 = time.process_time()
        seconds, value, _ = _run_loss(rec, img, txt)
        runs.append((seconds, time.process_time() - cpu0))
    _reset_rss_peak()
    base = _rss_bytes()
    if rec["repeat"] == 0:  # a single run: timed (profiler overhead is per op, and the ops are large) and measured
        cpu0 = time.process_time()
        seconds, peak, (_, value, _) = _profiled_peak(lambda: _run_loss(rec, img, txt))
        cpu = time.process_time() - cpu0
    else:
        seconds, cpu = min(runs)
        _, peak, _ = _profiled_peak(lambda: _run_loss(rec, img, txt))
    rss = max(0, _peak_rss_bytes() - base)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_bytes": peak, "rss_peak_bytes": rss, "loss": value}


def _dist_entry(rank, world, port, rec, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(rec["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    img, txt = _inputs(rec["N"], rec["D"])
    b = rec["N"] // world
    img, txt = img[rank * b : (rank + 1) * b].clone(), txt[rank * b : (rank + 1) * b].clone()
    _run_loss(dict(rec, N=8 * world), img[:8], txt[:8], group=dist.group.WORLD)  # warm up
    runs = []
    for _ in range(max(1, rec["repeat"])):  # the fastest run's time; every run's waits
        dist.barrier()
        cpu0 = time.process_time()
        seconds, value, waits = _run_loss(rec, img, txt, group=dist.group.WORLD)
        runs.append((seconds, time.process_time() - cpu0, waits))
    seconds, cpu, _ = min(runs, key=lambda r: r[0])
    waits = [r[2] for r in runs]
    _reset_rss_peak()
    dist.barrier()
    base = _rss_bytes()
    _, peak, _ = _profiled_peak(lambda: _run_loss(rec, img, txt, group=dist.group.WORLD))
    rss = max(0, _peak_rss_bytes() - base)
    times = [None] * world
    dist.all_gather_object(times, (seconds, cpu, peak, rss, waits))
    if rank == 0:
        queue.put(
            {
                "seconds": max(t[0] for t in times),
                "cpu_seconds": max(t[1] for t in times),
                "peak_bytes": max(t[2] for t in times),
                "rss_peak_bytes": max(t[3] for t in times),
                **_wait_summary([t[4] for t in times]),
                "loss": value,
            }
        )
    dist.destroy_process_group()


def _wait_summary(per_rank: list[list[dict[str, float]]]) -> dict:
    """Waits of every rank in every run (``per_rank[rank][run] = {phase: seconds}``) → the median over runs of the
    slowest rank's total, and of each phase's slowest rank, plus the raw numbers."""
    import statistics

    runs = range(len(per_rank[0]))
    total = [max(sum(rank[i].values()) for rank in per_rank) for i in runs]
    phases = sorted({p for rank in per_rank for run in rank for p in run})
    out = {"wait_seconds": statistics.median(total), "waits_per_rank_and_run": per_rank}
    for phase in phases:
        slowest = [max(rank[i].get(phase, 0.0) for rank in per_rank) for i in runs]
        out[f"wait_{phase}_seconds"] = statistics.median(slowest)
    return out


def _dist_worker(rec):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_dist_entry, args=(r, rec["P"], port, rec, queue)) for r in range(rec["P"])]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return queue.get()


def _launch(rec, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(rec)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _predict_table(d: int, top_k: int) -> None:
    """Per-rank loss memory (GiB, float32) predicted by memory_model, beside open_clip's and Inf-CL's formulas.

    open_clip (local_loss=True, gather_with_grad=True): two b x N logit matrices and the two log-softmax outputs
    autograd keeps (4 b N x 4 bytes) plus the gathered features (2 N D x 4).  Inf-CL (InfoNCE only, ring of feature
    blocks, tiles of 4096 x 4096 recomputed in backward): local features, one block in flight and their gradients
    (~6 b D x 4) plus one tile (4096^2 x 4).  Neither computes ListMLE, whose rows need all N columns at once.
    """
    from rankclip_ds.losses import default_chunk_size, memory_model

    header = f"{'N':>9}{'GPUs':>6}{'b':>8}{'c':>5}{'chunked':>10}{f'top-{top_k}':>10}{'naive':>10}"
    header += f"{'open_clip':>11}{'Inf-CL':>8}"
    print(f"predicted peak loss memory per rank, GiB (D = {d}, float32)")
    print(header)
    print("-" * len(header))
    for n in (1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20):
        for p in (8, 32, 128, 1024):
            b = n // p
            c = default_chunk_size(n, b)
            chunked = memory_model(n, p, d, c) / GIB
            topk = memory_model(n, p, d, max(1, min(b, (1 << 19) // (top_k + 2048))), top_k=top_k, impl="top_k") / GIB
            naive = memory_model(n, p, d, b, impl="naive") / GIB
            open_clip = (4 * b * n * 4 + 2 * n * d * 4) / GIB
            inf_cl = (6 * b * d * 4 + 4096 * 4096 * 4) / GIB
            print(
                f"{n:>9}{p:>6}{b:>8}{c:>5}{chunked:>10.2f}{topk:>10.2f}{naive:>10.0f}{open_clip:>11.2f}{inf_cl:>8.2f}"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="global batch sizes N")
    parser.add_argument("--d", type=int, default=256, help="embedding dim D")
    parser.add_argument("--impls", nargs="+", default=["naive", "chunked", "floor"],
                        help="naive, chunked, chunked-recompute, top_k, floor")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[None],
                        help="rows per chunk; several: one row per value (default: the library's default)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:i]: run the configurations on that device")
    parser.add_argument(
        "--fit-fraction",
        type=float,
        default=None,
        help="also find the largest N whose loss fits in this fraction of the device's memory",
    )
    parser.add_argument("--fit-rows", type=int, default=64, help="rows of the one rank measured by --fit-fraction")
    parser.add_argument("--fit-memory-gib", type=float, default=None,
                        help="device memory for --fit-fraction (default: the CUDA device's total)")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="timed runs per configuration (the minimum is kept); 0: one run, timed under the memory-measuring "
        "allocator setting (for the largest sizes)",
    )  # fmt: skip
    parser.add_argument("--distributed", type=int, default=0, metavar="P",
                        help="run the chunked loss on P gloo ranks with each of --comms")  # fmt: skip
    parser.add_argument("--comms", nargs="+", default=["ring", RING_BLOCKING, "allgather"],
                        help=f"exchanges for --distributed: ring (overlapped), {RING_BLOCKING}, allgather")  # fmt: skip
    parser.add_argument("--mem-limit-gib", type=float, default=20.0, help="naive runs predicted above this are skipped")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--json", metavar="FILE", help="write the records to FILE")
    parser.add_argument(
        "--predict-table", action="store_true",
        help="print the predicted per-rank memory for N = 64k..1M on 8..1024 GPUs (uses --d and --top-k) and exit",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.predict_table:
        _predict_table(args.d, args.top_k)
        return 0
    if args.worker:
        rec = json.loads(args.worker)
        print(json.dumps(_dist_worker(rec) if rec["P"] > 1 and not rec.get("fit") else _worker(rec)))
        return 0

    from rankclip_ds.losses import default_chunk_size, memory_model

    records = []
    plan = []
    for n in args.n:
        if args.distributed:
            plan.extend(("chunked", comm, n, args.distributed, c) for comm in args.comms for c in args.chunk_size)
        else:
            for impl in args.impls:
                plan.extend((impl, "ring", n, 1, c) for c in (args.chunk_size if impl != "naive" else [None]))
    header = (
        f"{'impl':<18}{'comm':<15}{'N':>7}{'P':>3}{'D':>5}{'c':>6}{'seconds':>10}{'cpu s':>9}{'peak MiB':>10}"
        f"{'pred MiB':>10}{'wait s':>8}{'gather':>8}{'r-scat':>8}"
    )
    print(f"device: {args.device}, threads per process: {args.threads}")
    print(header)
    print("-" * len(header))
    for impl, comm, n, world, chunk_arg in plan:
        b = n // world
        chunk = chunk_arg or (default_chunk_size(n, b) if impl != "naive" else None)
        model_impl = {"chunked-recompute": "chunked", "floor": "chunked"}.get(impl, impl)
        top_k = args.top_k if impl == "top_k" else None
        predicted = (
            None if impl == "floor" else memory_model(n, world, args.d, chunk or b, top_k=top_k, impl=model_impl)
        )
        rec = {"impl": impl, "comm": comm, "N": n, "P": world, "D": args.d, "chunk_size": chunk, "top_k": top_k,
               "threads": args.threads, "repeat": args.repeat, "predicted_bytes": predicted,
               "device": args.device}  # fmt: skip
        if impl == "naive" and predicted > args.mem_limit_gib * GIB:
            rec.update(seconds=None, peak_bytes=None, note=f"does not fit (predicted {predicted / GIB:.1f} GiB)")
        else:
            rec.update(_launch(rec, args.timeout))
        records.append(rec)
        if rec.get("seconds") is None:
            status = rec.get("note") or rec.get("error")
            print(f"{impl:<18}{comm:<15}{n:>7}{world:>3}{args.d:>5}{chunk or '-':>6}  {status}", flush=True)
        else:
            print(
                f"{impl:<18}{comm:<15}{n:>7}{world:>3}{args.d:>5}{chunk or '-':>6}{rec['seconds']:>10.2f}"
                f"{rec.get('cpu_seconds', float('nan')):>9.2f}{_mib(rec['peak_bytes']):>10.0f}"
                f"{_mib(predicted):>10.0f}" + "".join(f"{rec.get(k, float('nan')):>8.3f}" for k in WAIT_KEYS),
                flush=True,
            )
    result: dict = {"records": records}
    if args.fit_fraction:
        result["fit"] = _fit(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result if args.fit_fraction else records, f, indent=1)
    return 0


def _mib(value) -> float:
    return float("nan") if value is None else value / 2**20


def _largest_n(predict, budget: float, step: int) -> int:
    """The largest multiple of ``step`` whose ``predict(n)`` is within ``budget`` (0 if none): predictions grow
    with n."""
    if predict(step) > budget:
        return 0
    lo, hi = 1, 2
    while predict(hi * step) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if predict(mid * step) <= budget else (lo, mid)
    return lo * step


def _fit(args) -> dict:
    """The largest global N whose loss fits in ``--fit-fraction`` of the device's memory, on one rank holding
    ``--fit-rows`` rows (the memory model's answer, then a real run; 10 % less after an out-of-memory), and the
    memory model's answer for a single device holding all N rows."""
    from rankclip_ds.losses import default_chunk_size, memory_model

    if args.fit_memory_gib is not None:
        total = args.fit_memory_gib * GIB
    else:
        import torch

        total = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
    budget, rows, d = args.fit_fraction * total, args.fit_rows, args.d

    def per_rank(n: int) -> int:
        return memory_model(n, n // rows, d, default_chunk_size(n, rows))

    def single(n: int) -> int:
        return memory_model(n, 1, d, default_chunk_size(n, n))

    n = _largest_n(per_rank, budget, rows)
    out = {"budget_bytes": budget, "device_bytes": total, "rows_per_rank": rows, "D": d,
           "single_device_n": _largest_n(single, budget, 1024), "tries": []}  # fmt: skip
    print(f"\nlargest N within {args.fit_fraction:.0%} of {total / GIB:.3g} GiB (D = {d}):")
    print(f"  one device holding all N rows (memory model): N = {out['single_device_n']}")
    for _ in range(4):
        if n < rows:
            break
        rec = {"impl": "chunked", "comm": "ring", "N": n, "P": n // rows, "D": d, "chunk_size": None,
               "top_k": None, "threads": args.threads, "repeat": 1, "device": args.device, "fit": True}  # fmt: skip
        got = _launch(rec, args.timeout)
        got.update(N=n, P=n // rows, predicted_bytes=per_rank(n))
        out["tries"].append(got)
        failed = got.get("oom") or got.get("error")
        if not failed and got["peak_bytes"] <= budget:
            out.update(fit_n=n, peak_bytes=got["peak_bytes"], predicted_bytes=got["predicted_bytes"])
            print(
                f"  one rank of {n // rows} holding {rows} rows: N = {n}, peak {_mib(got['peak_bytes']):.0f} MiB "
                f"(predicted {_mib(got['predicted_bytes']):.0f} MiB), forward + backward {got['seconds']:.2f} s"
            )
            return out
        if failed:
            print(f"  N = {n}: {failed}; trying 10 % less")
            n = int(n * 0.9) // rows * rows
        else:  # ran, but above the budget: shrink by the measured excess
            print(f"  N = {n}: peak {_mib(got['peak_bytes']):.0f} MiB exceeds the budget; trying less")
            n = int(n * budget / got["peak_bytes"] * 0.995) // rows * rows
    out["fit_n"] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
