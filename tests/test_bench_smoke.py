"""Smoke test of the benchmark runner: one short scenario, real processes, no timing asserted."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(not shutil.which("wrk"), reason="wrk is not installed"),
    pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed (the origin)"),
    pytest.mark.skipif(not shutil.which("taskset"), reason="taskset is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("fastproxy._core") is None,
                       reason="fastproxy._core is not built (pip install -e .)"),
]


@pytest.mark.timeout(120)
def test_quick_run_writes_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "get-100b",
         "--targets", "direct,fastproxy-1w", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]

    (result,) = tmp_path.glob("*-get-100b.json")
    data = json.loads(result.read_text())
    assert data["scenario"]["name"] == "get-100b"
    runs = {r["target"]: r for r in data["runs"]}
    assert set(runs) == {"direct", "fastproxy-1w"}
    for run in runs.values():
        assert run["requests"] > 0
        assert run["socket_errors"] == 0 and run["non_2xx"] == 0, run
        for key in ("throughput", "p50_ms", "p99_ms", "origin_cpu_us_per_req", "other_cpu"):
            assert isinstance(run[key], (int, float)), key
    proxy = runs["fastproxy-1w"]
    assert proxy["cpu_us_per_req"] > 0 and proxy["peak_rss_mib"] > 0
    assert runs["direct"]["cpu_us_per_req"] is None

    summary = data["summary"]["targets"]["fastproxy-1w"]
    assert summary["errors"] == 0 and summary["baseline"] == "nginx-1w"
    assert {"median", "min", "max"} <= set(summary["throughput"])
    assert (tmp_path / result.name.replace("get-100b.json", "summary.md")).exists()
    assert "| fastproxy-1w |" in proc.stdout
