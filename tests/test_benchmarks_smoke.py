"""Smoke runs of each benchmark scenario at tiny sizes: one JSON line with the expected keys.

Timing is never asserted here (other work shares the machine); the real
measurements are ``python -m benchmarks.run compare`` (benchmarks/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"throughput", "p50_ms", "p99_ms", "max_ms", "server_rss_mb", "server_cpu_pct",
           "generator_procs", "generator_cores", "runs"}

pytestmark = pytest.mark.e2e


def run_bench(*args: str, database_url: str | None = None, timeout: float = 180) -> list[Any]:
    command = [sys.executable, "-m", "benchmarks.run", *args]
    if database_url is not None:
        command += ["--database-url", database_url]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert lines, done.stderr[-3000:]
    return lines


def check_line(line: dict[str, Any], scenario: str, extra: set[str]) -> None:
    assert line["scenario"] == scenario
    assert {"params", "repeat", "ratio", "goal"} <= line.keys()
    for target in ("gateway", "ceiling"):
        missing = (FIGURES | extra) - line[target].keys()
        assert not missing, (target, missing)
    assert "met" in line["goal"]


@pytest.mark.parametrize(("args", "extra"), [
    (["idle", "6", "--hold", "0.2"], {"kb_per_conn", "connections", "hold_server_cpu_pct"}),
    (["calls", "2", "0.5", "--warmup", "0.2"], {"calls", "errors"}),
    (["ingest", "2", "20", "100"], {"events", "rows_stored", "seconds"}),
    (["ingest", "2", "20", "100", "--event-acks"], {"rows_stored", "acks_received"}),
    (["cleanup", "--trials", "1"], {"close_presence_ms_max", "kill_calls_ms_max"}),
])
def test_scenario_prints_one_json_line(database_url: str, args: list[str],
                                       extra: set[str]) -> None:
    lines = run_bench(*args, "--target", "both", database_url=database_url)
    assert len(lines) == 1
    check_line(lines[0], args[0], extra)


def test_compare_prints_each_scenario_then_a_summary(database_url: str) -> None:
    lines = run_bench("compare", "--quick", "--repeat", "1", "--hold", "0.2", "--trials", "1",
                      "--warmup", "0.2", database_url=database_url, timeout=300)
    assert [line["scenario"] for line in lines] == ["idle", "calls", "ingest", "cleanup",
                                                    "compare"]
    summary = lines[-1]["summary"]
    assert {row["scenario"] for row in summary} == {"idle", "calls", "ingest", "cleanup"}
    assert all({"gateway", "ceiling", "ratio", "goal"} <= row.keys() for row in summary)
