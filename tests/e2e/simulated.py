"""The device simulator (``run_gateway.py device``) as a child process, connected and listed.

Import as ``from e2e.simulated import running_simulator``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import urllib3

from e2e.proc import (
    E2E_SERVICE_TOKEN,
    ENTRY_POINT,
    REPO_ROOT,
    GatewayProcess,
    child_env,
    mint_token,
)

CONNECT_TIMEOUT_S = 15.0
SERVICE_HEADERS = {"Authorization": f"Bearer {E2E_SERVICE_TOKEN}"}


def device_ids(proc: GatewayProcess, user_id: str) -> list[str]:
    """GET /devices of the internal API, as a service would."""
    answer = urllib3.PoolManager().request(
        "GET", f"{proc.internal_url}/devices", fields={"user_id": user_id},
        headers=SERVICE_HEADERS, timeout=2.0)
    return [device["device_id"] for device in orjson.loads(answer.data)["devices"]]


@contextlib.contextmanager
def running_simulator(proc: GatewayProcess, *, user_id: str, device_id: str,
                      log_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The simulator as ``user_id`` (tools echo/sleep/fail, agent stream), until the block ends."""
    log_path = log_dir / f"device-{device_id}.log"
    with log_path.open("wb") as out:
        simulator = subprocess.Popen(
            [sys.executable, str(ENTRY_POINT), "device", "--device-id", device_id,
             "--token", mint_token(user_id), "--url", proc.ws_url, "--quiet"],
            cwd=REPO_ROOT, env=child_env({}), stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while device_id not in device_ids(proc, user_id):
            assert simulator.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"the simulator never connected\n{proc.describe()}"
            time.sleep(0.05)
        yield simulator
    finally:
        simulator.terminate()
        simulator.wait(timeout=10)
