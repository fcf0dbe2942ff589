"""Faults injected into the real process (issue 11): the database stops, its connections are
killed, a device stops reading. Each test records its row of the README's reliability table.

Stopping PostgreSQL needs a server of the test's own (``own_server``): never the
session's shared one, which other tests use at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import attrs
import orjson
import pytest
from harness import Device
from pg import memory_backed_temp_root, migrate_database, run_blocking
from reliability_table import record

from e2e.proc import (
    GatewayProcess,
    call_api,
    connect_device,
    database_env,
    mint_token,
    running_gateway,
)
from gateway.dev.embedded_db import EmbeddedPostgres

pytestmark = pytest.mark.e2e

OUTAGE_S = 10.0
FEEDERS = 4
EVENTS_BEFORE = 500  # per device, before the outage
EVENTS_DURING = 500  # per device, paced across the outage
EVENTS_AFTER = 500  # per device, after the restart
COMPLETE_WITHIN_S = 30.0


# ---------------------------------------------------------------- a database of the test's own


@attrs.define(eq=False)
class OwnServer:
    data_dir: Path
    server: EmbeddedPostgres

    @property
    def dsn(self) -> str:
        return self.server.dsn

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.stop)  # fast shutdown: sessions are terminated

    async def start(self) -> None:
        dsn = self.server.dsn
        self.server = await asyncio.to_thread(EmbeddedPostgres.start, self.data_dir)
        assert self.server.dsn == dsn, "the restarted server must be where the gateway looks"


@pytest.fixture
def own_server() -> Iterator[OwnServer]:
    """An embedded PostgreSQL only this test uses (migrated), stopped and removed after."""
    scratch = Path(tempfile.mkdtemp(prefix="gw-faults-", dir=memory_backed_temp_root()))
    own = OwnServer(scratch / "pg", EmbeddedPostgres.start(scratch / "pg"))
    try:
        run_blocking(migrate_database(own.dsn))
        yield own
    finally:
        own.server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------- devices that stream


@attrs.define(eq=False)
class Feeder:
    """A device feeding one run; a reader task keeps its socket read (pings answered)."""

    device: Device
    run_id: str
    frames: asyncio.Queue[dict[str, Any]] = attrs.Factory(asyncio.Queue)
    closed_with: int | None = None
    sent: int = 0
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        while True:
            msg = await self.device.ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.frames.put_nowait(orjson.loads(msg.data))
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                self.closed_with = self.device.ws.close_code
                return

    async def send_events(self, count: int, over_s: float = 0.0) -> None:
        """``count`` agent_data frames, spread evenly over ``over_s`` seconds."""
        chunk = 10
        pause = over_s / max(1, count // chunk)
        for _ in range(0, count, chunk):
            for _ in range(chunk):
                self.sent += 1
                await self.device.send({"type": "agent_data", "run_id": self.run_id,
                                        "data": {"n": self.sent}})
            if pause:
                await asyncio.sleep(pause)

    async def until_pong(self) -> list[dict[str, Any]]:
        """Frames up to the answer to a ping sent now (frames are handled in order)."""
        await self.device.send({"type": "ping"})
        seen = []
        async with asyncio.timeout(COMPLETE_WITHIN_S):
            while True:
                frame = await self.frames.get()
                if frame["type"] == "pong":
                    return seen
                seen.append(frame)

    async def complete(self) -> int:
        """agent_complete until it is not refused (internal_error is retryable); attempts."""
        attempts = 0
        deadline = time.monotonic() + COMPLETE_WITHIN_S
        while True:
            attempts += 1
            await self.device.send({"type": "agent_complete", "run_id": self.run_id})
            errors = [f for f in await self.until_pong() if f["type"] == "error"]
            if not errors:
                return attempts
            assert [e["code"] for e in errors] == ["internal_error"], errors
            assert time.monotonic() < deadline, "agent_complete refused for too long"
            await asyncio.sleep(0.5)


async def open_feeders(session: aiohttp.ClientSession, proc: GatewayProcess,
                       count: int) -> list[Feeder]:
    feeders = []
    for index in range(count):
        user, device_id = f"user-{index}", f"feeder-{index}"
        device = await connect_device(session, proc.ws_url, token=mint_token(user),
                                      user_id=user, device_id=device_id, agent_ids=["agent-a"])
        status, run = await call_api(session, "POST", f"{proc.internal_url}/runs",
                                     {"user_id": user, "agent_id": "agent-a"})
        assert status == 201 and run["status"] == "running", run
        assert (await device.recv_type("agent_run"))["run_id"] == run["run_id"]
        feeder = Feeder(device, run["run_id"])
        feeder.reader = asyncio.create_task(feeder.read())
        feeders.append(feeder)
    return feeders


@contextlib.asynccontextmanager
async def feeding(proc: GatewayProcess, count: int) -> AsyncIterator[list[Feeder]]:
    async with aiohttp.ClientSession() as session:
        feeders = await open_feeders(session, proc, count)
        try:
            yield feeders
        finally:
            for feeder in feeders:
                if feeder.reader is not None:
                    feeder.reader.cancel()
                await feeder.device.close()


async def assert_stored_once_in_order(dsn: str, feeders: list[Feeder]) -> int:
    """Every event each feeder sent is stored once, numbered 1..n in order, run completed."""
    conn = await asyncpg.connect(dsn)
    total = 0
    try:
        for feeder in feeders:
            rows = await conn.fetch("SELECT seq, (data->>'n')::int AS n FROM agent_run_events "
                                    "WHERE run_id = $1 ORDER BY seq", uuid.UUID(feeder.run_id))
            assert [(r["seq"], r["n"]) for r in rows] == [
                (n, n) for n in range(1, feeder.sent + 1)], feeder.run_id
            run = await conn.fetchrow("SELECT status, event_count FROM agent_run_logs "
                                      "WHERE id = $1", uuid.UUID(feeder.run_id))
            assert (run["status"], run["event_count"]) == ("completed", feeder.sent), run
            total += len(rows)
    finally:
        await conn.close()
    return total


async def readyz(session: aiohttp.ClientSession, proc: GatewayProcess) -> int:
    async with session.get(f"{proc.public_url}/readyz",
                           timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status


# ---------------------------------------------------------------- PostgreSQL stopped


async def test_postgres_stopped_and_restarted_while_devices_stream(
    own_server: OwnServer, tmp_path: Path
) -> None:
    """PostgreSQL stops for 10 s while 4 devices stream: every accepted event is stored
    once and in order, every run completes, no device is disconnected; /readyz is 503
    during the outage and 200 after it."""
    with running_gateway(database_env(own_server.dsn), log_dir=tmp_path) as proc:
        async with feeding(proc, FEEDERS) as feeders, aiohttp.ClientSession() as session:
            await asyncio.gather(*(f.send_events(EVENTS_BEFORE) for f in feeders))
            assert await readyz(session, proc) == 200
            await own_server.stop()
            during = asyncio.gather(*(f.send_events(EVENTS_DURING, OUTAGE_S) for f in feeders))
            statuses_during = []
            began = time.monotonic()
            while time.monotonic() - began < OUTAGE_S:
                statuses_during.append(await readyz(session, proc))
                await asyncio.sleep(0.5)
            await during
            await own_server.start()
            await asyncio.gather(*(f.send_events(EVENTS_AFTER) for f in feeders))
            attempts = await asyncio.gather(*(f.complete() for f in feeders))
            assert [f.closed_with for f in feeders] == [None] * FEEDERS
            deadline = time.monotonic() + 30
            while await readyz(session, proc) != 200:
                assert time.monotonic() < deadline, f"/readyz not 200 again\n{proc.describe()}"
                await asyncio.sleep(0.2)
        assert 503 in statuses_during and 200 not in statuses_during[2:], statuses_during
        total = await assert_stored_once_in_order(own_server.dsn, feeders)
        assert total == FEEDERS * (EVENTS_BEFORE + EVENTS_DURING + EVENTS_AFTER)
        code, _ = proc.stop()
        assert code == 0, proc.describe()
    record("e2e-1-postgres-stopped",
           injected=f"PostgreSQL stopped (fast shutdown) for {OUTAGE_S:g} s, then restarted, "
                    "while devices stream",
           inputs=f"{FEEDERS} devices, {FEEDERS} runs, {total:,} events "
                  f"({FEEDERS * EVENTS_DURING:,} sent during the outage)",
           outcome=f"all {total:,} stored once, in order; {FEEDERS}/{FEEDERS} runs completed; "
                   "no device disconnected; /readyz 503 during, 200 after",
           test="test_postgres_stopped_and_restarted_while_devices_stream")
    del attempts


# ---------------------------------------------------------------- connections killed

KILL_ROUNDS = 10
EVENTS_PER_ROUND = 50  # per device

WAITING_INSERT = """
SELECT pid FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid()
   AND wait_event_type = 'Lock'
   AND (query LIKE '%INSERT INTO agent_run_events%' OR query LIKE 'COPY %agent_run_events%')
"""
OTHER_BACKENDS = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""


async def kill_the_writer_mid_insert(killer: asyncpg.Connection, feeders: list[Feeder]) -> None:
    """Hold the events table, let a batch start, terminate its backend mid-INSERT."""
    tx = killer.transaction()
    await tx.start()
    try:
        await killer.execute("LOCK TABLE agent_run_events IN EXCLUSIVE MODE")
        await asyncio.gather(*(f.send_events(EVENTS_PER_ROUND) for f in feeders))
        await asyncio.gather(*(f.until_pong() for f in feeders))  # all accepted
        deadline = time.monotonic() + 10
        while True:
            # Within a transaction pg_stat_activity is a snapshot: take a new one each time.
            await killer.execute("SELECT pg_stat_clear_snapshot()")
            if pids := [r["pid"] for r in await killer.fetch(WAITING_INSERT)]:
                break
            assert time.monotonic() < deadline, ("no INSERT waiting on the lock", [
                dict(r) for r in await killer.fetch(
                    "SELECT pid, state, wait_event_type, left(query, 60) AS q "
                    "FROM pg_stat_activity WHERE datname = current_database()")])
            await asyncio.sleep(0.02)
        for pid in pids:
            assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await tx.rollback()


async def test_connections_killed_server_side_mid_batch(database_url: str,
                                                       tmp_path: Path) -> None:
    """pg_terminate_backend on the event writer's connection in the middle of its INSERT,
    ten times, and on every other connection of the gateway every other time: nothing lost,
    nothing stored twice, runs complete, /readyz 200 after."""
    with running_gateway(database_env(database_url), log_dir=tmp_path) as proc:
        killer = await asyncpg.connect(database_url)
        try:
            async with feeding(proc, 3) as feeders, aiohttp.ClientSession() as session:
                for round_ in range(KILL_ROUNDS):
                    await kill_the_writer_mid_insert(killer, feeders)
                    if round_ % 2:
                        await killer.execute(OTHER_BACKENDS)
                for feeder in feeders:
                    await feeder.complete()
                assert [f.closed_with for f in feeders] == [None] * 3
                deadline = time.monotonic() + 30
                while await readyz(session, proc) != 200:
                    assert time.monotonic() < deadline, proc.describe()
                    await asyncio.sleep(0.2)
        finally:
            await killer.close()
        total = await assert_stored_once_in_order(database_url, feeders)
        assert total == 3 * KILL_ROUNDS * EVENTS_PER_ROUND
        failed_writes = [line for line in proc.log_lines()
                         if line.get("event") == "event_write_failed"]
        assert len(failed_writes) >= KILL_ROUNDS, failed_writes
        assert "event_rows_dropped" not in proc.events()
        code, _ = proc.stop()
        assert code == 0, proc.describe()
    record("e2e-2-backends-terminated",
           injected=f"pg_terminate_backend of the event writer's connection mid-INSERT, "
                    f"{KILL_ROUNDS} times; of every gateway connection every other time",
           inputs=f"3 devices, 3 runs, {total:,} events",
           outcome=f"all {total:,} stored once, in order; 3/3 runs completed; no device "
                   "disconnected; /readyz 200 after",
           test="test_connections_killed_server_side_mid_batch")


# ---------------------------------------------------------------- a device that stops reading

STUCK_CALLS = 40
STUCK_ARG_BYTES = 1024 * 1024
OTHER_CALLS = 200


async def answer_calls(device: Device, answered: list[str]) -> None:
    """Answer every tool_call but those of tool "never" (they time out and are cancelled)."""
    while True:
        frame = await device.recv(timeout=60)
        if frame["type"] == "tool_call" and frame["tool"] != "never":
            answered.append(frame["id"])
            await device.send({"type": "tool_result", "id": frame["id"],
                               "result": frame["args"]})


async def test_a_device_that_stops_reading_costs_only_itself(database_url: str,
                                                             tmp_path: Path) -> None:
    """One device stops reading while tool calls go to it and to another device: its queue
    fills, it is closed and its calls fail; every call of the other device is answered, and
    the calls of it that time out (tool_cancel) and the app-ping loop cancel none of them."""
    env = database_env(database_url, GATEWAY_HEARTBEAT_S="1", GATEWAY_APP_PING="1")
    with running_gateway(env, log_dir=tmp_path) as proc:
        async with aiohttp.ClientSession() as session:
            stuck = await connect_device(session, proc.ws_url, token=mint_token("stuck-user"),
                                         user_id="stuck-user", device_id="stuck")
            other = await connect_device(session, proc.ws_url, token=mint_token("other-user"),
                                         user_id="other-user", device_id="other")
            answered: list[str] = []
            answering = asyncio.create_task(answer_calls(other, answered))
            url = f"{proc.internal_url}/tool-calls"
            big = "x" * STUCK_ARG_BYTES

            async def call_stuck(n: int) -> int:
                status, _ = await call_api(session, "POST", url, {
                    "user_id": "stuck-user", "tool": "t", "args": {"n": n, "pad": big},
                    "timeout_s": 20})
                return status

            async def call_other(n: int) -> tuple[int, Any]:
                tool = "never" if n % 4 == 0 else "echo"
                return await call_api(session, "POST", url, {
                    "user_id": "other-user", "tool": tool, "args": {"n": n},
                    "timeout_s": 0.3 if tool == "never" else 20})

            stuck_calls = asyncio.gather(*(call_stuck(n) for n in range(STUCK_CALLS)))
            other_results = []
            for start in range(0, OTHER_CALLS, 20):
                other_results += await asyncio.gather(
                    *(call_other(n) for n in range(start, start + 20)))
            stuck_statuses = await stuck_calls
            answering.cancel()
            close_code = await stuck.expect_close(timeout=30)
            proc.wait_for_event("device_disconnected", timeout=10)  # logged after its close
            disconnected = [line for line in proc.log_lines()
                            if line.get("event") == "device_disconnected"]
            assert [line["device_id"] for line in disconnected] == ["stuck"], disconnected
            for n, (status, body) in enumerate(other_results):
                if n % 4 == 0:
                    assert (status, body["error"]) == (504, "timeout"), body
                else:
                    assert (status, body["result"]) == (200, {"n": n}), body
            # 503 device_disconnected when it was closed, 404 for calls that came after.
            assert set(stuck_statuses) <= {503, 504, 404}, stuck_statuses
            assert 503 in stuck_statuses, stuck_statuses
            assert close_code in (1008, 1006, None), close_code
            assert "device_send_queue_full" in proc.events()
        code, _ = proc.stop()
        assert code == 0, proc.describe()
    ok, late = OTHER_CALLS - OTHER_CALLS // 4, OTHER_CALLS // 4
    record("e2e-3-device-stops-reading",
           injected="a device stops reading its socket while tool calls go to it and to "
                    "another device (app pings every 1 s)",
           inputs=f"{STUCK_CALLS} calls of 1 MiB to the stuck device; {OTHER_CALLS} calls to "
                  f"the other, {OTHER_CALLS // 4} of them left to time out (tool_cancel)",
           outcome="stuck device's queue filled: closed, its calls 503 (404 once it was "
                   f"gone); other device: {ok}/{ok} answered 200, {late}/{late} 504 timeout",
           test="test_a_device_that_stops_reading_costs_only_itself")
