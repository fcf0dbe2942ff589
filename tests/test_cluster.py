"""Several gateways on one database (PROTOCOL.md §5), here in one event loop.

Each harness is a whole gateway (its own pool, listener connection, presence,
forwarding client) on real sockets; they meet only through PostgreSQL and
each other's internal API, as separate processes do (tests/e2e/test_cluster.py
runs the same through real processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from typing import Any

import asyncpg
import orjson
import pytest
from harness import SERVICE_TOKEN, Harness

ANSWER_WITHIN_S = 5.0


async def two(make_gateway: Any, **settings: Any) -> tuple[Harness, Harness]:
    a = await make_gateway(instance_id="gw-a", **settings)
    b = await make_gateway(instance_id="gw-b", **settings)
    return a, b


def call(gateway: Harness, **body: Any) -> asyncio.Task[tuple[int, Any]]:
    body.setdefault("user_id", "u1")
    body.setdefault("tool", "echo")
    return asyncio.create_task(gateway.api("POST", "/tool-calls", body))


async def answer(task: asyncio.Task[tuple[int, Any]]) -> tuple[int, Any]:
    return await asyncio.wait_for(task, ANSWER_WITHIN_S)


# ---------------------------------------------------------------- presence


async def test_devices_lists_every_process(make_gateway: Any) -> None:
    a, b = await two(make_gateway)
    await a.device("u1", "on-a", agent_ids=["x"])
    on_b = await b.device("u1", "on-b")
    for gateway in (a, b):
        status, body = await gateway.api("GET", "/devices?user_id=u1")
        assert status == 200, body
        assert sorted(d["device_id"] for d in body["devices"]) == ["on-a", "on-b"], body
    status, body = await b.api("GET", "/devices?user_id=u1")
    seen = {d["device_id"]: d for d in body["devices"]}
    assert seen["on-a"]["agent_ids"] == ["x"]
    assert set(seen["on-a"]) == {"user_id", "device_id", "agent_ids", "connection_id",
                                 "connected_at"}

    await on_b.close()
    await b.wait_for(lambda: b.svc.registry.get("u1", "on-b") is None)
    deadline = time.monotonic() + ANSWER_WITHIN_S
    while True:
        status, body = await a.api("GET", "/devices?user_id=u1")
        if [d["device_id"] for d in body["devices"]] == ["on-a"]:
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.02)


async def test_a_replaced_connection_never_deletes_its_successors_row(
        make_gateway: Any) -> None:
    """The cleanup of the first connection runs after the second registered: the row stays."""
    a, b = await two(make_gateway)
    first = await a.device("u1", "d1")
    await a.device("u1", "d1")  # replaces first on the same process
    assert await first.expect_close() == 4000
    await a.wait_for(lambda: len(a.svc.registry) == 1)
    await asyncio.sleep(0.1)  # the first connection's cleanup has run
    _status, body = await b.api("GET", "/devices?user_id=u1")
    assert [d["device_id"] for d in body["devices"]] == ["d1"], body


async def test_device_limit_counts_every_process(make_gateway: Any) -> None:
    a, b = await two(make_gateway, max_devices_per_user=2)
    await a.device("u1", "one")
    await b.device("u1", "two")
    ws = await a.connect(user_id="u1")
    await ws.send_str(orjson.dumps({"type": "device_hello", "device_id": "three"}).decode())
    msg = await ws.receive(timeout=ANSWER_WITHIN_S)
    assert msg.data == 4002 or ws.close_code == 4002, msg
    # A device already held elsewhere moving here is a replacement: always allowed.
    moved = await a.device("u1", "two")
    assert moved.hello_ack is not None


# ---------------------------------------------------------------- forwarded tool calls


async def test_call_via_another_process_reaches_the_device(make_gateway: Any) -> None:
    a, b = await two(make_gateway)
    device = await a.device("u1", "d1")
    task = call(b, device_id="d1", tool="read", args={"p": 1})
    frame = await device.recv_type("tool_call")
    assert frame["tool"] == "read" and frame["args"] == {"p": 1}
    await device.send({"type": "tool_result", "id": frame["id"], "result": {"ok": 42}})
    status, body = await answer(task)
    assert status == 200, body
    assert body == {"call_id": frame["id"], "device_id": "d1", "ok": True, "result": {"ok": 42}}


async def test_call_without_device_id_finds_the_device_elsewhere(make_gateway: Any) -> None:
    a, b = await two(make_gateway)
    device = await a.device("u1", "d1")
    task = call(b)
    frame = await device.recv_type("tool_call")
    await device.send({"type": "tool_result", "id": frame["id"], "error": "boom"})
    status, body = await answer(task)
    assert status == 200, body
    assert body["ok"] is False and body["error"] == {"code": "tool_error", "message": "boom"}


async def test_forwarded_timeout_is_504_with_tool_cancel(make_gateway: Any) -> None:
    a, b = await two(make_gateway)
    device = await a.device("u1", "d1")
    task = call(b, device_id="d1", timeout_s=0.2)
    frame = await device.recv_type("tool_call")
    status, body = await answer(task)
    assert status == 504, body
    assert body["error"] == "timeout" and body["device_id"] == "d1", body
    cancel = await device.recv_type("tool_cancel")
    assert cancel == {"type": "tool_cancel", "id": frame["id"], "reason": "timeout"}


async def test_forwarded_call_fails_at_once_when_the_device_drops(make_gateway: Any) -> None:
    a, b = await two(make_gateway)
    device = await a.device("u1", "d1")
    task = call(b, device_id="d1", timeout_s=30)
    await device.recv_type("tool_call")
    await device.close()
    status, body = await answer(task)
    assert status == 503, body
    assert body["error"] == "device_disconnected", body


async def test_caller_gone_cancels_the_owner_and_the_device_hears_it(
        make_gateway: Any) -> None:
    a, b = await two(make_gateway)
    device = await a.device("u1", "d1")
    task = call(b, device_id="d1", timeout_s=30)
    frame = await device.recv_type("tool_call")
    task.cancel()
    cancel = await device.recv_type("tool_cancel")
    assert cancel == {"type": "tool_cancel", "id": frame["id"], "reason": "caller_gone"}
    await a.wait_for(lambda: not a.svc.registry.get("u1", "d1").calls)  # type: ignore[union-attr]


async def test_offline_everywhere_is_404(make_gateway: Any) -> None:
    _a, b = await two(make_gateway)
    status, body = await answer(call(b, device_id="nowhere"))
    assert status == 404 and body["error"] == "device_offline", body


async def test_peer_route_never_forwards_again(make_gateway: Any) -> None:
    """A peer call for a device the owner no longer holds is 404, not bounced back."""
    a, b = await two(make_gateway)
    await a.device("u1", "d1")
    status, body = await b.api("POST", "/peer/tool-calls",
                               {"user_id": "u1", "device_id": "d1", "tool": "t"})
    assert status == 404 and body["error"] == "device_offline", body


async def test_peer_routes_need_a_service_token(make_gateway: Any) -> None:
    a, _ = await two(make_gateway)
    status, body = await a.api("POST", "/peer/tool-calls", {"user_id": "u1", "tool": "t"},
                               token="wrong-token-wrong-token")
    assert status == 401, body
    status, body = await a.api("POST", "/peer/runs/not-a-uuid/dispatch", {})
    assert status == 404, body


async def test_unreachable_owner_is_404_device_offline(make_gateway: Any,
                                                       database_url: str) -> None:
    a, b = await two(make_gateway)
    await a.device("u1", "d1")
    conn = await asyncpg.connect(database_url)
    try:  # a's advertised address now leads nowhere
        await conn.execute("UPDATE gateway_instances SET advertise_url = 'http://127.0.0.1:9'"
                           " WHERE instance_id = 'gw-a'")
    finally:
        await conn.close()
    status, body = await answer(call(b, device_id="d1"))
    assert status == 404 and body["error"] == "device_offline", body


# ---------------------------------------------------------------- runs across processes


async def test_run_created_on_b_is_dispatched_on_a_and_streamed_from_c(
        make_gateway: Any) -> None:
    a, b = await two(make_gateway)
    c = await make_gateway(instance_id="gw-c")
    device = await a.device("u1", "d1", agent_ids=["agent"])
    status, run = await b.api("POST", "/runs", {"user_id": "u1", "agent_id": "agent",
                                                "input": {"q": 1}})
    assert status == 201, run
    assert run["status"] == "running" and run["gateway_instance"] == "gw-a", run
    frame = await device.recv_type("agent_run")
    assert frame["run_id"] == run["run_id"] and frame["input"] == {"q": 1}

    lines: list[dict[str, Any]] = []
    got_first = asyncio.Event()

    async def read() -> None:
        async with c.internal.get(f"/internal/v1/runs/{run['run_id']}/events",
                                  headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}) as r:
            assert r.status == 200
            async for line in r.content:
                lines.append(orjson.loads(line))
                got_first.set()

    reader = asyncio.create_task(read())
    await device.send({"type": "agent_data", "run_id": run["run_id"], "data": 1})
    await asyncio.wait_for(got_first.wait(), ANSWER_WITHIN_S)
    for n in range(2, 51):
        await device.send({"type": "agent_data", "run_id": run["run_id"], "data": n})
    await device.send({"type": "agent_complete", "run_id": run["run_id"]})
    await asyncio.wait_for(reader, ANSWER_WITHIN_S)
    assert [line["seq"] for line in lines] == list(range(1, 51))
    assert [line["data"] for line in lines] == list(range(1, 51))


async def test_events_elsewhere_are_announced_once_per_batch_per_run(
        make_gateway: Any) -> None:
    a, _ = await two(make_gateway)
    device = await a.device("u1", "d1", agent_ids=["agent"])
    _status, run = await a.api("POST", "/runs", {"user_id": "u1", "agent_id": "agent"})
    await device.recv_type("agent_run")
    for n in range(200):
        await device.send({"type": "agent_data", "run_id": run["run_id"], "data": n})
    await device.send({"type": "agent_complete", "run_id": run["run_id"]})
    await a.wait_for(lambda: a.svc.runs.tracking.get(
        __import__("uuid").UUID(run["run_id"])) is None)
    await a.wait_for(lambda: a.svc.announcer.sent > 0)
    assert a.svc.announcer.sent < 200, a.svc.announcer.sent


async def test_listener_reestablished_after_its_connection_is_killed(
        make_gateway: Any, database_url: str) -> None:
    """The device's process loses its LISTEN connection: it comes back, and a cancel
    through the other process still reaches the device."""
    a, b = await two(make_gateway)
    await a.wait_for(lambda: a.svc.notifications.connected.is_set())
    before = a.svc.notifications.connections
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_terminate_backend($1)", a.svc.notifications.backend_pid)
    finally:
        await conn.close()
    await a.wait_for(lambda: a.svc.notifications.connections > before, timeout=10)
    device = await a.device("u1", "d1", agent_ids=["agent"])
    status, run = await b.api("POST", "/runs", {"user_id": "u1", "agent_id": "agent"})
    assert run["status"] == "running", run
    await device.recv_type("agent_run")
    status, cancelled = await b.api("POST", f"/runs/{run['run_id']}/cancel")
    assert status == 200, cancelled
    await device.recv_type("agent_cancel")


# ---------------------------------------------------------------- replacement and dead processes


async def test_hello_elsewhere_replaces_and_resumes_the_runs(make_gateway: Any) -> None:
    a, b = await two(make_gateway)
    first = await a.device("u1", "d1", agent_ids=["agent"])
    _, run = await a.api("POST", "/runs", {"user_id": "u1", "agent_id": "agent"})
    await first.recv_type("agent_run")
    await first.send({"type": "agent_data", "run_id": run["run_id"], "data": "one"})
    await a.wait_for(lambda: a.svc.writer.depth == 0)

    second = await b.device("u1", "d1", agent_ids=["agent"])
    assert await first.expect_close() == 4000
    assert second.hello_ack is not None
    assert [r["run_id"] for r in second.hello_ack["runs"]] == [run["run_id"]], second.hello_ack
    await second.send({"type": "agent_data", "run_id": run["run_id"], "data": "two"})
    await second.send({"type": "agent_complete", "run_id": run["run_id"]})
    await b.wait_for(lambda: len(b.svc.runs.tracking.run_ids()) == 0)
    _status, record = await a.api("GET", f"/runs/{run['run_id']}")
    assert record["status"] == "completed" and record["event_count"] == 2, record
    assert record["gateway_instance"] == "gw-b", record


async def test_dead_process_is_reaped_and_its_runs_resume_elsewhere(
        make_gateway: Any, database_url: str) -> None:
    a, b = await two(make_gateway, instance_ttl_s=0.6)
    device = await a.device("u1", "d1", agent_ids=["agent"])
    _, run = await a.api("POST", "/runs", {"user_id": "u1", "agent_id": "agent"})
    await device.recv_type("agent_run")
    # a stops beating (a process frozen or killed): b reaps it.
    a.svc.tasks._loops["presence-heartbeat"].task.cancel()  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while True:
        _, body = await b.api("GET", "/devices?user_id=u1")
        _status, record = await b.api("GET", f"/runs/{run['run_id']}")
        if not body["devices"] and record["detached_at"] is not None:
            break
        assert time.monotonic() < deadline, (body, record)
        await asyncio.sleep(0.05)
    assert record["detach_reason"] == "gateway restarted", record
    await device.close()
    resumed = await b.device("u1", "d1", agent_ids=["agent"])
    assert resumed.hello_ack is not None
    assert [r["run_id"] for r in resumed.hello_ack["runs"]] == [run["run_id"]]


async def test_two_processes_racing_claim_each_run_once(make_gateway: Any) -> None:
    a, b = await two(make_gateway)
    ids = []
    for _ in range(20):
        _status, run = await a.api("POST", "/runs", {"user_id": "u1", "agent_id": "agent"})
        assert run["status"] == "pending"
        ids.append(run["run_id"])
    one, other = await asyncio.gather(a.device("u1", "d1", agent_ids=["agent"]),
                                      b.device("u1", "d2", agent_ids=["agent"]))
    got: list[str] = []
    for device in (one, other):
        while True:
            try:
                frame = await device.recv_type("agent_run", timeout=0.5)
            except TimeoutError:
                break
            got.append(frame["run_id"])
    assert sorted(got) == sorted(ids)


async def test_a_call_follows_a_device_that_moved_since_the_last_call(
        make_gateway: Any) -> None:
    """b remembers where d1 was (a); d1 moves to c; b's next call still reaches it."""
    a, b = await two(make_gateway)
    c = await make_gateway(instance_id="gw-c")
    first = await a.device("u1", "d1")
    task = call(b, device_id="d1")
    frame = await first.recv_type("tool_call")
    await first.send({"type": "tool_result", "id": frame["id"], "result": 1})
    assert (await answer(task))[0] == 200
    moved = await c.device("u1", "d1")
    assert await first.expect_close() == 4000
    task = call(b, device_id="d1")
    frame = await moved.recv_type("tool_call")
    await moved.send({"type": "tool_result", "id": frame["id"], "result": 2})
    status, body = await answer(task)
    assert status == 200 and body["result"] == 2, body


class FreezingProxy:
    """TCP on 127.0.0.1 → PostgreSQL's unix socket; ``freeze`` makes the connections so far
    go silent (nothing forwarded, nothing closed), as a dropped network path does."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.frozen: list[asyncio.Event] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.socket_path)
        frozen = asyncio.Event()
        self.frozen.append(frozen)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if frozen.is_set():
                    await asyncio.Event().wait()  # silent for ever
                dst.write(data)
                await dst.drain()

        with contextlib.suppress(Exception):
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def freeze(self) -> None:
        for frozen in self.frozen:
            frozen.set()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_silently_dead_listener_is_detected_and_replaced(
        make_gateway: Any, database_url: str) -> None:
    """The LISTEN connection's network path goes silent (no FIN, no RST): the probe
    notices, a new connection is made, and a cancel through b still reaches a's device."""
    url = urllib.parse.urlsplit(database_url)
    query = urllib.parse.parse_qs(url.query)
    if not query.get("host", [""])[0].startswith("/"):
        pytest.skip("the proxy forwards to a unix-socket PostgreSQL (the embedded one)")
    socket_path = f"{query['host'][0]}/.s.PGSQL.{query.get('port', ['5432'])[0]}"
    proxy = FreezingProxy(socket_path)
    await proxy.start()
    try:
        a, b = await two(make_gateway)
        notifications = a.svc.notifications
        await a.wait_for(lambda: notifications.connected.is_set())
        notifications.dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}{url.path}"
        conn = await asyncpg.connect(database_url)
        try:  # its next connection goes through the proxy
            await conn.execute("SELECT pg_terminate_backend($1)", notifications.backend_pid)
        finally:
            await conn.close()
        await a.wait_for(lambda: notifications.connections == 2, timeout=10)
        proxy.freeze()
        await a.wait_for(lambda: notifications.connections == 3, timeout=15)

        device = await a.device("u1", "d1", agent_ids=["agent"])
        _, run = await b.api("POST", "/runs", {"user_id": "u1", "agent_id": "agent"})
        await device.recv_type("agent_run")
        status, _ = await b.api("POST", f"/runs/{run['run_id']}/cancel")
        assert status == 200
        await device.recv_type("agent_cancel")
    finally:
        await proxy.close()


async def test_cluster_metrics_count_forwarded_calls_and_notifications(
        make_gateway: Any) -> None:
    a, b = await two(make_gateway)
    device = await a.device("u1", "d1", agent_ids=["agent"])
    task = call(b, device_id="d1")
    frame = await device.recv_type("tool_call")
    await device.send({"type": "tool_result", "id": frame["id"], "result": 1})
    assert (await answer(task))[0] == 200
    _, run = await a.api("POST", "/runs", {"user_id": "u1", "agent_id": "agent"})
    await device.recv_type("agent_run")
    await device.send({"type": "agent_data", "run_id": run["run_id"], "data": 1})
    await a.wait_for(lambda: a.svc.announcer.sent >= 1)
    async with b.public.get("/metrics") as response:
        text_b = await response.text()
    async with a.public.get("/metrics") as response:
        text_a = await response.text()
    assert 'gateway_tool_calls_forwarded_total{outcome="forwarded"} 1.0' in text_b
    assert "gateway_listener_connections_total 1.0" in text_b
    assert "gateway_event_notifications_total 1.0" in text_a


async def taken_by_b_unannounced(database_url: str, device_id: str) -> None:
    """What b's hello would have written for the device, without telling a."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE device_presence SET instance_id = 'gw-b', "
                           "connection_id = 'elsewhere' WHERE device_id = $1", device_id)
    finally:
        await conn.close()


async def test_a_connection_whose_row_another_process_took_is_let_go(
        make_gateway: Any, database_url: str) -> None:
    """The replacement NOTIFY was missed (say, the LISTEN connection was being
    replaced): the heartbeat sees the row is someone else's and closes ours with 4000."""
    a, _ = await two(make_gateway, instance_ttl_s=0.6)
    device = await a.device("u1", "d1")
    await taken_by_b_unannounced(database_url, "d1")
    assert await device.expect_close() == 4000
    await a.wait_for(lambda: a.svc.registry.get("u1", "d1") is None)


async def test_the_rows_a_process_holds_add_up_to_what_it_wrote_until_one_is_taken(
        make_gateway: Any, database_url: str) -> None:
    """check_lost sends its connection ids only when its rows no longer add up to
    what it wrote: the database's sum and the process's must agree while they
    are the same rows, and differ once one is taken."""
    a, _ = await two(make_gateway, instance_ttl_s=60)  # no heartbeat pass meanwhile
    presence = a.svc.presence
    devices = [await a.device("u1", f"d{i}") for i in range(3)]
    assert presence.written_digest[0] == 3
    assert await presence.store.presence_digest("gw-a") == presence.written_digest
    await devices[0].close()
    await a.wait_for(lambda: presence.written_digest[0] == 2)
    for _ in range(100):  # the row's delete is batched: it follows shortly
        if await presence.store.presence_digest("gw-a") == presence.written_digest:
            break
        await asyncio.sleep(0.05)
    assert await presence.store.presence_digest("gw-a") == presence.written_digest
    assert await presence.check_lost() == 0
    await taken_by_b_unannounced(database_url, "d1")
    assert await presence.store.presence_digest("gw-a") != presence.written_digest
    assert await presence.check_lost() == 1
    assert await devices[1].expect_close() == 4000


async def test_a_process_reaped_while_alive_comes_back_without_stealing_devices(
        make_gateway: Any, database_url: str) -> None:
    """Reaped during a stall: it registers again and rewrites the rows of its devices,
    but one taken by another process meanwhile stays there (and ours is let go)."""
    a, _ = await two(make_gateway, instance_ttl_s=0.6)
    kept = await a.device("u1", "kept")
    taken = await a.device("u1", "taken")
    conn = await asyncpg.connect(database_url)
    try:  # as if b reaped a, then the device said hello to b
        await conn.execute("DELETE FROM device_presence WHERE instance_id = 'gw-a'")
        await conn.execute("DELETE FROM gateway_instances WHERE instance_id = 'gw-a'")
        await conn.execute(
            "INSERT INTO device_presence (user_id, device_id, instance_id, connection_id, "
            "connected_at) VALUES ('u1', 'taken', 'gw-b', 'on-b', now())")
        assert await taken.expect_close() == 4000
        rows = await conn.fetch("SELECT device_id, instance_id FROM device_presence "
                                "ORDER BY device_id")
    finally:
        await conn.close()
    assert [(r["device_id"], r["instance_id"]) for r in rows] == [
        ("kept", "gw-a"), ("taken", "gw-b")]
    assert a.svc.registry.get("u1", "kept") is not None
    await kept.send({"type": "ping"})
    assert (await kept.recv_type("pong"))["type"] == "pong"
