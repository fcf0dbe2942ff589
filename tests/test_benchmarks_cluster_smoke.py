"""A smoke run of ``python -m benchmarks.cluster`` at tiny sizes: one JSON line, every figure.

Timing is never asserted (other work shares the machine); README "Several
processes" has the real measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def test_cluster_benchmark_prints_every_figure(database_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster", "--calls", "20", "--seconds", "0.3",
         "--events", "30", "--notify-seconds", "0.3", "--database-url", database_url],
        cwd=ROOT, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    latency = line["latency"]
    for side in ("local", "forwarded"):
        assert {"p50_ms", "p99_ms"} <= latency[side].keys()
    assert {"p50_ms", "p99_ms"} <= latency["forwarding_adds_ms"].keys()
    for reader in ("same_process", "other_process"):
        assert latency["live_events"][reader]["events"] == 300
    for workers in ("workers_1", "workers_2"):
        assert line[workers]["tool_calls"]["calls_per_s"] > 0
        assert line[workers]["events"]["events"] == 8 * 30
        assert line[workers]["events"]["notifies_sent"] >= 1
    assert set(line["workers_2"]["devices_per_worker"]) <= {"w2/1", "w2/2"}
    assert line["notify"]["notifies_per_s"] > 0
