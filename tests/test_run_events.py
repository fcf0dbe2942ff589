"""Durable run event streams: storage, numbering, readers, back-pressure (PROTOCOL.md §2.3, §3.4).

A device streams agent_data over a real WebSocket; readers use the internal
API's /events stream (NDJSON or SSE) through the internal test client; what
was stored is checked in PostgreSQL directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from harness import SERVICE_TOKEN, Device, Harness

from gateway.runs.live import Subscription
from gateway.store import StoredEvent

AGENT = "agent-1"
AUTH = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
EVENT_LINE_KEYS = {"seq", "data", "received_at"}
READ_TIMEOUT_S = 20.0

MakeGateway = Callable[..., Awaitable[Harness]]


# ---------------------------------------------------------------- helpers


async def start_run(gw: Harness, device: Device, **body: Any) -> str:
    """A run dispatched to ``device``; returns its id once the device got agent_run."""
    body.setdefault("user_id", device.user_id)
    body.setdefault("agent_id", AGENT)
    body.setdefault("device_id", device.device_id)
    status, answer = await gw.api("POST", "/runs", body)
    assert status == 201, answer
    assert answer["status"] == "running", answer
    frame = await device.recv_type("agent_run")
    assert frame["run_id"] == answer["run_id"], frame
    return str(answer["run_id"])


def event_data(i: int, pad: int = 0) -> dict[str, Any]:
    data: dict[str, Any] = {"i": i, "text": f"event {i}", "nested": {"even": i % 2 == 0}}
    if pad:
        data["pad"] = f"{i:08d}".ljust(pad, "x")
    return data


async def send_events(device: Device, run_id: str, indexes: range, pad: int = 0,
                      pause_every: int = 0) -> None:
    """agent_data frames for ``indexes``, as fast as the socket takes them.

    The device shares the test's event loop: ``pause_every`` lets the gateway run
    between bursts, as it would with a device on a real network.
    """
    for i in indexes:
        frame = {"type": "agent_data", "run_id": run_id, "data": event_data(i, pad)}
        await device.ws.send_str(orjson.dumps(frame).decode())
        if pause_every and i % pause_every == pause_every - 1:
            await asyncio.sleep(0.001)


async def complete(device: Device, run_id: str) -> None:
    await device.send({"type": "agent_complete", "run_id": run_id})


async def run_state(pool: asyncpg.Pool, run_id: str) -> asyncpg.Record:
    """Status, event_count and stored events, read in one statement (one snapshot)."""
    row = await pool.fetchrow(
        "SELECT r.status, r.event_count,"
        " (SELECT count(*) FROM agent_run_events e WHERE e.run_id = r.id) AS stored"
        " FROM agent_run_logs r WHERE r.id = $1", uuid.UUID(run_id))
    assert row is not None
    return row


async def wait_state(pool: asyncpg.Pool, run_id: str,
                     predicate: Callable[[asyncpg.Record], bool],
                     timeout: float = 10.0) -> asyncpg.Record:
    """Bounded poll until the run's state satisfies ``predicate``."""
    deadline = time.monotonic() + timeout
    while True:
        row = await run_state(pool, run_id)
        if predicate(row):
            return row
        assert time.monotonic() < deadline, f"run never got there: {dict(row)}"
        await asyncio.sleep(0.02)


async def stored_events(pool: asyncpg.Pool, run_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT seq, data::text AS data, received_at FROM agent_run_events"
        " WHERE run_id = $1 ORDER BY seq", uuid.UUID(run_id))


def assert_events_in_order(seqs_and_data: list[tuple[int, Any]], count: int,
                           pad: int = 0) -> None:
    """seq 1..count exactly once, in order, each with the data sent as event ``seq-1``."""
    seqs = [seq for seq, _ in seqs_and_data]
    expected = list(range(1, count + 1))
    if seqs != expected:
        missing = sorted(set(expected) - set(seqs))[:10]
        dupes = len(seqs) - len(set(seqs))
        raise AssertionError(f"{len(seqs)} events, expected {len(expected)}; "
                             f"first missing {missing}, duplicates {dupes}, head {seqs[:10]}")
    for seq, data in seqs_and_data:
        assert data == event_data(seq - 1, pad), (seq, data)


async def open_events(gw: Harness, run_id: str, *, after: int | None = None,
                      sse: bool = False) -> aiohttp.ClientResponse:
    """GET /runs/{id}/events; returns once the headers arrived (the reader is attached)."""
    headers = dict(AUTH)
    if sse:
        headers["Accept"] = "text/event-stream"
    params = {"after": str(after)} if after is not None else None
    response = await gw.internal.get(f"/internal/v1/runs/{run_id}/events", headers=headers,
                                     params=params)
    assert response.status == 200, await response.text()
    return response


async def pending_run_with_an_sse_reader(
        gw: Harness) -> tuple[dict[str, Any], asyncio.Task[str]]:
    """A run no device can take (it stays pending), and an SSE reader attached to it."""
    status, pending = await gw.api("POST", "/runs", {"user_id": "user-9", "agent_id": AGENT})
    assert status == 201 and pending["status"] == "pending", pending
    response = await open_events(gw, pending["run_id"], sse=True)
    reader = asyncio.create_task(response.text())
    await gw.wait_for(lambda: gw.svc.live.reader_count == 1)
    return pending, reader


async def read_ndjson(response: aiohttp.ClientResponse,
                      into: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every line of an NDJSON stream until it ends (appended to ``into`` as they come)."""
    lines = into if into is not None else []
    async with asyncio.timeout(READ_TIMEOUT_S):
        async for raw in response.content:
            assert raw.endswith(b"\n"), raw
            lines.append(orjson.loads(raw))
    response.release()
    return lines


def pairs(lines: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    return [(line["seq"], line["data"]) for line in lines]


@contextlib.asynccontextmanager
async def sampling(sample: Callable[[], None], every_s: float = 0.001) -> AsyncIterator[None]:
    """Call ``sample`` in a background task while the block runs."""

    async def loop() -> None:
        while True:
            sample()
            await asyncio.sleep(every_s)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sample()


def parse_sse(text: str) -> list[dict[str, str]]:
    """SSE text → its blocks, each a dict of field → value."""
    assert text.endswith("\n\n"), text[-200:]
    blocks = []
    for chunk in text.split("\n\n"):
        if not chunk:
            continue
        block: dict[str, str] = {}
        for line in chunk.split("\n"):
            field, sep, value = line.partition(": ")
            assert sep, f"not an SSE field line: {line!r}"
            assert field not in block, chunk
            block[field] = value
        blocks.append(block)
    return blocks


# ---------------------------------------------------------------- storage


async def test_ten_thousand_events_are_stored_gap_free_before_the_run_completes(
    gateway: Harness,
) -> None:
    """10,000 agent_data frames then agent_complete: seq 1..10000 in order with the data
    sent, event_count 10000, and the run never reads completed while events are missing."""
    count = 10_000
    pool = gateway.svc.pool
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    early: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        # Whenever the run reads finished, every event must already be stored.
        while not stop.is_set():
            row = await run_state(pool, run_id)
            if row["status"] != "running" and row["stored"] != count:
                early.append(dict(row))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        await send_events(device, run_id, range(count), pause_every=500)
        await complete(device, run_id)
        row = await wait_state(pool, run_id, lambda r: r["status"] != "running", timeout=30)
    finally:
        stop.set()
        await watcher
    assert early == [], early[:3]
    assert (row["status"], row["event_count"], row["stored"]) == ("completed", count, count), \
        dict(row)
    events = await stored_events(pool, run_id)
    assert_events_in_order([(e["seq"], orjson.loads(e["data"])) for e in events], count)
    received = [e["received_at"] for e in events]
    assert received == sorted(received), "received_at goes back in time"


async def test_events_after_seq_returns_only_later_events(gateway: Harness) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    await send_events(device, run_id, range(10))
    await complete(device, run_id)
    await wait_state(gateway.svc.pool, run_id, lambda r: r["status"] == "completed")

    lines = await read_ndjson(await open_events(gateway, run_id, after=7))
    assert pairs(lines) == [(seq, event_data(seq - 1)) for seq in (8, 9, 10)], lines
    assert await read_ndjson(await open_events(gateway, run_id, after=10)) == []
    assert await read_ndjson(await open_events(gateway, run_id, after=1000)) == []
    assert_events_in_order(pairs(await read_ndjson(await open_events(gateway, run_id))), 10)
    assert_events_in_order(pairs(await read_ndjson(await open_events(gateway, run_id, after=0))),
                           10)


async def test_events_after_must_be_a_non_negative_integer(gateway: Harness) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    for after in ("-1", "seven", "1.5", ""):
        status, body = await gateway.api("GET", f"/runs/{run_id}/events?after={after}")
        assert status == 400, (after, body)
        assert body["error"] == "bad_request", body


async def test_ndjson_stream_has_its_content_type_and_one_event_object_per_line(
    gateway: Harness,
) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    await send_events(device, run_id, range(3))
    await device.send({"type": "agent_data", "run_id": run_id, "data": "plain"})
    await complete(device, run_id)
    await wait_state(gateway.svc.pool, run_id, lambda r: r["status"] == "completed")

    response = await open_events(gateway, run_id)
    assert response.headers["Content-Type"].startswith("application/x-ndjson"), \
        response.headers
    lines = await read_ndjson(response)
    assert [set(line) for line in lines] == [EVENT_LINE_KEYS] * 4, lines
    assert pairs(lines) == [(1, event_data(0)), (2, event_data(1)), (3, event_data(2)),
                            (4, "plain")], lines
    stored = await stored_events(gateway.svc.pool, run_id)
    for line, row in zip(lines, stored, strict=True):
        assert dt.datetime.fromisoformat(line["received_at"]) == row["received_at"], line


async def test_sse_stream_sends_agent_data_blocks_then_an_end_block_with_the_record(
    gateway: Harness,
) -> None:
    """Attached before the events: live agent_data blocks, then `event: end` with the
    run's final record."""
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    response = await open_events(gateway, run_id, sse=True)
    assert response.headers["Content-Type"].startswith("text/event-stream"), response.headers
    reader = asyncio.create_task(response.text())
    await send_events(device, run_id, range(5))
    await device.send({"type": "agent_complete", "run_id": run_id, "result": {"ok": True}})
    async with asyncio.timeout(READ_TIMEOUT_S):
        text = await reader

    blocks = parse_sse(text)
    *data_blocks, end = blocks
    assert len(data_blocks) == 5, blocks
    for seq, block in enumerate(data_blocks, start=1):
        assert set(block) == {"id", "event", "data"}, block
        assert block["id"] == str(seq) and block["event"] == "agent_data", block
        line = orjson.loads(block["data"])
        assert set(line) == EVENT_LINE_KEYS, line
        assert (line["seq"], line["data"]) == (seq, event_data(seq - 1)), line
    assert end["event"] == "end" and "id" not in end, end
    record = orjson.loads(end["data"])
    assert record["run_id"] == run_id, record
    assert (record["status"], record["event_count"], record["result"]) == \
        ("completed", 5, {"ok": True}), record


async def test_stream_of_a_run_that_ends_without_completing_ends_too(
    make_gateway: MakeGateway,
) -> None:
    """GATEWAY_RUN_RESUME_S=0: a device that disconnects mid-run: its reader gets the
    stored events and an end record with status error; a reader of a cancelled pending
    run gets just the end."""
    gateway = await make_gateway(run_resume_s=0)
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    response = await open_events(gateway, run_id, sse=True)
    reader = asyncio.create_task(response.text())
    await send_events(device, run_id, range(3))
    await wait_state(gateway.svc.pool, run_id, lambda r: r["stored"] == 3)
    await device.close()
    async with asyncio.timeout(READ_TIMEOUT_S):
        blocks = parse_sse(await reader)
    assert [b["event"] for b in blocks] == ["agent_data"] * 3 + ["end"], blocks
    record = orjson.loads(blocks[-1]["data"])
    assert (record["status"], record["errors"]) == ("error", ["device disconnected"]), record

    pending, reader = await pending_run_with_an_sse_reader(gateway)
    status, body = await gateway.api("POST", f"/runs/{pending['run_id']}/cancel")
    assert status == 200, body
    async with asyncio.timeout(READ_TIMEOUT_S):
        blocks = parse_sse(await reader)
    assert [b["event"] for b in blocks] == ["end"], blocks
    assert orjson.loads(blocks[0]["data"])["status"] == "cancelled", blocks


# ---------------------------------------------------------------- live readers


async def test_readers_attached_before_during_and_after_see_every_event_once_in_order(
    gateway: Harness,
) -> None:
    count = 400
    half = count // 2
    pool = gateway.svc.pool
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)

    before_lines: list[dict[str, Any]] = []
    before = asyncio.create_task(read_ndjson(await open_events(gateway, run_id), before_lines))
    await send_events(device, run_id, range(half))
    await wait_state(pool, run_id, lambda r: r["stored"] == half)
    # The early reader is live: it has the first half while the run is still going.
    await gateway.wait_for(lambda: len(before_lines) >= half)
    assert (await run_state(pool, run_id))["status"] == "running"

    middle_lines: list[dict[str, Any]] = []
    middle = asyncio.create_task(read_ndjson(await open_events(gateway, run_id), middle_lines))
    await send_events(device, run_id, range(half, count))
    await complete(device, run_id)
    async with asyncio.timeout(READ_TIMEOUT_S):
        await asyncio.gather(before, middle)
    await wait_state(pool, run_id, lambda r: r["status"] == "completed")
    after_lines = await read_ndjson(await open_events(gateway, run_id))

    for name, lines in (("before", before_lines), ("middle", middle_lines),
                        ("after", after_lines)):
        try:
            assert_events_in_order(pairs(lines), count)
        except AssertionError as exc:
            raise AssertionError(f"reader attached {name}: {exc}") from None
    # What a live reader was handed is what the table holds, received_at to the
    # microsecond (the writer keeps it as an integer, PostgreSQL as a timestamp).
    assert before_lines == after_lines
    assert middle_lines == after_lines
    assert gateway.svc.live.reader_count == 0


async def test_stalled_reader_catches_up_without_holding_events_in_memory(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """subscriber_buffer=10: a reader that reads nothing while 2,000 events go by never
    slows the device, its live buffer never holds more than 10 events (it overflows and
    falls back to the database instead), and once it reads it still gets every event
    exactly once, in order."""
    count = 2000
    # Big events (~8 MB in all): the unread response fills the socket buffers, so the
    # gateway's writer to this reader really stalls.
    pad = 4096
    seen = {"pushes": 0, "max_buffered": 0, "overflows": 0}
    original_push = Subscription.push

    def watched_push(self: Subscription, events: Sequence[StoredEvent]) -> None:
        # A spy, not a stand-in: the real push runs, then its outcome is measured.
        was_overflowed = self.overflowed
        original_push(self, events)
        seen["pushes"] += 1
        seen["max_buffered"] = max(seen["max_buffered"], len(self._events))
        seen["overflows"] += self.overflowed and not was_overflowed

    monkeypatch.setattr(Subscription, "push", watched_push)
    gateway = await make_gateway(subscriber_buffer=10)
    pool = gateway.svc.pool
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    response = await open_events(gateway, run_id)
    (subscription,) = gateway.svc.live._subscriptions[uuid.UUID(run_id)]
    assert subscription.capacity == 10

    await send_events(device, run_id, range(count), pad, pause_every=50)
    await complete(device, run_id)
    # The device is done and the run ended while the reader has read nothing.
    row = await wait_state(pool, run_id, lambda r: r["status"] != "running")
    assert (row["status"], row["stored"]) == ("completed", count), dict(row)
    assert len(subscription._events) <= subscription.capacity, len(subscription._events)
    assert seen["pushes"] > 0, seen
    assert seen["max_buffered"] <= subscription.capacity, seen
    assert seen["overflows"] > 0, f"the reader never fell behind, nothing was tested: {seen}"

    lines = await read_ndjson(response)
    assert_events_in_order(pairs(lines), count, pad)
    assert gateway.svc.live.reader_count == 0


async def test_reader_on_another_gateway_process_sees_every_event_and_the_end(
    make_gateway: MakeGateway,
) -> None:
    """The device feeds the run through one process, the reader asks another: no live
    push reaches it, yet it gets every event once, in order, and the end record."""
    feeding = await make_gateway(instance_id="gw-feeding")
    reading = await make_gateway(instance_id="gw-reading")
    device = await feeding.device("user-1", "device-1", [AGENT])
    run_id = await start_run(feeding, device)
    response = await open_events(reading, run_id, sse=True)
    reader = asyncio.create_task(response.text())
    await send_events(device, run_id, range(100), pause_every=10)
    await complete(device, run_id)
    async with asyncio.timeout(READ_TIMEOUT_S):
        blocks = parse_sse(await reader)
    *data_blocks, end = blocks
    assert_events_in_order([(int(b["id"]), orjson.loads(b["data"])["data"])
                            for b in data_blocks], 100)
    assert end["event"] == "end", end
    record = orjson.loads(end["data"])
    assert (record["status"], record["event_count"], record["gateway_instance"]) == \
        ("completed", 100, "gw-feeding"), record


# ---------------------------------------------------------------- back-pressure


async def test_slow_storage_back_pressures_devices_without_losing_or_reordering_events(
    make_gateway: MakeGateway,
) -> None:
    """event_queue_max=50, event_batch_max=10: two devices send 2,000 events fast; the
    writer's buffer never holds more than 50, and every event is stored, each device's
    in the order it sent them, across many small batches."""
    per_device = 1000
    gateway = await make_gateway(event_queue_max=50, event_batch_max=10)
    pool = gateway.svc.pool
    writer = gateway.svc.writer
    devices = [await gateway.device("user-1", f"device-{n}", [AGENT]) for n in (1, 2)]
    run_ids = [await start_run(gateway, device) for device in devices]
    depths: list[int] = []

    async with sampling(lambda: depths.append(writer.depth)):
        await asyncio.gather(*(send_events(device, run_id, range(per_device))
                               for device, run_id in zip(devices, run_ids, strict=True)))
        for device, run_id in zip(devices, run_ids, strict=True):
            await complete(device, run_id)
        for run_id in run_ids:
            await wait_state(pool, run_id, lambda r: r["status"] != "running", timeout=30)
    assert max(depths) <= 50, max(depths)
    assert max(depths) > 10, f"storage never fell behind, nothing was tested: {depths}"

    for run_id in run_ids:
        row = await run_state(pool, run_id)
        assert (row["status"], row["event_count"], row["stored"]) == \
            ("completed", per_device, per_device), dict(row)
        events = await stored_events(pool, run_id)
        assert_events_in_order([(e["seq"], orjson.loads(e["data"])) for e in events],
                               per_device)


async def test_a_drain_cuts_streams_of_unfinished_runs_short_without_an_end(
    gateway: Harness,
) -> None:
    """When the gateway drains, a reader of a run that has not ended gets its stream
    closed at once (to resume elsewhere with ?after=), with no misleading `end`."""
    _pending, reader = await pending_run_with_an_sse_reader(gateway)
    gateway.svc.draining = True
    gateway.svc.live.end_all()
    async with asyncio.timeout(READ_TIMEOUT_S):
        text = await reader
    assert text == "", text  # no agent_data (there were none) and no `end`
