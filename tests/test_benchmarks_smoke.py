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
from system_tools import require

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


def require_node_ws() -> None:
    """Node and the `ws` package the benchmark's Node devices use (clients/js)."""
    require("node", "Node.js 20 or newer")
    require(str(ROOT / "clients" / "js" / "node_modules" / "ws"), "cd clients/js && npm ci")


def check_line(line: dict[str, Any], scenario: str, extra: set[str]) -> None:
    assert line["scenario"] == scenario
    assert {"params", "repeat", "ratio", "goal"} <= line.keys()
    for target in ("gateway", "ceiling"):
        missing = (FIGURES | extra) - line[target].keys()
        assert not missing, (target, missing)
    assert "met" in line["goal"]


@pytest.mark.parametrize(("args", "extra"), [
    (["idle", "6", "--hold", "0.2"], {"kb_per_conn", "connections", "hold_server_cpu_pct"}),
    (["idle", "6", "--hold", "0.2", "--client", "python"], {"kb_per_conn", "client"}),
    (["storm", "20"], {"connect_s", "connections", "client", "deflate_negotiated"}),
    (["fleet", "6", "--fleet-hold", "0.5", "--probe-calls", "3"],
     {"kb_per_conn", "hold_server_cpu_pct", "probe_p50_ms", "probe_calls"}),
    (["calls", "2", "0.5", "--warmup", "0.2", "--client", "node"], {"calls", "client"}),
    (["calls", "2", "0.5", "--warmup", "0.2"], {"calls", "errors"}),
    (["ingest", "2", "20", "100"], {"events", "rows_stored", "seconds"}),
    (["ingest", "2", "20", "100", "--event-acks"], {"rows_stored", "acks_received"}),
    (["cleanup", "--trials", "1"], {"close_presence_ms_max", "kill_calls_ms_max"}),
])
def test_scenario_prints_one_json_line(database_url: str, args: list[str],
                                       extra: set[str]) -> None:
    if "node" in args:
        require_node_ws()
    lines = run_bench(*args, "--target", "both", database_url=database_url)
    assert len(lines) == 1
    check_line(lines[0], args[0], extra)


def test_compare_prints_each_scenario_then_a_summary(database_url: str) -> None:
    lines = run_bench("compare", "--quick", "--repeat", "1", "--hold", "0.2", "--trials", "1",
                      "--warmup", "0.2", database_url=database_url, timeout=300)
    assert [line["scenario"] for line in lines] == ["idle", "storm", "fleet", "calls", "ingest",
                                                    "cleanup", "compare"]
    summary = lines[-1]["summary"]
    assert {row["scenario"] for row in summary} == {"idle", "storm", "fleet", "calls", "ingest",
                                                    "cleanup"}
    assert all({"gateway", "ceiling", "ratio", "goal", "client"} <= row.keys()
               for row in summary)
    # The device scenarios say which client they used (Node ws when CI installed it).
    assert all(row["client"] for row in summary if row["scenario"] in ("idle", "storm", "calls"))


def test_node_devices_offer_deflate_and_get_it_only_when_enabled(database_url: str) -> None:
    """The Node client offers permessage-deflate; only GATEWAY_WS_COMPRESS=true accepts it."""
    require_node_ws()
    off = run_bench("idle", "4", "--hold", "0.2", "--client", "node", "--target", "gateway",
                    database_url=database_url)[0]
    on = run_bench("idle", "4", "--hold", "0.2", "--client", "node", "--target", "gateway",
                   "--gateway-env", "GATEWAY_WS_COMPRESS=true", database_url=database_url)[0]
    assert off["gateway"]["deflate_negotiated"] == 0, off["gateway"]
    assert on["gateway"]["deflate_negotiated"] == 4, on["gateway"]
