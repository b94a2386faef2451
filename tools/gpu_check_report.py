"""Collects what ``tools/gpu_check.sh`` measured into ``OUT/gpu_check.json`` and prints it beside the targets.

    python tools/gpu_check_report.py OUT --tensorboard RUN/tb [--tiny 1]

Reads ``OUT/env.json``, the tests' JUnit XML (``OUT/gpu_tests.xml``), the loss benchmark (``OUT/loss.json``) and the
throughput run's TensorBoard scalars (the last logging window: the first ones hold the warm-up). The targets (MFU
>= 40 %, the loss <= 5 % of the step, the chunked loss <= 1.5 x the floor) are measured, never asserted: the exit
code is 0 when every part ran and every test passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TARGETS = {"mfu": 0.40, "loss_time_fraction": 0.05, "chunked_over_floor": 1.5}


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tests_summary(xml_path: Path) -> dict:
    """Counts and the failing tests' names from pytest's JUnit XML."""
    if not xml_path.is_file():
        return {"ran": False}
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = [] if suite is None else suite.findall("testcase")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None
              or c.find("error") is not None]  # fmt: skip
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    return {"ran": True, "tests": len(cases), "failed": failed, "skipped": len(skipped),
            "passed": len(cases) - len(failed) - len(skipped)}  # fmt: skip


def loss_summary(data) -> dict:
    """Per chunk size: chunked and floor seconds, their ratio, peak memory; the best ratio; the fit."""
    if data is None:
        return {"ran": False}
    records = data["records"] if isinstance(data, dict) else data
    rows: dict[tuple, dict] = {}
    for rec in records:
        if rec.get("seconds") is None:
            continue
        key = (rec["N"], rec["D"], rec["chunk_size"])
        row = rows.setdefault(key, {"N": rec["N"], "D": rec["D"], "chunk_size": rec["chunk_size"]})
        row[rec["impl"]] = {k: rec.get(k) for k in ("seconds", "peak_bytes", "predicted_bytes")}
    out_rows = []
    for row in rows.values():
        if "chunked" in row and "floor" in row and row["floor"]["seconds"] > 0:
            row["chunked_over_floor"] = row["chunked"]["seconds"] / row["floor"]["seconds"]
        out_rows.append(row)
    ratios = [r["chunked_over_floor"] for r in out_rows if "chunked_over_floor" in r]
    errors = [f"{r['impl']} c={r.get('chunk_size')}: {r.get('error')}" for r in records if r.get("error")]
    return {"ran": True, "rows": out_rows, "best_chunked_over_floor": min(ratios) if ratios else None,
            "fit": data.get("fit") if isinstance(data, dict) else None, "errors": errors}  # fmt: skip


def throughput_summary(tb: Path) -> dict:
    """The last logging window's perf/ and memory/ scalars of the throughput run."""
    if not tb.is_dir():
        return {"ran": False}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.split("/")[0] in ("perf", "memory", "train")]
    last = {t: acc.Scalars(t)[-1].value for t in tags if acc.Scalars(t)}
    steps = max((acc.Scalars(t)[-1].step for t in tags if acc.Scalars(t)), default=0)
    return {"ran": bool(last), "step": steps, "scalars": last}


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f} %" if pct else f"{value:.3g}"


def report(out: Path, tensorboard: Path, tiny: bool) -> dict:
    runs = {name: _load(out / f"{name}_run.json") for name in ("gpu_tests", "loss", "train")}
    result = {
        "tiny": tiny,
        "env": _load(out / "env.json"),
        "parts": runs,
        "tests": tests_summary(out / "gpu_tests.xml"),
        "loss": loss_summary(_load(out / "loss.json")),
        "throughput": throughput_summary(tensorboard),
        "targets": TARGETS,
    }
    scalars = result["throughput"].get("scalars", {})
    mfu = scalars.get("perf/mfu")
    loss_share = scalars.get("perf/loss_time_fraction")
    ratio = result["loss"].get("best_chunked_over_floor")
    peak = scalars.get("memory/cuda_peak_gib", scalars.get("memory/cuda_peak_allocated_gib"))
    result["measured"] = {
        "samples_per_s": scalars.get("perf/samples_per_s"),
        "mfu": mfu,
        "loss_time_fraction": loss_share,
        "peak_memory_gib": peak if peak is not None else scalars.get("memory/rss_peak_gib"),
        "chunked_over_floor": ratio,
        "largest_n": (result["loss"].get("fit") or {}).get("fit_n"),
    }
    met = {
        "mfu": None if mfu is None else mfu >= TARGETS["mfu"],
        "loss_time_fraction": None if loss_share is None else loss_share <= TARGETS["loss_time_fraction"],
        "chunked_over_floor": None if ratio is None else ratio <= TARGETS["chunked_over_floor"],
    }
    result["met"] = met
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))

    env = result["env"] or {}
    print(f"\nGPU check ({'tiny, on the CPU' if tiny else env.get('gpu', 'no GPU found')}), torch {env.get('torch')}")
    t = result["tests"]
    print("\n| part | result |\n|---|---|")
    if t.get("ran"):
        print(f"| tests marked gpu | {t['passed']} passed, {len(t['failed'])} failed, {t['skipped']} skipped |")
        for name in t["failed"]:
            print(f"| failed | {name} |")
    else:
        print("| tests marked gpu | did not run |")
    for part, info in runs.items():
        if info is not None:
            print(f"| {part} exit code, seconds | {info['exit_code']}, {info['seconds']} |")
    loss = result["loss"]
    if loss.get("ran"):
        print("\n| N | D | c | chunked s | floor s | chunked / floor | chunked peak GiB | predicted GiB |")
        print("|---|---|---|---|---|---|---|---|")
        for row in loss["rows"]:
            ch, fl = row.get("chunked", {}), row.get("floor", {})
            peak, pred = (None if ch.get(k) is None else ch[k] / 2**30 for k in ("peak_bytes", "predicted_bytes"))
            print(
                f"| {row['N']} | {row['D']} | {row['chunk_size']} | {_fmt(ch.get('seconds'))} | "
                f"{_fmt(fl.get('seconds'))} | {_fmt(row.get('chunked_over_floor'))} | {_fmt(peak)} | {_fmt(pred)} |"
            )
        fit = loss.get("fit") or {}
        if fit:
            print(f"\nlargest N within {fit['budget_bytes'] / 2**30:.3g} GiB: {fit.get('fit_n')} on one rank holding "
                  f"{fit['rows_per_rank']} rows (peak {_fmt((fit.get('peak_bytes') or 0) / 2**30)} GiB); "
                  f"{fit['single_device_n']} on one device holding all rows (memory model)")  # fmt: skip
    m = result["measured"]
    print("\n| measure | value | target | met |\n|---|---|---|---|")
    print(f"| samples/s | {_fmt(m['samples_per_s'])} | | |")
    print(f"| MFU | {_fmt(mfu, pct=True)} | >= 40 % | {met['mfu']} |")
    print(f"| loss share of the step | {_fmt(loss_share, pct=True)} | <= 5 % | {met['loss_time_fraction']} |")
    print(f"| chunked / floor (best c) | {_fmt(ratio)} | <= 1.5 | {met['chunked_over_floor']} |")
    print(f"| peak memory GiB | {_fmt(m['peak_memory_gib'])} | | |")
    print(f"| largest N in 80 % of memory | {m['largest_n']} | | |")
    print(f"\nwritten: {out / 'gpu_check.json'}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tensorboard", type=Path, required=True, help="the throughput run's tb folder")
    parser.add_argument("--tiny", type=int, default=0)
    args = parser.parse_args(argv)
    result = report(args.out, args.tensorboard, bool(args.tiny))
    parts_ok = all(p is not None and p["exit_code"] == 0 for p in result["parts"].values())
    tests_ok = result["tests"].get("ran") and not result["tests"]["failed"]
    return 0 if parts_ok and tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
