"""One measurement of one scenario against one running server (gateway or ceiling).

Each coroutine returns a flat dict of figures. The driver (``benchmarks.run``)
starts and stops the servers, repeats, and takes medians.

Common figures: ``throughput`` (in ``unit``), ``p50_ms``/``p99_ms``/``max_ms``
(what a latency is depends on the scenario), ``server_rss_mb``,
``server_cpu_pct`` (100 = one core), ``db_cpu_pct`` (PostgreSQL, all its
processes, when it is ours), ``generator_procs`` and ``generator_cores``
(the load generator's worker processes plus this driver, in cores), and
``machine_busy_cores`` (all of the machine, other people's work included).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import psutil

from benchmarks import load
from benchmarks.profile import Profiler
from benchmarks.servers import CpuWindow, Database, Server, rss_bytes

MB = 1024 * 1024
FINAL = ("completed", "error", "cancelled")
_MP = multiprocessing.get_context("spawn")


@dataclass
class Context:
    server: Server
    db: Database | None
    procs: int
    profile_path: Path | None = None
    workers: list[tuple[BaseProcess, Connection]] = field(default_factory=list)

    @property
    def is_gateway(self) -> bool:
        return self.server.kind == "gateway"

    def spawn(self, target: Callable[[Connection, dict[str, Any]], None],
              cfg: dict[str, Any]) -> tuple[BaseProcess, Connection]:
        parent, child = _MP.Pipe()
        proc = _MP.Process(target=target, args=(child, cfg), daemon=True)
        proc.start()
        child.close()
        self.workers.append((proc, parent))
        return proc, parent

    def worker_pids(self) -> list[int]:
        """The workers and their children (the Node processes some of them run)."""
        pids = [p.pid for p, _ in self.workers if p.pid is not None]
        for pid in list(pids):
            with contextlib.suppress(psutil.Error):
                pids.extend(c.pid for c in psutil.Process(pid).children(recursive=True))
        return pids

    def window(self) -> CpuWindow:
        db = self.db
        return CpuWindow({
            "server": lambda: [self.server.pid],
            "db": (lambda: db.pids()) if db is not None and self.is_gateway else list,
            "generator": lambda: [*self.worker_pids(), os.getpid()],
        })

    def profiler(self, part: str = "") -> Profiler | None:
        """py-spy on the server; ``part`` names a second window of one run ("hold")."""
        if self.profile_path is None or not Profiler.available():
            return None
        path = self.profile_path
        if part:
            path = path.with_name(f"{path.stem}-{part}{path.suffix}")
        return Profiler(self.server.pid, path)

    async def reap(self) -> None:
        """Join every worker (bounded), ending the ones that do not leave in time."""
        deadline = time.monotonic() + 30
        loop = asyncio.get_running_loop()
        for proc, pipe in self.workers:
            await loop.run_in_executor(None, proc.join, max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            pipe.close()
        self.workers.clear()


async def expect(pipe: Connection, kind: str, timeout: float) -> Any:
    """The worker's next message, which must be ``kind``."""
    message = await load.recv(pipe, timeout)
    if message[0] != kind:
        raise RuntimeError(f"worker sent {message[0]!r} instead of {kind!r}: {message[1]!r}")
    return message[1]


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def latency_figures(seconds: Sequence[float]) -> dict[str, float | None]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {"p50_ms": ms(percentile(seconds, 0.50)), "p99_ms": ms(percentile(seconds, 0.99)),
            "max_ms": ms(max(seconds) if seconds else None)}


def cpu_figures(cores: dict[str, float], procs: int) -> dict[str, Any]:
    return {
        "server_cpu_pct": round(cores["server"] * 100, 1),
        "db_cpu_pct": round(cores["db"] * 100, 1),
        "generator_procs": procs,
        "generator_cores": cores["generator"],
        "machine_busy_cores": cores["machine_busy"],
    }


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of ``range(total)`` in ``parts`` near-equal pieces."""
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def headers(server: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.service_token}"} if server.service_token else {}


# ---------------------------------------------------------------- idle N


async def warm_up_devices(server: Server, tag: str, mint: load.TokenMinter) -> None:
    """16 devices connect, say hello and leave, then a second's pause: lazily imported
    modules and first-use caches are not per-connection cost."""
    async with load.new_session() as session:
        warm = [await load.connect_device(session, server.ws_url, mint(f"{tag}-warm"),
                                          f"{tag}-warm", f"{tag}-warm{i}") for i in range(16)]
        for ws, _ in warm:
            await ws.close()
    await asyncio.sleep(1.0)


CLIENTS = ("python", "node")
DEVICES_PER_USER = 4


def _client_label(client: str) -> str:
    """What the figures were measured with (README and compare name it)."""
    return {"python": "aiohttp (no deflate offered)",
            "node": "Node ws (offers permessage-deflate)"}[client]


async def idle(ctx: Context, n: int, *, hold_s: float = 5.0, concurrency: int = 32,
               client: str = "python", probe_calls: int = 0) -> dict[str, Any]:
    """N devices connect and say hello, then stay idle: memory per connection and CPU.

    ``client``: "python" (aiohttp workers) or "node" (Node's `ws`, offering
    deflate, as real devices do). ``probe_calls``: during the hold, that many
    sequential tool calls to one more device, while the N idle (latency).
    """
    server = ctx.server
    tag = f"idle{server.public_port}"
    mint = load.TokenMinter(server.jwt_secret)
    await warm_up_devices(server, tag, mint)
    rss_baseline = rss_bytes(server.pid)

    ranges = split(n, ctx.procs)
    worker = load.node_worker if client == "node" else load.idle_worker
    pipes = [ctx.spawn(worker, {
        "ws_url": server.ws_url, "jwt_secret": server.jwt_secret, "tag": tag,
        # 4 per user: at most GATEWAY_MAX_HELLO_PENDING_PER_USER (8) of a user's
        # sockets may await their hello at once, and a storm has them all waiting.
        "indices": r, "devices_per_user": DEVICES_PER_USER, "concurrency": concurrency,
        # Like the simulator's default: one agent advertised, so each hello claims runs.
        "agent_ids": ["stream"],
        "connect_timeout_s": 60 + n / 50, "hold_timeout_s": 300 + n / 50 + hold_s,
        "max_s": 600 + n / 50 + hold_s,
    })[1] for r in ranges]
    for pipe in pipes:
        await expect(pipe, "ready", 60)
    window, profiler = ctx.window(), ctx.profiler()
    window.start()
    if profiler:  # the ramp: connects and hellos (idle, storm, fleet)
        profiler.start()
    for pipe in pipes:
        pipe.send("go")
    reports = [await expect(p, "connected", 120 + n / 50) for p in pipes]
    ramp = window.stop()
    if profiler:
        profiler.stop()
    connected = sum(r["connected"] for r in reports)
    latencies = [x for r in reports for x in r["latencies"]]
    ramp_s = max(r["finished"] for r in reports) - min(r["started"] for r in reports)

    await asyncio.sleep(min(2.0, hold_s))  # let the dust of the ramp settle
    probe_latencies: list[float] = []
    probe_errors: list[str] = []
    probe_device = None
    if probe_calls:
        _, probe_device = ctx.spawn(load.device_worker, {
            "ws_url": server.ws_url, "jwt_secret": server.jwt_secret,
            "user_id": f"{tag}-probe-u", "device_id": f"{tag}-probe-d",
            "max_s": hold_s + 300})
        await expect(probe_device, "ready", 60)
    hold, hold_profiler = ctx.window(), ctx.profiler("hold")
    hold.start()
    if hold_profiler:
        hold_profiler.start()
    if probe_calls:
        await _probe(server, f"{tag}-probe-u", f"{tag}-probe-d", probe_calls, hold_s,
                     probe_latencies, probe_errors)
    else:
        await asyncio.sleep(hold_s)
    held = hold.stop()
    if hold_profiler:
        hold_profiler.stop()
    rss_loaded = rss_bytes(server.pid)
    if probe_device is not None:
        probe_device.send(("stop",))
        await expect(probe_device, "done", 30)

    for pipe in pipes:
        pipe.send("stop")
    done = [await expect(p, "done", 120) for p in pipes]
    await ctx.reap()
    return {
        "unit": "connections/s",
        "connections": connected,
        "failed": sum(r["failed"] for r in reports),
        "failures": [f for r in reports for f in r["failures"]][:3],
        "unexpected_closes": sum(d["unexpected_closes"] for d in done),
        "throughput": round(connected / max(ramp_s, 1e-9), 1),
        "connect_s": round(ramp_s, 3),
        **latency_figures(latencies),
        "rss_baseline_mb": round(rss_baseline / MB, 1),
        "server_rss_mb": round(rss_loaded / MB, 1),
        "kb_per_conn": round((rss_loaded - rss_baseline) / 1024 / max(connected, 1), 2),
        **cpu_figures(ramp, ctx.procs),
        "hold_s": hold_s,
        "hold_server_cpu_pct": round(held["server"] * 100, 2),
        "hold_server_kernel_pct": round(held["server_kernel"] * 100, 2),
        "client": _client_label(client),
        "deflate_negotiated": sum(r.get("deflate_negotiated", 0) for r in reports),
        **({"probe_calls": len(probe_latencies), "probe_errors": probe_errors[:3],
            **{f"probe_{k}": v for k, v in latency_figures(probe_latencies).items()}}
           if probe_calls else {}),
    }


async def _probe(server: Server, user_id: str, device_id: str, count: int, spread_s: float,
                 latencies: list[float], errors: list[str]) -> None:
    """``count`` tool calls to one device, one at a time, spread over ``spread_s``."""
    gap = spread_s / max(count, 1)
    deadline = time.monotonic() + spread_s
    async with aiohttp.ClientSession(headers=headers(server)) as session:
        for _ in range(count):
            started = time.monotonic()
            try:
                async with session.post(f"{server.internal_base}/tool-calls", json={
                    "user_id": user_id, "device_id": device_id, "tool": "echo",
                    "args": {"n": 1}, "timeout_s": 10,
                }) as response:
                    await response.read()
                    if response.status != 200:
                        errors.append(str(response.status))
                    else:
                        latencies.append(time.monotonic() - started)
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(repr(exc)[:200])
            await asyncio.sleep(max(0.0, min(gap - (time.monotonic() - started),
                                             deadline - time.monotonic())))
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------- calls C S


async def calls(ctx: Context, concurrency: int, seconds: float, *,
                warmup_s: float = 1.0, client: str = "python") -> dict[str, Any]:
    """C callers, one call in flight each, through one device that answers at once."""
    server = ctx.server
    user_id, device_id = f"calls{server.public_port}-u", f"calls{server.public_port}-d"
    _, device = ctx.spawn(load.node_worker if client == "node" else load.device_worker, {
        "ws_url": server.ws_url, "jwt_secret": server.jwt_secret, "user_id": user_id,
        "device_id": device_id, "max_s": seconds + warmup_s + 180, "mode": "device",
    })
    await expect(device, "ready", 60)
    loops = [b - a for a, b in split(concurrency, ctx.procs)]
    callers = [ctx.spawn(load.caller_worker, {
        "url": f"{server.internal_base}/tool-calls", "service_token": server.service_token,
        "user_id": user_id, "device_id": device_id, "loops": n,
    })[1] for n in loops]
    for pipe in callers:
        await expect(pipe, "ready", 60)
    window_start = time.monotonic() + warmup_s
    window_end = window_start + seconds
    for pipe in callers:
        pipe.send(("go", window_start, window_end))
    window, profiler = ctx.window(), ctx.profiler()
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    window.start()
    if profiler:
        profiler.start()
    await asyncio.sleep(max(0.0, window_end - time.monotonic()))
    cores = window.stop()
    if profiler:
        profiler.stop()
    rss = rss_bytes(server.pid)
    results = [await expect(p, "done", 60) for p in callers]
    device.send(("stop",))
    answered = await expect(device, "done", 30)
    await ctx.reap()
    latencies = [x for r in results for x in r["latencies"]]
    statuses: dict[str, int] = {}
    for r in results:
        for status, count in r["statuses"].items():
            statuses[str(status)] = statuses.get(str(status), 0) + count
    ok = statuses.get("200", 0)
    return {
        "unit": "calls/s",
        "calls": ok,
        "throughput": round(ok / seconds, 1),
        **latency_figures(latencies),
        "errors": sum(statuses.values()) - ok + sum(r["error_count"] for r in results),
        "statuses": statuses,
        "device_answered": answered["answered"],
        "client": _client_label(client),
        "server_rss_mb": round(rss / MB, 1),
        **cpu_figures(cores, ctx.procs + 1),
    }


# ---------------------------------------------------------------- ingest K M B


async def _create_runs(server: Server, devices: list[tuple[str, str]]) -> list[str]:
    async with aiohttp.ClientSession(headers=headers(server)) as session:
        async def create(user_id: str, device_id: str) -> str:
            async with session.post(f"{server.internal_base}/runs", json={
                "user_id": user_id, "agent_id": "bench", "device_id": device_id,
                "input": {},
            }) as response:
                body = await response.json()
                if response.status != 201 or body.get("status") != "running":
                    raise RuntimeError(f"run not dispatched: {response.status} {body}")
                return str(body["run_id"])

        return list(await asyncio.gather(*(create(u, d) for u, d in devices)))


async def _ingest_round(ctx: Context, pipes: list[Connection], number: int,
                        devices: list[tuple[str, str]], db_conn: asyncpg.Connection | None,
                        max_s: float, profiler: Profiler | None = None
                        ) -> dict[str, Any]:
    """One round: every device streams into one run; returns its timings and counts."""
    window = ctx.window()
    window.start()
    if profiler:
        profiler.start()
    started = time.monotonic()
    completion: dict[str, float] = {}
    ids: list[uuid.UUID] = []
    for pipe in pipes:
        pipe.send(("round", number))
    if db_conn is not None:
        ids = [uuid.UUID(r) for r in await _create_runs(ctx.server, devices)]
        deadline = started + max_s
        while len(completion) < len(ids) and time.monotonic() < deadline:
            for row in await db_conn.fetch(
                    "SELECT id FROM agent_run_logs WHERE id = ANY($1::uuid[]) "
                    "AND status = ANY($2::text[])", ids, list(FINAL)):
                completion.setdefault(str(row["id"]), time.monotonic())
            if len(completion) < len(ids):
                await asyncio.sleep(0.01)
    sent = [await expect(p, "sent", max_s) for p in pipes]
    per_device = {d: f for s in sent for d, f in s.items()}
    if db_conn is None:
        completion = {d: f["done"] for d, f in per_device.items() if "done" in f}
    ended = max(completion.values()) if completion else None
    cores = window.stop()
    if profiler:
        profiler.stop()
    rows, statuses = None, {}
    if db_conn is not None:
        rows = await db_conn.fetchval(
            "SELECT count(*) FROM agent_run_events WHERE run_id = ANY($1::uuid[])", ids)
        statuses = {r["status"]: r["n"] for r in await db_conn.fetch(
            "SELECT status, count(*) AS n FROM agent_run_logs WHERE id = ANY($1::uuid[]) "
            "GROUP BY status", ids)}
    return {"started": started, "ended": ended, "completion": completion, "cores": cores,
            "rows": rows, "statuses": statuses,
            "last_sent": max(f.get("last_sent", started) for f in per_device.values()),
            "acks": sum(f.get("acks", 0) for f in per_device.values())}


async def ingest(ctx: Context, k: int, m: int, size: int, *, warmup_events: int = 200,
                 event_acks: bool = False) -> dict[str, Any]:
    """K devices stream M events of ~B bytes each into a run; time until all are stored.

    A warm-up round (``warmup_events`` per device, through the same devices,
    runs and pool connections) comes first and is reported apart: the first
    batches of a fresh process pay for statement preparation and type
    introspection, each round trip delayed by the streaming devices.
    """
    server = ctx.server
    tag = f"ing{server.public_port}"
    devices = [(f"{tag}-u{i}", f"{tag}-d{i}") for i in range(k)]
    rounds = [warmup_events, m] if warmup_events > 0 else [m]
    max_s = 120 + k * sum(rounds) / 2000
    pipes = [ctx.spawn(load.ingest_worker, {
        "ws_url": server.ws_url, "jwt_secret": server.jwt_secret, "kind": server.kind,
        "devices": devices[a:b], "rounds": rounds, "size": size, "max_s": max_s,
        "event_acks": event_acks,
    })[1] for a, b in split(k, ctx.procs)]
    for pipe in pipes:
        await expect(pipe, "ready", 60)
    db_conn = await asyncpg.connect(ctx.db.dsn) if ctx.is_gateway and ctx.db else None
    try:
        warm = None
        if warmup_events > 0:
            warm = await _ingest_round(ctx, pipes, 0, devices, db_conn, max_s)
        measured = await _ingest_round(ctx, pipes, len(rounds) - 1, devices, db_conn, max_s,
                                       ctx.profiler())
    finally:
        if db_conn is not None:
            await db_conn.close()
    rss = rss_bytes(server.pid)
    for pipe in pipes:
        pipe.send("stop")
    for pipe in pipes:
        await expect(pipe, "done", 60)
    await ctx.reap()
    started, ended = measured["started"], measured["ended"]
    elapsed = (ended - started) if ended is not None else None
    stored = measured["rows"] if measured["rows"] is not None else k * m
    warm_s = None
    if warm is not None and warm["ended"] is not None:
        warm_s = round(warm["ended"] - warm["started"], 3)
    return {
        "unit": "events/s",
        "events": k * m,
        "rows_stored": measured["rows"],
        "runs_completed": len(measured["completion"]),
        "run_statuses": measured["statuses"],
        "seconds": None if elapsed is None else round(elapsed, 3),
        "throughput": None if not elapsed else round(stored / elapsed, 1),
        "send_s": round(measured["last_sent"] - started, 3),
        "event_acks": event_acks,
        "acks_received": measured["acks"],
        # Latency here: from the start until each run was seen finished.
        **latency_figures([t - started for t in measured["completion"].values()]),
        "warmup_events": k * warmup_events,
        "warmup_s": warm_s,
        "server_rss_mb": round(rss / MB, 1),
        **cpu_figures(measured["cores"], len(pipes)),
    }


# ---------------------------------------------------------------- cleanup


async def _presence(session: aiohttp.ClientSession, server: Server, user_id: str,
                    device_id: str) -> bool:
    async with session.get(f"{server.internal_base}/devices",
                           params={"user_id": user_id}) as response:
        body = orjson.loads(await response.read())
    return any(d.get("device_id") == device_id for d in body.get("devices", ()))


async def cleanup(ctx: Context, *, trials: int = 5, pending: int = 4) -> dict[str, Any]:
    """A device with pending calls goes away: time until presence drops it and calls fail.

    ``close``: the device closes its WebSocket. ``kill``: its process is SIGKILLed
    (the kernel closes the TCP connection, no close frame).
    """
    server = ctx.server
    modes = ("close", "kill")
    times: dict[str, dict[str, list[float]]] = {m: {"presence": [], "calls": []} for m in modes}
    failures: list[str] = []
    window = ctx.window()
    window.start()
    async with aiohttp.ClientSession(headers=headers(server)) as session:
        for trial in range(trials):
            for mode in modes:
                user_id = f"clean{server.public_port}-u{trial}{mode}"
                device_id = f"clean{server.public_port}-d{trial}{mode}"
                proc, pipe = ctx.spawn(load.device_worker, {
                    "ws_url": server.ws_url, "jwt_secret": server.jwt_secret,
                    "user_id": user_id, "device_id": device_id, "max_s": 60})
                await expect(pipe, "ready", 60)

                async def call(user_id: str = user_id,
                               device_id: str = device_id) -> tuple[int, Any, float]:
                    async with session.post(f"{server.internal_base}/tool-calls", json={
                        "user_id": user_id, "device_id": device_id, "tool": "hang",
                        "args": {}, "timeout_s": 30,
                    }) as response:
                        body = await response.read()
                        return response.status, orjson.loads(body), time.monotonic()

                tasks = [asyncio.create_task(call()) for _ in range(pending)]
                pipe.send(("wait_calls", pending))
                await expect(pipe, "seen", 15)
                if not await _presence(session, server, user_id, device_id):
                    failures.append(f"{mode}: device not listed before closing")
                if mode == "close":
                    pipe.send(("close",))
                    gone_from = None
                else:
                    gone_from = time.monotonic()
                    assert proc.pid is not None
                    os.kill(proc.pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                presence_gone = None
                while time.monotonic() < deadline:
                    if not await _presence(session, server, user_id, device_id):
                        presence_gone = time.monotonic()
                        break
                    await asyncio.sleep(0.002)
                async with asyncio.timeout(15):
                    answers = await asyncio.gather(*tasks)
                if gone_from is None:
                    gone_from = await expect(pipe, "closed", 10)
                    await expect(pipe, "done", 10)
                with contextlib.suppress(Exception):
                    await ctx.reap()
                if presence_gone is None:
                    failures.append(f"{mode}: still listed after 10 s")
                else:
                    times[mode]["presence"].append(presence_gone - gone_from)
                bad = [(s, b) for s, b, _ in answers
                       if s != 503 or b.get("error") != "device_disconnected"]
                if bad:
                    failures.append(f"{mode}: pending calls answered {bad[:2]}")
                times[mode]["calls"].append(max(t for _, _, t in answers) - gone_from)
    cores = window.stop()
    worst = [max(p, c) for m in modes for p, c in zip(times[m]["presence"], times[m]["calls"],
                                                      strict=False)]
    figures: dict[str, Any] = {
        "unit": None, "throughput": None, "trials": trials, "pending_calls": pending,
        # Latency here: per trial, the later of "gone from presence" and "calls failed".
        **latency_figures(worst),
        "failures": failures[:5],
    }
    for mode in modes:
        for what in ("presence", "calls"):
            values = times[mode][what]
            figures[f"{mode}_{what}_ms_p50"] = latency_figures(values)["p50_ms"]
            figures[f"{mode}_{what}_ms_max"] = latency_figures(values)["max_ms"]
    figures["server_rss_mb"] = round(rss_bytes(server.pid) / MB, 1)
    figures.update(cpu_figures(cores, 1))
    return figures
