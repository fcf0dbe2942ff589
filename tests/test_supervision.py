"""Database faults inside one gateway: what breaks stays contained (issue 11, items 1, 3, 4).

Faults are real where PostgreSQL can make them: a lock that holds the writer,
a deleted run, a trigger that refuses one UPDATE. Where it cannot on demand
(asyncpg's InternalClientError, raised when a connection breaks
mid-statement), ``FaultyStore`` raises it in front of the real store.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import attrs
import orjson
import pytest
from aiohttp import web
from harness import SERVICE_TOKEN, Device, Harness
from reliability_table import record
from structlog.testing import capture_logs

from gateway.app import build_internal_app, watchdog_loop
from gateway.store import Store
from gateway.systemd import SystemdNotifier


@attrs.frozen(eq=False)
class FaultyStore(Store):
    """The real store, but its next ``write_events`` calls raise ``faults`` first, in turn;
    ``faults_after`` are raised after the real write committed (the answer lost)."""

    faults: list[BaseException] = attrs.Factory(list)
    faults_after: list[BaseException] = attrs.Factory(list)

    async def write_events(self, records: Any, last_seq_by_run: Any) -> None:
        if self.faults:
            raise self.faults.pop(0)
        await super().write_events(records, last_seq_by_run)
        if self.faults_after:
            raise self.faults_after.pop(0)


async def start_run(gw: Harness, device: Device, agent_id: str = "agent-a") -> str:
    status, run = await gw.api("POST", "/runs", {"user_id": device.user_id, "agent_id": agent_id,
                                                 "device_id": device.device_id})
    assert status == 201 and run["status"] == "running", run
    assert (await device.recv_type("agent_run"))["run_id"] == run["run_id"]
    return str(run["run_id"])


async def stored_events(database_url: str, run_id: str) -> list[tuple[int, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT seq, data->>'n' AS n FROM agent_run_events "
                                "WHERE run_id = $1 ORDER BY seq", uuid.UUID(run_id))
    finally:
        await conn.close()
    return [(row["seq"], int(row["n"])) for row in rows]


async def run_row(database_url: str, run_id: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchrow("SELECT status, errors::text AS errors, event_count "
                                   "FROM agent_run_logs WHERE id = $1", uuid.UUID(run_id))
    finally:
        await conn.close()


async def send_events(device: Device, run_id: str, numbers: range) -> None:
    for n in numbers:
        await device.send({"type": "agent_data", "run_id": run_id, "data": {"n": n}})
    await device.send({"type": "ping"})
    await device.recv_type("pong")


async def readyz(gw: Harness) -> tuple[int, Any]:
    async with gw.public.get("/readyz") as resp:
        return resp.status, await resp.json()


# ---------------------------------------------------------------- item 1: the event writer


async def test_writer_retries_a_connection_broken_mid_statement(
    make_gateway: Any, database_url: str
) -> None:
    """InternalClientError (neither PostgresError nor InterfaceError) is transient: the
    batch is tried again in the writer's own loop, stored once and in order; the loop
    itself never fails (no supervisor restart)."""
    gw = await make_gateway()
    store = FaultyStore(gw.svc.pool)
    gw.svc.writer.store = store
    device = await gw.device(agent_ids=["agent-a"])
    run_id = await start_run(gw, device)
    store.faults.extend([asyncpg.InternalClientError("connection broke"),
                         ConnectionResetError("reset by peer"), TimeoutError()])
    with capture_logs() as logs:
        await send_events(device, run_id, range(1, 6))
        await device.send({"type": "agent_complete", "run_id": run_id})
        await device.send({"type": "ping"})
        await device.recv_type("pong")  # after the complete, which waited for the events
    assert await stored_events(database_url, run_id) == [(n, n) for n in range(1, 6)]
    events = [entry["event"] for entry in logs]
    assert events.count("event_write_failed") == 3, events
    assert "background_task_failed" not in events, events
    row = await run_row(database_url, run_id)
    assert row is not None and row["status"] == "completed", row
    record("writer-1-broken-connection",
           injected="event write fails with InternalClientError, ConnectionResetError, "
                    "TimeoutError (in turn)",
           inputs="1 run, 5 events", outcome="all 5 stored once, in order; run completed; "
           "writer loop never restarted", test="test_writer_retries_a_connection_broken_mid_"
           "statement")


async def test_a_lost_commit_answer_is_not_a_duplicate(
    make_gateway: Any, database_url: str
) -> None:
    """The connection breaks after the batch committed, before its answer: the retry meets
    its own rows (a unique violation) and takes the batch as stored, dropping nothing."""
    gw = await make_gateway()
    store = FaultyStore(gw.svc.pool)
    gw.svc.writer.store = store
    device = await gw.device(agent_ids=["agent-a"])
    run_id = await start_run(gw, device)
    store.faults_after.append(asyncpg.InternalClientError("connection broke after commit"))
    with capture_logs() as logs:
        await send_events(device, run_id, range(1, 4))
        await gw.wait_for(lambda: not store.faults_after and gw.svc.writer.depth == 0)
        await send_events(device, run_id, range(4, 6))
        await gw.wait_for(lambda: gw.svc.writer.depth == 0)
    events = [entry["event"] for entry in logs]
    assert "event_batch_already_stored" in events and "event_rows_dropped" not in events, events
    assert await stored_events(database_url, run_id) == [(n, n) for n in range(1, 6)]
    await device.expect_silence(0.2)  # no agent_cancel: the run goes on
    record("writer-2-lost-commit-answer",
           injected="connection breaks after the event batch committed, before its answer",
           inputs="1 run, 5 events", outcome="retry sees its own rows; nothing dropped or "
           "duplicated; run goes on", test="test_a_lost_commit_answer_is_not_a_duplicate")


async def test_an_unclassified_writer_error_restarts_the_loop_with_its_buffer(
    make_gateway: Any, database_url: str
) -> None:
    """A bug in the write path is the supervisor's: logged, restarted, nothing lost."""
    gw = await make_gateway()
    store = FaultyStore(gw.svc.pool)
    gw.svc.writer.store = store
    device = await gw.device(agent_ids=["agent-a"])
    run_id = await start_run(gw, device)
    store.faults.append(ZeroDivisionError("a bug"))
    with capture_logs() as logs:
        await send_events(device, run_id, range(1, 4))
        await gw.wait_for(lambda: not store.faults and gw.svc.writer.depth == 0)
        await gw.wait_for(lambda: not gw.svc.tasks.unhealthy())
    assert await stored_events(database_url, run_id) == [(1, 1), (2, 2), (3, 3)]
    assert "background_task_failed" in [entry["event"] for entry in logs]


async def test_a_deleted_run_loses_only_its_own_events(
    make_gateway: Any, database_url: str
) -> None:
    """A batch mixing a deleted run's events with another run's: the other run's events are
    stored, in order; the deleted run's are dropped with a log line naming run and seqs, a
    metric, and an agent_cancel to its device, whose connection stays."""
    gw = await make_gateway()
    doomed_device = await gw.device(device_id="doomed", agent_ids=["agent-a"])
    other_device = await gw.device(device_id="other", agent_ids=["agent-a"])
    doomed = await start_run(gw, doomed_device)
    other = await start_run(gw, other_device)
    blocker = await asyncpg.connect(database_url)
    try:
        await blocker.execute("DELETE FROM agent_run_logs WHERE id = $1", uuid.UUID(doomed))
        # The writer waits on this lock, so both devices' events meet in its buffer.
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE agent_run_events IN EXCLUSIVE MODE")
        with capture_logs() as logs:
            for n in range(1, 4):
                await doomed_device.send({"type": "agent_data", "run_id": doomed,
                                          "data": {"n": n}})
                await other_device.send({"type": "agent_data", "run_id": other,
                                         "data": {"n": n}})
            await send_events(other_device, other, range(4, 6))
            await send_events(doomed_device, doomed, range(4, 6))
            await tx.rollback()
            cancel = await doomed_device.recv_type("agent_cancel")
            await gw.wait_for(lambda: gw.svc.writer.depth == 0)
    finally:
        await blocker.close()
    assert cancel == {"type": "agent_cancel", "run_id": doomed,
                      "reason": "events could not be stored"}
    assert await stored_events(database_url, other) == [(n, n) for n in range(1, 6)]
    dropped = [entry for entry in logs if entry["event"] == "event_rows_dropped"]
    assert dropped and {entry["run_id"] for entry in dropped} == {doomed}, logs
    assert sorted(seq for entry in dropped for seq in entry["seqs"]) == [1, 2, 3, 4, 5]
    assert gw.svc.metrics.events_dropped._value.get() == 5
    # Both connections carry on: the doomed run is simply gone for its device.
    await doomed_device.send({"type": "agent_data", "run_id": doomed, "data": {"n": 6}})
    assert (await doomed_device.recv_type("error"))["code"] == "run_finished"
    await other_device.send({"type": "agent_complete", "run_id": other})
    await other_device.send({"type": "ping"})
    await other_device.recv_type("pong")
    row = await run_row(database_url, other)
    assert row is not None and (row["status"], row["event_count"]) == ("completed", 5)
    assert await readyz(gw) == (200, {"status": "ready", "devices": 2})
    record("writer-3-deleted-run",
           injected="a run deleted while its events wait in the writer's batch",
           inputs="2 runs, 5 events each, in one batch",
           outcome="other run's 5 stored in order and completed; deleted run's 5 dropped "
           "(logged by seq, metric), agent_cancel to its device; both connections stay",
           test="test_a_deleted_run_loses_only_its_own_events")


async def test_a_refused_row_is_isolated_within_its_run(
    make_gateway: Any, database_url: str
) -> None:
    """A value the database refuses (a class-22 error) costs only its own row: the batch is
    halved until it stands alone; the run's other events are stored; the run ends as error."""
    gw = await make_gateway()
    device = await gw.device(agent_ids=["agent-a"])
    run_id = await start_run(gw, device)
    admin = await asyncpg.connect(database_url)
    try:
        # A check the table did not have: rows with {"n": 3} can never be stored.
        await admin.execute("ALTER TABLE agent_run_events ADD CONSTRAINT no_three "
                            "CHECK ((data->>'n') IS DISTINCT FROM '3') NOT VALID")
        tx = admin.transaction()
        await tx.start()
        await admin.execute("LOCK TABLE agent_run_events IN EXCLUSIVE MODE")
        with capture_logs() as logs:
            await send_events(device, run_id, range(1, 9))
            await tx.rollback()
            cancel = await device.recv_type("agent_cancel")
            await gw.wait_for(lambda: gw.svc.writer.depth == 0)
    finally:
        await admin.close()
    assert cancel["reason"] == "events could not be stored"
    stored = await stored_events(database_url, run_id)
    assert [n for _seq, n in stored] == [1, 2, 4, 5, 6, 7, 8], stored
    dropped = [entry for entry in logs if entry["event"] == "event_rows_dropped"]
    assert [(entry["run_id"], entry["seqs"]) for entry in dropped] == [(run_id, [3])]
    row = await run_row(database_url, run_id)
    assert row is not None and row["status"] == "error"
    assert "events could not be stored" in row["errors"]
    record("writer-4-refused-row",
           injected="a CHECK constraint refuses one event row of a batch",
           inputs="1 run, 8 events in one batch",
           outcome="7 stored in order, the refused one dropped (logged), run ended error",
           test="test_a_refused_row_is_isolated_within_its_run")


async def test_a_stalled_writer_turns_readyz_503(make_gateway: Any, database_url: str) -> None:
    """Events waiting and no commit for stall_after_s: /readyz 503 names the writer, though
    the database answers pings; 200 again after the commit."""
    gw = await make_gateway()
    gw.svc.writer.stall_after_s = 0.2
    device = await gw.device(agent_ids=["agent-a"])
    run_id = await start_run(gw, device)
    blocker = await asyncpg.connect(database_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE agent_run_events IN EXCLUSIVE MODE")
        await send_events(device, run_id, range(1, 3))
        await gw.wait_for(lambda: gw.svc.writer.stalled())
        assert await readyz(gw) == (503, {"status": "background_task_down",
                                          "tasks": ["event-writer"]})
        await tx.rollback()
    finally:
        await blocker.close()
    await gw.wait_for(lambda: gw.svc.writer.depth == 0)
    assert (await readyz(gw))[0] == 200
    assert await stored_events(database_url, run_id) == [(1, 1), (2, 2)]
    record("writer-5-stalled",
           injected="a table lock holds the event writer's INSERT (database still answers)",
           inputs="1 run, 2 events", outcome="/readyz 503 naming event-writer while stalled, "
           "200 after; events stored", test="test_a_stalled_writer_turns_readyz_503")


# ---------------------------------------------------------------- item 3: one frame, one answer


@pytest.fixture
async def refuse_updates(database_url: str) -> AsyncIterator[Any]:
    """``await refuse_updates(condition)``: UPDATEs of agent_run_logs rows of agent
    ``agent-refused`` matching ``condition`` (plpgsql over OLD/NEW) raise; undone after."""
    conn = await asyncpg.connect(database_url)

    async def install(condition: str) -> None:
        await conn.execute(f"""
            CREATE FUNCTION refuse_marked_run() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.agent_id = 'agent-refused' AND {condition} THEN
                    RAISE EXCEPTION 'refused by the test';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_marked_run BEFORE UPDATE ON agent_run_logs
                FOR EACH ROW EXECUTE FUNCTION refuse_marked_run();
        """)

    try:
        yield install
    finally:
        await conn.execute("DROP TRIGGER IF EXISTS refuse_marked_run ON agent_run_logs")
        await conn.close()


async def test_a_failed_finish_run_is_answered_and_the_connection_stays(
    make_gateway: Any, database_url: str, refuse_updates: Any
) -> None:
    """finish_run fails: the device gets an internal_error for its agent_complete, keeps its
    connection and its other run; the run stays tracked and a second agent_complete ends it."""
    await refuse_updates("OLD.status = 'running' AND NEW.status <> 'running'")
    gw = await make_gateway()
    device = await gw.device(agent_ids=["agent-a", "agent-refused"])
    other = await start_run(gw, device, "agent-a")
    refused = await start_run(gw, device, "agent-refused")
    await send_events(device, refused, range(1, 3))
    with capture_logs() as logs:
        await device.send({"type": "agent_complete", "run_id": refused})
        error = await device.recv_type("error")
    assert (error["code"], error["ref"]) == ("internal_error", "agent_complete"), error
    assert "run_finish_failed" in [entry["event"] for entry in logs]
    # The connection and its other run carry on.
    await send_events(device, other, range(1, 3))
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("DROP TRIGGER refuse_marked_run ON agent_run_logs")
    finally:
        await admin.close()
    await device.send({"type": "agent_complete", "run_id": refused})
    await device.send({"type": "agent_complete", "run_id": other})
    await device.send({"type": "ping"})
    await device.recv_type("pong")
    for run_id in (refused, other):
        row = await run_row(database_url, run_id)
        assert row is not None and (row["status"], row["event_count"]) == ("completed", 2)
    record("frames-1-finish-run-fails",
           injected="finish_run fails in the database (a trigger raises)",
           inputs="1 device, 2 runs", outcome="agent_complete answered internal_error; "
           "connection and other run unaffected; the resent agent_complete completes it",
           test="test_a_failed_finish_run_is_answered_and_the_connection_stays")


async def test_an_unexpected_handler_failure_is_answered_and_the_connection_stays(
    make_gateway: Any, refuse_updates: Any
) -> None:
    """A later device_hello whose claim fails in the database: one internal_error frame
    (ref device_hello), a frame_handler_failed log line with its traceback, no 1011."""
    await refuse_updates("OLD.status = 'pending'")
    gw = await make_gateway()
    device = await gw.device(agent_ids=["agent-a"])
    status, run = await gw.api("POST", "/runs", {"user_id": device.user_id,
                                                 "agent_id": "agent-refused"})
    assert status == 201 and run["status"] == "pending"
    with capture_logs() as logs:
        await device.send({"type": "device_hello", "device_id": device.device_id,
                           "agent_ids": ["agent-a", "agent-refused"]})
        error = await device.recv_type("error")
    assert (error["code"], error["ref"]) == ("internal_error", "device_hello"), error
    failed = [entry for entry in logs if entry["event"] == "frame_handler_failed"]
    assert failed and failed[0]["log_level"] == "error" and failed[0]["exc_info"], logs
    assert gw.svc.metrics.frame_handler_failures.labels("device_hello")._value.get() == 1
    await device.send({"type": "ping"})
    assert (await device.recv_type("pong")) == {"type": "pong"}
    record("frames-2-handler-fails",
           injected="a frame handler fails unexpectedly (device_hello's claim refused)",
           inputs="1 device", outcome="one internal_error frame, frame_handler_failed logged "
           "with traceback; connection stays",
           test="test_an_unexpected_handler_failure_is_answered_and_the_connection_stays")


# ---------------------------------------------------------------- item 3: callers that hang up


async def hang_up_while(gw: Harness, path: str, body: Any) -> None:
    """Send a request and close the connection before the answer (the caller went away)."""
    reader, writer = await asyncio.open_connection(gw.internal.host, gw.internal.port)
    payload = orjson.dumps(body) if body is not None else b""
    writer.write(
        f"POST /internal/v1{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SERVICE_TOKEN}"
        f"\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload)
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is now waiting on the database
    writer.close()
    await writer.wait_closed()
    del reader


async def test_a_cancel_whose_caller_hangs_up_still_reaches_the_device(
    make_gateway: Any, database_url: str
) -> None:
    """The caller goes away while the cancel waits for its row: the cancel still commits
    and the device still gets its agent_cancel (never cancelled in the DB, fed forever)."""
    gw = await make_gateway()
    device = await gw.device(agent_ids=["agent-a"])
    run_id = await start_run(gw, device)
    blocker = await asyncpg.connect(database_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM agent_run_logs WHERE id = $1 FOR UPDATE",
                              uuid.UUID(run_id))
        await hang_up_while(gw, f"/runs/{run_id}/cancel", None)
        await tx.rollback()
    finally:
        await blocker.close()
    cancel = await device.recv_type("agent_cancel")
    assert cancel["run_id"] == run_id
    row = await run_row(database_url, run_id)
    assert row is not None and row["status"] == "cancelled"
    record("api-1-cancel-caller-gone",
           injected="caller hangs up while POST /runs/{id}/cancel waits for its row",
           inputs="1 running run", outcome="cancel committed and agent_cancel sent all the same",
           test="test_a_cancel_whose_caller_hangs_up_still_reaches_the_device")


async def test_a_create_whose_caller_hangs_up_is_dispatched_whole(
    make_gateway: Any, database_url: str
) -> None:
    """The caller goes away while the create waits for the table: the run is created and
    dispatched to its device all the same, never left created-but-not-dispatched."""
    gw = await make_gateway()
    device = await gw.device(agent_ids=["agent-a"])
    blocker = await asyncpg.connect(database_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE agent_run_logs IN SHARE MODE")
        await hang_up_while(gw, "/runs", {"user_id": device.user_id, "agent_id": "agent-a"})
        await tx.rollback()
    finally:
        await blocker.close()
    dispatched = await device.recv_type("agent_run")
    row = await run_row(database_url, dispatched["run_id"])
    assert row is not None and row["status"] == "running"
    record("api-2-create-caller-gone",
           injected="caller hangs up while POST /runs waits for the table",
           inputs="1 run", outcome="run created and dispatched whole",
           test="test_a_create_whose_caller_hangs_up_is_dispatched_whole")


# ---------------------------------------------------------------- the internal envelope


async def test_every_internal_route_is_inside_the_envelope(gateway: Harness) -> None:
    """Walk the internal router: every route and method answers 401 with a request id to a
    caller without a token (per-route wrappers instead of middleware, see README)."""
    app: web.Application = build_internal_app(gateway.svc)
    checked = 0
    for route in app.router.routes():
        assert route.resource is not None
        info = route.resource.get_info()
        path = str(info.get("path") or info.get("formatter"))
        path = path.replace("{run_id}", str(uuid.uuid4())).replace("{path}", "anything")
        method = "GET" if route.method == "*" else route.method
        async with gateway.internal.request(method, path) as resp:
            assert resp.status == 401, (route, await resp.text())
            if method != "HEAD":  # a HEAD answer has no body
                assert (await resp.json())["error"] == "unauthorized"
            assert resp.headers.get("X-Request-Id"), route
        checked += 1
    assert checked >= 8


# ---------------------------------------------------------------- item 4: the watchdog


async def test_the_watchdog_does_not_depend_on_the_database(
    gateway: Harness, database_url: str, listener: tuple[socket.socket, str]
) -> None:
    """With every database call failing, WATCHDOG=1 keeps coming: the watchdog is for the
    event loop (a failover must not make systemd restart the gateway)."""
    dead_pool = await asyncpg.create_pool(database_url, min_size=0, max_size=1)
    await dead_pool.close()
    gw = attrs.evolve(gateway.svc, store=Store(dead_pool), pool=dead_pool)
    notifier = SystemdNotifier(listener[1])
    task = asyncio.create_task(watchdog_loop(gw, notifier, 0.01))
    try:
        seen = set()
        loop = asyncio.get_running_loop()
        for _ in range(6):
            seen.add(await loop.run_in_executor(None, listener[0].recv, 4096))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()
    assert b"WATCHDOG=1" in seen, seen
    record("watchdog-1-database-down",
           injected="every database call fails", inputs="6 watchdog intervals",
           outcome="WATCHDOG=1 keeps coming (systemd restarts nothing)",
           test="test_the_watchdog_does_not_depend_on_the_database")
