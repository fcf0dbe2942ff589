"""Hostile input from devices and callers (issue 11, items 5-11).

Each test plays the attacker against a real gateway (real PostgreSQL, real
sockets) or, where no socket is involved, against the unit that decides.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg.exceptions._base as asyncpg_base
import orjson
import pytest
from harness import JWT_SECRET, SERVICE_TOKEN, WS_PATH, Device, Harness, mint

from gateway.auth import AuthError, DeviceAuthenticator
from gateway.device.handlers import COSTLY_BURST
from gateway.runs.events import PERMANENT_ERRORS, EventWriter
from gateway.runs.live import Subscription
from gateway.store import COPY_HEADER, StoredEvent, encode_event_copy

MakeGateway = Callable[..., Awaitable[Harness]]


# ---------------------------------------------------------------- item 8: exp as a string


def _authenticator() -> DeviceAuthenticator:
    return DeviceAuthenticator(algorithms=("HS256",), secret=JWT_SECRET, public_key=None,
                               audience=None, issuer=None, require_exp=True, leeway_s=0)


@pytest.mark.parametrize("exp", ["9999999999", str(int(time.time()) + 3600), "1e10", True])
def test_a_token_whose_exp_is_not_a_number_is_refused(exp: object) -> None:
    """RFC 7519 §2: NumericDate is a JSON number. PyJWT reads "9999999999" as one,
    the expiry timer did not, so such a token never expired."""
    token = mint("user-1", exp=exp)
    with pytest.raises(AuthError):
        _authenticator().verify(token)


async def test_auth_refresh_with_a_string_exp_keeps_the_expiry(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(jwt_leeway_s=0)
    device = await gateway.device("user-1", "d1", token=mint("user-1", ttl_s=60))
    armed = next(iter(gateway.svc.registry)).expires_at
    assert armed is not None
    await device.send({"type": "auth_refresh",
                       "token": mint("user-1", exp=str(int(time.time()) + 7200))})
    error = await device.recv()
    assert (error["type"], error["code"]) == ("error", "auth_refresh_rejected"), error
    assert next(iter(gateway.svc.registry)).expires_at == armed


# ---------------------------------------------------------------- helpers

UPGRADE_HEADERS = {"Connection": "Upgrade", "Upgrade": "websocket",
                   "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


async def handshake_body(gateway: Harness, token: str) -> tuple[int, Any]:
    """A refused WebSocket handshake's status and JSON body."""
    async with gateway.public.get(WS_PATH, params={"token": token},
                                  headers=UPGRADE_HEADERS) as response:
        return response.status, orjson.loads(await response.read())



DEEP = "@DEEP@"


def text(value: Any, deep: int = 0) -> str:
    """JSON text of ``value`` with the string DEEP replaced by ``nested(deep)``.

    Written by hand: orjson writes at most 255 levels, the stdlib's encoder
    runs out of stack near 1000.
    """
    opening = "".join("[" if level % 2 else '{"k": ' for level in reversed(range(deep)))
    closing = "".join("]" if level % 2 else "}" for level in range(deep))
    return json.dumps(value).replace(f'"{DEEP}"', f"{opening}1{closing}")


def nested(depth: int, leaf: Any = 1) -> Any:
    """``depth`` levels of alternating arrays and objects around ``leaf``."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


async def start_run(gateway: Harness, device: Device, input_value: Any = None) -> str:
    status, answer = await gateway.api("POST", "/runs", {
        "user_id": device.user_id, "agent_id": "agent-1", "device_id": device.device_id,
        "input": input_value if input_value is not None else {}})
    assert status == 201, answer
    frame = await device.recv_type("agent_run")
    return str(frame["run_id"])


async def stored_data(gateway: Harness, device: Device, run_id: str) -> list[Any]:
    """The run's stored events once every frame the device sent so far is handled."""
    await device.send({"type": "ping"})
    await device.recv_type("pong")
    await gateway.svc.writer.flush()
    rows = await gateway.svc.pool.fetch(
        "SELECT data::text FROM agent_run_events WHERE run_id = $1 ORDER BY seq",
        uuid.UUID(run_id))
    return [orjson.loads(row[0]) for row in rows]


async def call_tool(gateway: Harness, device: Device, result: Any) -> tuple[int, Any]:
    call = asyncio.ensure_future(gateway.api("POST", "/tool-calls", {
        "user_id": device.user_id, "tool": "echo", "args": {}}))
    frame = await device.recv_type("tool_call")
    await device.send({"type": "tool_result", "id": frame["id"], "result": result})
    return await call


# ---------------------------------------------------------------- item 7: depth and big integers


@pytest.mark.parametrize("depth", [129, 255, 256, 1000])
async def test_agent_data_nested_too_deep_is_a_bad_frame(gateway: Harness, depth: int) -> None:
    device = await gateway.device("user-1", "d1", ["agent-1"])
    run_id = await start_run(gateway, device)
    await device.send(text({"type": "agent_data", "run_id": run_id, "data": DEEP}, depth))
    error = await device.recv_type("error")
    assert (error["code"], error["ref"]) == ("bad_frame", "agent_data"), error
    assert "128" in error["message"], error
    await device.send({"type": "agent_data", "run_id": run_id, "data": nested(128)})
    await device.send(text({"type": "agent_complete", "run_id": run_id, "result": DEEP},
                           depth))
    error = await device.recv_type("error")
    assert (error["code"], error["ref"]) == ("bad_frame", "agent_complete"), error
    await device.send({"type": "agent_complete", "run_id": run_id, "result": nested(128)})
    assert await stored_data(gateway, device, run_id) == [nested(128)]
    status, record = await gateway.api("GET", f"/runs/{run_id}")
    assert status == 200 and record["status"] in ("running", "completed"), record
    assert not device.ws.closed


@pytest.mark.parametrize("depth", [129, 300])
async def test_tool_result_nested_too_deep_is_a_bad_frame(gateway: Harness, depth: int) -> None:
    device = await gateway.device("user-1", "d1")
    call = asyncio.ensure_future(gateway.api("POST", "/tool-calls", {
        "user_id": "user-1", "tool": "echo", "timeout_s": 5}))
    frame = await device.recv_type("tool_call")
    await device.send(text({"type": "tool_result", "id": frame["id"], "result": DEEP}, depth))
    error = await device.recv_type("error")
    assert (error["code"], error["ref"]) == ("bad_frame", "tool_result"), error
    await device.send({"type": "tool_result", "id": frame["id"], "result": nested(128)})
    status, answer = await call
    assert status == 200 and answer["result"] == nested(128), answer


@pytest.mark.parametrize("field", ["args", "input"])
@pytest.mark.parametrize("depth", [129, 255, 300, 1000])
async def test_internal_api_body_nested_too_deep_is_400(
        gateway: Harness, field: str, depth: int) -> None:
    await gateway.device("user-1", "d1", ["agent-1"])
    path = "/tool-calls" if field == "args" else "/runs"
    body = {"user_id": "user-1", "tool": "echo", "agent_id": "agent-1", field: DEEP}
    status, answer = await gateway.api("POST", path, raw=text(body, depth).encode())
    assert (status, answer["error"]) == (400, "bad_request"), answer
    assert "128" in answer["detail"], answer


BIG = [2**64, -(2**63) - 1, 10**30, -(10**40)]


@pytest.mark.parametrize("number", BIG)
async def test_agent_data_with_an_integer_beyond_64_bits_is_refused(
        gateway: Harness, number: int) -> None:
    device = await gateway.device("user-1", "d1", ["agent-1"])
    run_id = await start_run(gateway, device)
    raw = f'{{"type": "agent_data", "run_id": "{run_id}", "data": {{"n": {number}}}}}'
    await device.send(raw)
    error = await device.recv_type("error")
    assert (error["code"], error["ref"]) == ("bad_frame", "agent_data"), error
    assert "64 bits" in error["message"], error
    edges = [2**64 - 1, -(2**63), 12345678901234567890, 1.2345678901234567890123]
    for value in edges:
        await device.send(f'{{"type": "agent_data", "run_id": "{run_id}", "data": {value!r}}}')
    await device.send({"type": "agent_data", "run_id": run_id,
                       "data": "12345678901234567890123456789"})
    assert await stored_data(gateway, device, run_id) == [*edges, "12345678901234567890123456789"]


@pytest.mark.parametrize("number", BIG)
async def test_internal_api_integer_beyond_64_bits_is_400(gateway: Harness, number: int) -> None:
    await gateway.device("user-1", "d1", ["agent-1"])
    raw = b'{"user_id": "user-1", "agent_id": "agent-1", "input": {"n": %d}}' % number
    status, answer = await gateway.api("POST", "/runs", raw=raw)
    assert (status, answer["error"]) == (400, "bad_request"), answer
    assert "64 bits" in answer["detail"], answer
    raw = b'{"user_id": "user-1", "tool": "echo", "args": {"n": %d}}' % number
    status, answer = await gateway.api("POST", "/tool-calls", raw=raw)
    assert (status, answer["error"]) == (400, "bad_request"), answer


# ------------------------------------------------ item 9: sockets that never say hello


async def test_one_user_cannot_hold_every_slot_with_silent_sockets(
        make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(max_connections=6, max_hello_pending_per_user=3,
                                 hello_timeout_s=30)
    silent = [await gateway.connect(mint("greedy")) for _ in range(3)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.connect(mint("greedy"))
    assert refused.value.status == 429
    status, body = await handshake_body(gateway, mint("greedy"))
    assert (status, body["error"]) == (429, "too_many_handshakes"), body
    # Others still get in, and a device of the same user that says hello frees its slot.
    other = await gateway.device("someone-else", "d1")
    for ws in silent[:1]:
        await ws.send_str(orjson.dumps({"type": "device_hello", "device_id": "g1"}).decode())
        assert orjson.loads((await ws.receive()).data)["type"] == "hello_ack"
    await gateway.device("greedy", "g2")
    await other.close()


# ---------------------------------------------------------------- item 11: the small ones


def closed_total(gateway: Harness) -> dict[str, float]:
    """gateway_connections_closed_total by code label, from the registry itself."""
    counts: dict[str, float] = {}
    for metric in gateway.svc.metrics.connections_closed.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                counts[sample.labels["code"]] = sample.value
    return counts


async def test_device_chosen_close_codes_map_to_a_fixed_label_set(gateway: Harness) -> None:
    for number, code in enumerate((3000, 3999, 4123, 4999, 1000)):
        device = await gateway.device("user-1", f"d{number}")
        await device.ws.close(code=code)
    await gateway.wait_for(lambda: sum(closed_total(gateway).values()) >= 5)
    counts = closed_total(gateway)
    assert counts.get("other") == 4 and counts.get("1000") == 1, counts


async def test_a_frame_of_exactly_the_limit_is_accepted_one_byte_more_closes_1009(
        make_gateway: MakeGateway) -> None:
    limit = 4096
    gateway = await make_gateway(max_frame_bytes=limit)
    device = await gateway.device("user-1", "d1")
    frame = '{"type": "ping", "pad": "%s"}'
    exact = frame % ("x" * (limit - len(frame % "")))
    assert len(exact.encode()) == limit
    await device.send(exact)
    assert (await device.recv_type("pong"))["type"] == "pong"
    await device.send(frame % ("x" * (limit + 1 - len(frame % ""))))
    assert await device.expect_close() == 1009


@pytest.mark.parametrize("after", [str(2**31), str(2**63), "99999999999999999999999"])
async def test_after_beyond_a_seq_is_400_before_the_stream_starts(
        gateway: Harness, after: str) -> None:
    device = await gateway.device("user-1", "d1", ["agent-1"])
    run_id = await start_run(gateway, device)
    status, answer = await gateway.api("GET", f"/runs/{run_id}/events?after={after}")
    assert (status, answer["error"]) == (400, "bad_request"), answer


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
                                    "0001-01-01T00:00:00", "9999-12-31T23:59:59.999999Z"])
async def test_extreme_scheduled_at_is_400_or_stored(gateway: Harness, moment: str) -> None:
    status, answer = await gateway.api("POST", "/runs", {
        "user_id": "user-1", "agent_id": "agent-1", "scheduled_at": moment})
    assert status in (201, 400), answer
    if status == 201:
        status, record = await gateway.api("GET", f"/runs/{answer['run_id']}")
        assert status == 200, record
        status, listed = await gateway.api("GET", "/runs?user_id=user-1")
        assert status == 200, listed


async def expect_exchange(port: int, token: str | None) -> bytes:
    """A POST with Expect: 100-continue: what comes back before the body is sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        writer.write((f"POST /internal/v1/runs HTTP/1.1\r\nHost: x\r\n{auth}"
                      "Content-Type: application/json\r\nContent-Length: 2\r\n"
                      "Expect: 100-continue\r\n\r\n").encode())
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


async def test_expect_100_continue_is_answered_after_the_token_check(gateway: Harness) -> None:
    port = gateway.internal.port
    assert port is not None
    for token in (None, "wrong-token-0123456789"):
        head = await expect_exchange(port, token)
        assert head.startswith(b"HTTP/1.1 401"), head
    head = await expect_exchange(port, SERVICE_TOKEN)
    assert head.startswith(b"HTTP/1.1 100"), head


async def test_auth_refresh_beyond_its_allowance_is_a_bad_frame(gateway: Harness) -> None:
    device = await gateway.device("user-1", "d1")
    for _ in range(COSTLY_BURST):
        await device.send({"type": "auth_refresh", "token": mint("user-1")})
    await device.send({"type": "ping"})
    assert (await device.recv())["type"] == "pong"  # no error frame before it
    await device.send({"type": "auth_refresh", "token": mint("user-1")})
    error = await device.recv_type("error")
    assert (error["code"], error["ref"]) == ("bad_frame", "auth_refresh"), error


async def test_repeated_hello_beyond_its_allowance_is_a_bad_frame(gateway: Harness) -> None:
    device = await gateway.device("user-1", "d1")
    for _ in range(COSTLY_BURST):
        await device.send({"type": "device_hello", "device_id": "d1"})
        await device.recv_type("hello_ack")
    await device.send({"type": "device_hello", "device_id": "d1"})
    error = await device.recv_type("error")
    assert (error["code"], error["ref"]) == ("bad_frame", "device_hello"), error


async def test_frames_for_foreign_runs_stop_costing_a_query(make_gateway: MakeGateway) -> None:
    """Past the allowance, a run this connection does not know is answered without
    asking the database: a run finished on an earlier connection then reads as
    unknown_run (the database would have said run_finished)."""
    gateway = await make_gateway(run_resume_s=0)
    device = await gateway.device("user-1", "d1", ["agent-1"])
    run_id = await start_run(gateway, device)
    await device.send({"type": "agent_complete", "run_id": run_id})
    await device.send({"type": "ping"})
    await device.recv_type("pong")
    await device.close()
    device = await gateway.device("user-1", "d1", ["agent-1"])
    answers = []
    for _ in range(COSTLY_BURST + 5):
        await device.send({"type": "agent_data", "run_id": run_id, "data": 1})
        answers.append((await device.recv_type("error"))["code"])
    assert answers == ["run_finished"] * COSTLY_BURST + ["unknown_run"] * 5, answers
    await device.send({"type": "ping"})
    assert (await device.recv())["type"] == "pong"  # not closed: no abuse counted


# ---------------------------------------------------------------- item 10: bytes, not only counts


async def test_the_event_buffer_is_bounded_by_bytes_and_lets_one_large_event_in_alone(
        gateway: Harness) -> None:
    """A writer of its own, not yet running: what ``put`` lets in before it waits."""
    svc = gateway.svc
    writer = EventWriter(store=svc.store, metrics=svc.metrics, live=svc.live,
                         queue_max=1000, queue_max_bytes=1000)
    run_id = uuid.uuid4()
    await writer.put(run_id, 1, b"x" * 600)
    second = asyncio.ensure_future(writer.put(run_id, 2, b"y" * 600))
    await asyncio.sleep(0.05)
    assert not second.done() and writer.depth == 1  # 1200 bytes would pass the bound
    assert writer.buffered_bytes == 600
    # Written (here refused for good: no such run), its bytes leave the count and
    # the waiting event gets in.
    task = asyncio.ensure_future(writer.run())
    try:
        await asyncio.wait_for(second, 10)
        await writer.flush()
        assert (writer.depth, writer.buffered_bytes) == (0, 0)
    finally:
        task.cancel()
    alone = EventWriter(store=svc.store, metrics=svc.metrics, live=svc.live,
                        queue_max=1000, queue_max_bytes=1000)
    await alone.put(run_id, 1, b"z" * 5000)  # larger than the bound, into an empty buffer
    assert (alone.depth, alone.buffered_bytes) == (1, 5000)


async def test_an_event_waiting_for_room_is_queued_even_if_its_device_task_is_cancelled(
        gateway: Harness) -> None:
    """Numbered is queued: the device's socket may go while its event waits for room
    (its task cancelled), and the run's next event, on the device's next connection,
    is numbered after it."""
    svc = gateway.svc
    writer = EventWriter(store=svc.store, metrics=svc.metrics, live=svc.live, queue_max=1)
    run_id = uuid.uuid4()
    assert writer.put_now(run_id, 1, b"1") is None
    waiting = writer.put_now(run_id, 2, b"2")
    assert waiting is not None and writer.depth == 1  # the buffer is full
    device_task = asyncio.ensure_future(waiting)
    await asyncio.sleep(0.05)
    device_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await device_task
    assert (writer.depth, writer.buffered_bytes) == (2, 2)


def test_an_event_row_beyond_int4_is_refused_by_the_encoder_as_asyncpg_refused_it() -> None:
    """seq is an int4 column: the COPY encoder raises the error the writer
    classifies as permanent (the row is dropped, logged, its run ended)."""
    row = (uuid.uuid4(), 2**31, b"1", time.time_ns() // 1000)
    with pytest.raises(asyncpg_base.DataError):
        encode_event_copy([row])
    assert isinstance(asyncpg_base.DataError("x"), PERMANENT_ERRORS)
    assert encode_event_copy([(row[0], 2**31 - 1, b"1", row[3])]).startswith(COPY_HEADER)


def test_a_live_reader_overflows_by_bytes() -> None:
    subscription = Subscription(uuid.uuid4(), capacity=1000, capacity_bytes=1000)
    now = dt.datetime.now(dt.UTC)
    subscription.push([StoredEvent(1, '"' + "x" * 600 + '"', now)])
    subscription.push([StoredEvent(2, '"' + "y" * 600 + '"', now)])
    events, overflowed = subscription.take()
    assert (events, overflowed) == ([], True)
