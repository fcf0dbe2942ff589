"""Soak: minutes of churn on loopback, then RSS, open fds and asyncio tasks against a baseline.

    python -m benchmarks.soak --minutes 3 [--devices 40] [--database-url DSN]

Starts an embedded PostgreSQL (unless ``--database-url``) and ``run_gateway.py``
on loopback ports. Devices connect, stay a few seconds and leave (a clean
close, an abort, or a replacement by a second connection with the same device
id); callers make tool calls and create runs meanwhile, which devices stream
a few events into and complete. The baseline is read from ``/metrics``
(``process_resident_memory_bytes``, ``process_open_fds``,
``gateway_asyncio_tasks``) after one warm-up round; the end figures once the
load stopped and every device left. Exit 1 if fds or tasks did not return to
the baseline, or RSS grew more than ``--rss-slack-mb``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from benchmarks.load import TokenMinter, connect_device
from benchmarks.servers import ROOT, Database, Server, check_loopback, start_gateway

SERIES = {"rss_mb": "process_resident_memory_bytes", "fds": "process_open_fds",
          "tasks": "gateway_asyncio_tasks", "devices": "gateway_devices_connected"}
STAY_S = (0.5, 4.0)
EVENTS_PER_RUN = 5
QUIET_TIMEOUT_S = 30.0
FD_SLACK = 4  # pool connections opened or closed on their own schedule
TASK_SLACK = 4


async def scrape(session: aiohttp.ClientSession, server: Server) -> dict[str, float]:
    async with session.get(f"http://127.0.0.1:{server.public_port}/metrics") as resp:
        text = await resp.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        for key, series in SERIES.items():
            if name == series:
                values[key] = float(value) / (1 << 20) if key == "rss_mb" else float(value)
    return values


class Soak:
    def __init__(self, server: Server, devices: int, seed: int) -> None:
        self.server = server
        self.devices = devices
        self.minter = TokenMinter(server.jwt_secret)
        self.random = random.Random(seed)
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def device_life(self, session: aiohttp.ClientSession, slot: int,
                          until: float) -> None:
        """Connect, serve calls and runs, leave in one of three ways; again until ``until``."""
        user, device_id = f"soak-user-{slot}", f"soak-device-{slot}"
        while time.monotonic() < until:
            try:
                ws, _ = await connect_device(session, self.server.ws_url, self.minter(user),
                                             user, device_id, ["soak-agent"])
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                self.count("connect_failed")
                await asyncio.sleep(0.5)
                continue
            self.count("connections")
            serving = asyncio.create_task(self.serve(ws))
            await asyncio.sleep(self.random.uniform(*STAY_S))
            way = self.random.choice(("close", "abort", "replace"))
            self.count(f"left_{way}")
            if way == "replace":  # a second connection takes over; the first is closed 4000
                with contextlib.suppress(aiohttp.ClientError, ConnectionError, TimeoutError):
                    ws2, _ = await connect_device(session, self.server.ws_url,
                                                  self.minter(user), user, device_id,
                                                  ["soak-agent"])
                    await ws2.close()
            elif way == "abort":
                ws._response.connection.transport.abort()  # type: ignore[union-attr]
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await serving
            await ws.close()

    async def serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            frame = orjson.loads(msg.data)
            if frame["type"] == "tool_call":
                await ws.send_str(orjson.dumps({"type": "tool_result", "id": frame["id"],
                                                "result": frame["args"]}).decode())
            elif frame["type"] == "agent_run":
                for n in range(EVENTS_PER_RUN):
                    await ws.send_str(orjson.dumps({"type": "agent_data",
                                                    "run_id": frame["run_id"],
                                                    "data": {"n": n}}).decode())
                await ws.send_str(orjson.dumps({"type": "agent_complete",
                                                "run_id": frame["run_id"]}).decode())
                self.count("runs_fed")

    async def caller(self, session: aiohttp.ClientSession, until: float) -> None:
        headers = {"Authorization": f"Bearer {self.server.service_token}"}
        base = self.server.internal_base
        while time.monotonic() < until:
            user = f"soak-user-{self.random.randrange(self.devices)}"
            if self.random.random() < 0.2:
                body = {"user_id": user, "agent_id": "soak-agent"}
                path = "/runs"
            else:
                body = {"user_id": user, "tool": "echo", "args": {"x": 1}, "timeout_s": 2}
                path = "/tool-calls"
            try:
                async with session.post(base + path, data=orjson.dumps(body),
                                        headers=headers) as resp:
                    await resp.read()
                    self.count(f"{path.strip('/')}_{resp.status}")
            except aiohttp.ClientError:
                self.count(f"{path.strip('/')}_failed")

    async def round(self, seconds: float, callers: int) -> None:
        until = time.monotonic() + seconds
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(
                *(self.device_life(session, slot, until) for slot in range(self.devices)),
                *(self.caller(session, until) for _ in range(callers)))


async def quiet(server: Server) -> dict[str, float]:
    """Figures once no device is connected and they stopped moving (bounded)."""
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        previous: dict[str, float] = {}
        while True:
            await asyncio.sleep(1.0)
            figures = await scrape(session, server)
            settled = (figures.get("devices") == 0 and previous
                       and figures["tasks"] == previous["tasks"]
                       and figures["fds"] == previous["fds"])
            if settled or time.monotonic() > deadline:
                return figures
            previous = figures


async def soak(server: Server, *, seconds: float, devices: int, callers: int,
               seed: int) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    check_loopback(server.ws_url)
    load = Soak(server, devices, seed)
    await load.round(min(10.0, seconds / 6), callers)  # warm-up: pools, caches, imports
    baseline = await quiet(server)
    await load.round(seconds, callers)
    end = await quiet(server)
    return baseline, end, load.counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-slack-mb", type=float, default=20.0)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--gateway-root", type=Path, default=ROOT,
                        help="source tree whose run_gateway.py to run (to A/B a change)")
    opts = parser.parse_args(argv)
    db = Database.open(opts.database_url)
    run_dir = Path(tempfile.mkdtemp(prefix="gw-soak-"))
    server = start_gateway(db, run_dir, extra_env={"GATEWAY_APP_PING": "1",
                                                   "GATEWAY_HEARTBEAT_S": "5"},
                           root=opts.gateway_root)
    try:
        baseline, end, counts = asyncio.run(soak(
            server, seconds=opts.minutes * 60, devices=opts.devices, callers=opts.callers,
            seed=opts.seed))
    finally:
        code = server.stop()
        db.close()
    checks = {
        "fds": end["fds"] <= baseline["fds"] + FD_SLACK,
        "tasks": end["tasks"] <= baseline["tasks"] + TASK_SLACK,
        "rss_mb": end["rss_mb"] <= baseline["rss_mb"] + opts.rss_slack_mb,
    }
    print(f"{'figure':<8} {'baseline':>10} {'end':>10}  back to baseline")
    for key, ok in checks.items():
        print(f"{key:<8} {baseline[key]:>10.1f} {end[key]:>10.1f}  {'yes' if ok else 'NO'}")
    print(json.dumps({"minutes": opts.minutes, "devices": opts.devices,
                      "callers": opts.callers, "baseline": baseline, "end": end,
                      "counts": dict(sorted(counts.items())), "gateway_exit": code,
                      "log": str(server.log_path)}))
    return 0 if all(checks.values()) and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
