"""Several gateway processes on one PostgreSQL: what forwarding and NOTIFY cost.

``python -m benchmarks.cluster [--calls 2000] [--seconds 5] [--events 4000]``

One JSON line on stdout with, in one run:

- ``latency``: one device on gateway A; sequential tool calls (one in flight)
  alternately to A's internal API (local) and to B's (forwarded to A), p50/p99
  of each and the difference; and live event delivery to a reader on A
  (local push) and on B (NOTIFY, then a read of the table): device send →
  reader receipt, p50/p99.
- ``workers_1`` / ``workers_2``: ``serve --workers N`` on one pair of ports;
  8 devices connect to the shared public port, 32 keep-alive callers to the
  shared internal port (so with 2 workers about half the calls are
  forwarded): tool calls/s; then the 8 devices each stream ``--events``
  events into a run: events/s until every run is completed, and the
  ``NOTIFY``s the gateway sent meanwhile (heard on a LISTEN connection).
- ``notify``: PostgreSQL alone: 4 connections looping
  ``SELECT pg_notify(...)`` (autocommit) for 3 s with one listener: NOTIFYs/s.

The load generator (this process) shares the machine's cores with the
gateways and PostgreSQL; ``machine_busy_cores`` says how busy it was.
Servers listen on 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import orjson
import psutil

from benchmarks.load import HttpClient, http_post
from benchmarks.scenarios import latency_figures
from benchmarks.servers import Database, Server, check_loopback, start_gateway

DEVICES = 8
CALLERS = 32
NOTIFY_CONNECTIONS = 4
NOTIFY_SECONDS = 3.0
LIVE_EVENTS = 300
LIVE_GAP_S = 0.005
WAIT_S = 120.0


def _token(secret: str, sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 3600}, secret, algorithm="HS256")


class Secrets:
    def __init__(self) -> None:
        self.jwt = secrets.token_urlsafe(32)
        self.service = secrets.token_urlsafe(32)

    def env(self, **extra: str) -> dict[str, str]:
        return {"GATEWAY_JWT_SECRET": self.jwt, "GATEWAY_INTERNAL_TOKENS": self.service,
                "GATEWAY_LOG_LEVEL": "warning", **extra}


async def echo_device(session: aiohttp.ClientSession, server: Server, token: str,
                      device_id: str, agent_ids: list[str] | None = None
                      ) -> tuple[aiohttp.ClientWebSocketResponse, asyncio.Task[None]]:
    """A device answering every tool_call at once; returns its socket and its loop."""
    check_loopback(server.ws_url)
    ws = await session.ws_connect(server.ws_url, params={"token": token})
    await ws.send_str(orjson.dumps({"type": "device_hello", "device_id": device_id,
                                    "agent_ids": agent_ids or []}).decode())
    while True:
        frame = orjson.loads((await ws.receive()).data)
        if frame["type"] == "hello_ack":
            break

    async def answer() -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            frame = orjson.loads(msg.data)
            if frame["type"] == "tool_call":
                await ws.send_str(orjson.dumps(
                    {"type": "tool_result", "id": frame["id"], "result": frame["args"]}
                ).decode())

    return ws, asyncio.create_task(answer())


async def http_client(url: str, body: bytes, token: str) -> tuple[HttpClient, bytes]:
    host, port, request = http_post(url, body, token)
    _, client = await asyncio.get_running_loop().create_connection(HttpClient, host, port)
    return client, request


# ---------------------------------------------------------------- latency


async def latency(db: Database, run_dir: Path, calls: int) -> dict[str, Any]:
    keys = Secrets()
    a = start_gateway(db, run_dir, extra_env=keys.env(GATEWAY_INSTANCE_ID="bench-a"))
    b = start_gateway(db, run_dir, extra_env=keys.env(GATEWAY_INSTANCE_ID="bench-b"))
    try:
        async with aiohttp.ClientSession() as session:
            ws, answering = await echo_device(session, a, _token(keys.jwt, "u"), "d",
                                              ["stream"])
            body = orjson.dumps({"user_id": "u", "device_id": "d", "tool": "echo",
                                 "args": {"n": 1}})
            local, local_req = await http_client(f"{a.internal_base}/tool-calls", body,
                                                 keys.service)
            forwarded, fwd_req = await http_client(f"{b.internal_base}/tool-calls", body,
                                                   keys.service)
            times: dict[str, list[float]] = {"local": [], "forwarded": []}
            warmup = min(200, calls)
            for n in range(calls + warmup):
                for name, client, request in (("local", local, local_req),
                                              ("forwarded", forwarded, fwd_req)):
                    started = time.perf_counter()
                    status, answer = await asyncio.wait_for(client.request(request), 10)
                    if status != 200:
                        raise RuntimeError(f"{name} call: {status} {answer[:200]!r}")
                    if n >= warmup:  # the first ones warm up both processes
                        times[name].append(time.perf_counter() - started)
            figures: dict[str, Any] = {
                name: latency_figures(values) for name, values in times.items()}
            added = {q: round(figures["forwarded"][q] - figures["local"][q], 3)
                     for q in ("p50_ms", "p99_ms")}
            figures["forwarding_adds_ms"] = added
            figures["live_events"] = await live_delivery(session, ws, a, b, keys)
            answering.cancel()
            await ws.close()
        return figures
    finally:
        a.stop()
        b.stop()


async def live_delivery(session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                        a: Server, b: Server, keys: Secrets) -> dict[str, Any]:
    """Device send → reader receipt, for a reader on A (the device's) and one on B."""
    headers = {"Authorization": f"Bearer {keys.service}"}
    async with session.post(f"{a.internal_base}/runs", headers=headers,
                            json={"user_id": "u", "agent_id": "stream"}) as resp:
        run = await resp.json()
    run_id = run["run_id"]
    sent: dict[int, float] = {}
    got: dict[str, list[float]] = {"same_process": [], "other_process": []}
    arrived: dict[str, dict[int, float]] = {"same_process": {}, "other_process": {}}

    async def read(name: str, server: Server) -> None:
        async with session.get(f"{server.internal_base}/runs/{run_id}/events",
                               headers=headers, timeout=aiohttp.ClientTimeout(WAIT_S)) as r:
            async for line in r.content:
                now = time.perf_counter()
                seq = orjson.loads(line)["data"]
                if seq in sent:
                    got[name].append(now - sent[seq])
                    arrived[name][seq] = now

    readers = [asyncio.create_task(read("same_process", a)),
               asyncio.create_task(read("other_process", b))]
    await asyncio.sleep(0.5)  # both subscribed
    for n in range(LIVE_EVENTS):
        sent[n] = time.perf_counter()
        await ws.send_str(orjson.dumps({"type": "agent_data", "run_id": run_id,
                                        "data": n}).decode())
        await asyncio.sleep(LIVE_GAP_S)
    await ws.send_str(orjson.dumps({"type": "agent_complete", "run_id": run_id}).decode())
    await asyncio.wait_for(asyncio.gather(*readers), WAIT_S)
    figures: dict[str, Any] = {name: {**latency_figures(values), "events": len(values)}
                               for name, values in got.items()}
    # The same process's reader is pushed each batch as it commits: past that,
    # what the other process's reader waits is the NOTIFY and its re-read.
    figures["other_after_same"] = latency_figures([
        max(0.0, arrived["other_process"][seq] - at)
        for seq, at in arrived["same_process"].items() if seq in arrived["other_process"]])
    return figures


# ---------------------------------------------------------------- throughput


async def throughput(db: Database, run_dir: Path, workers: int, seconds: float,
                     events: int) -> dict[str, Any]:
    keys = Secrets()
    server = start_gateway(db, run_dir, extra_env=keys.env(GATEWAY_WORKERS=str(workers),
                                                           GATEWAY_INSTANCE_ID=f"w{workers}"))
    try:
        await asyncio.sleep(1.0)  # every worker listening
        token = _token(keys.jwt, "u")
        sessions = [aiohttp.ClientSession() for _ in range(DEVICES)]
        devices = [await echo_device(s, server, token, f"d{n}", ["stream"])
                   for n, s in enumerate(sessions)]
        conn = await asyncpg.connect(db.dsn)
        spread = await conn.fetch(
            "SELECT instance_id, count(*) FROM device_presence WHERE user_id = 'u' "
            "GROUP BY instance_id")
        clients = []
        for n in range(CALLERS):
            body = orjson.dumps({"user_id": "u", "device_id": f"d{n % DEVICES}",
                                 "tool": "echo", "args": {"n": n}})
            clients.append(await http_client(f"{server.internal_base}/tool-calls", body,
                                             keys.service))
        for client, request in clients:  # warm-up
            await asyncio.wait_for(client.request(request), 10)
        cpu = psutil.cpu_times()
        deadline = time.monotonic() + seconds
        done = 0
        latencies: list[float] = []

        async def loop(client: HttpClient, request: bytes) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                started = time.perf_counter()
                status, _ = await client.request(request)
                latencies.append(time.perf_counter() - started)
                done += status == 200

        started = time.monotonic()
        await asyncio.gather(*(loop(c, r) for c, r in clients))
        elapsed = time.monotonic() - started
        busy = _busy_cores(cpu, elapsed)
        calls = {"calls_per_s": round(done / elapsed), **latency_figures(latencies),
                 "machine_busy_cores": busy}
        ingest = await stream_events(conn, db.dsn, server, keys, devices, events)
        await conn.close()
        for ws, task in devices:
            task.cancel()
            await ws.close()
        for s in sessions:
            await s.close()
        return {"devices_per_worker": {r["instance_id"]: r["count"] for r in spread},
                "tool_calls": calls, "events": ingest}
    finally:
        server.stop()


async def stream_events(conn: asyncpg.Connection, dsn: str, server: Server, keys: Secrets,
                        devices: list[tuple[aiohttp.ClientWebSocketResponse, Any]],
                        events: int) -> dict[str, Any]:
    notified = 0

    def heard(*_: Any) -> None:
        nonlocal notified
        notified += 1

    listener = await asyncpg.connect(dsn)
    await listener.add_listener("gateway_run_events", heard)
    headers = {"Authorization": f"Bearer {keys.service}"}
    run_ids = []
    async with aiohttp.ClientSession() as session:
        for n in range(len(devices)):
            async with session.post(f"{server.internal_base}/runs", headers=headers, json={
                    "user_id": "u", "agent_id": "stream", "device_id": f"d{n}"}) as resp:
                run_ids.append((await resp.json())["run_id"])
    payload = "x" * 100
    cpu = psutil.cpu_times()
    started = time.monotonic()

    async def feed(ws: aiohttp.ClientWebSocketResponse, run_id: str) -> None:
        for n in range(events):
            await ws.send_str(orjson.dumps({"type": "agent_data", "run_id": run_id,
                                            "data": {"n": n, "p": payload}}).decode())
            if n % 256 == 0:
                await asyncio.sleep(0)
        await ws.send_str(orjson.dumps({"type": "agent_complete", "run_id": run_id}).decode())

    await asyncio.gather(*(feed(ws, run_id) for (ws, _), run_id in zip(devices, run_ids,
                                                                      strict=True)))
    ids = [uuid.UUID(r) for r in run_ids]
    deadline = time.monotonic() + WAIT_S
    while await conn.fetchval(
            "SELECT count(*) FROM agent_run_logs WHERE id = ANY($1) AND status = 'completed'",
            ids) < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError("runs not completed in time")
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.2)
    await listener.close()
    total = events * len(devices)
    return {"events_per_s": round(total / elapsed), "events": total,
            "notifies_sent": notified, "events_per_notify": round(total / max(notified, 1), 1),
            "machine_busy_cores": _busy_cores(cpu, elapsed)}


def _busy_cores(before: Any, elapsed: float) -> float:
    after = psutil.cpu_times()
    busy = (sum(after) - after.idle) - (sum(before) - before.idle)
    return round(busy / max(elapsed, 1e-9), 2)


# ---------------------------------------------------------------- NOTIFY alone


async def notify_rate(dsn: str, seconds: float) -> dict[str, Any]:
    heard = 0

    def on(*_: Any) -> None:
        nonlocal heard
        heard += 1

    listener = await asyncpg.connect(dsn)
    await listener.add_listener("bench_notify", on)
    conns = [await asyncpg.connect(dsn) for _ in range(NOTIFY_CONNECTIONS)]
    deadline = time.monotonic() + seconds
    sent = 0

    async def loop(conn: asyncpg.Connection) -> None:
        nonlocal sent
        while time.monotonic() < deadline:
            await conn.execute("SELECT pg_notify('bench_notify', 'r 0123 456')")
            sent += 1

    started = time.monotonic()
    await asyncio.gather(*(loop(c) for c in conns))
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.5)
    for conn in [*conns, listener]:
        await conn.close()
    return {"notifies_per_s": round(sent / elapsed), "heard": heard, "sent": sent,
            "connections": NOTIFY_CONNECTIONS}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="gw-bench-cluster-"))
    db = Database.open(args.database_url)
    try:
        result: dict[str, Any] = {"scenario": "cluster", "cores": psutil.cpu_count()}
        print("latency: local vs forwarded", file=sys.stderr)
        result["latency"] = await latency(db, run_dir, args.calls)
        for workers in (1, 2):
            print(f"throughput: {workers} worker(s)", file=sys.stderr)
            result[f"workers_{workers}"] = await throughput(db, run_dir, workers, args.seconds,
                                                            args.events)
        print("NOTIFY rate", file=sys.stderr)
        result["notify"] = await notify_rate(db.dsn, args.notify_seconds)
        return result
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per side")
    parser.add_argument("--seconds", type=float, default=5.0, help="tool-call window")
    parser.add_argument("--events", type=int, default=4000, help="events per device")
    parser.add_argument("--notify-seconds", type=float, default=NOTIFY_SECONDS)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    print(orjson.dumps(asyncio.run(main_async(args))).decode())


if __name__ == "__main__":
    main()
