"""``tools/gpu_check.sh --tiny``: the prepared GPU check, end to end on the CPU at toy sizes, so that the script a GPU
session runs (tests, loss benchmark, throughput run, report) is known to work before any GPU time is spent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, clean_launcher_env


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1500)
def test_gpu_check_runs_end_to_end_in_tiny_mode(tmp_path):
    out = tmp_path / "out"
    env = {**clean_launcher_env(), "WORK": str(tmp_path / "work")}
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--tiny", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1400)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["tiny"] is True and result["env"]["torch"]
    assert all(part["exit_code"] == 0 for part in result["parts"].values()), result["parts"]
    tests = result["tests"]
    assert tests["ran"] and tests["failed"] == [] and tests["skipped"] == 0 and tests["passed"] >= 12, tests
    loss = result["loss"]
    assert [row["chunk_size"] for row in loss["rows"]] == [32, 128]
    for row in loss["rows"]:
        assert row["chunked"]["seconds"] > 0 and row["floor"]["seconds"] > 0 and row["chunked_over_floor"] > 0
        assert row["chunked"]["peak_bytes"] > 0
    fit = loss["fit"]
    assert fit["fit_n"] > 0 and 0 < fit["peak_bytes"] <= fit["budget_bytes"], fit
    scalars = result["throughput"]["scalars"]
    assert result["throughput"]["step"] == 4
    assert scalars["perf/samples_per_s"] > 0 and 0 < scalars["perf/loss_time_fraction"] < 1
    assert result["measured"]["chunked_over_floor"] == min(r["chunked_over_floor"] for r in loss["rows"])
    for line in ("| tests marked gpu | 12 passed, 0 failed, 0 skipped |", "| MFU |", "| loss share of the step |"):
        assert line in text, line
    assert (out / "gpu_check.log").read_text().count("== ") >= 3
    assert not Path(env["WORK"]).exists()  # scratch removed
