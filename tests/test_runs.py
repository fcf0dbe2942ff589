"""Agent runs: creation, dispatch, claiming, scheduling, cancel, end, refusals (PROTOCOL.md §1-3).

Every test drives the gateway as its users do (a device over a real
WebSocket, a sibling service over the internal HTTP API) and checks the
outcome in PostgreSQL directly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import attrs
import orjson
import pytest
from harness import Device, Harness
from run_helpers import (
    AGENT,
    create_run,
    expect_error,
    poll_row,
    run_row,
    start_run,
    stored_events,
)

RUN_RECORD_KEYS = {
    "run_id", "user_id", "agent_id", "device_id", "status", "input", "result", "errors",
    "scheduled_at", "started_at", "finished_at", "event_count", "gateway_instance",
    "created_at", "updated_at", "detached_at", "detach_reason",
}
MakeGateway = Callable[..., Awaitable[Harness]]


def raw_agent_data(run_id: str, data_json: str) -> str:
    """An agent_data frame as JSON text, ``data_json`` spliced in unchanged."""
    return '{"type": "agent_data", "run_id": "' + run_id + '", "data": ' + data_json + "}"


def iso_in(seconds: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


async def insert_pending_runs(pool: asyncpg.Pool, count: int, *, user_id: str = "user-1",
                              agent_id: str = AGENT) -> set[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    await pool.executemany(
        "INSERT INTO agent_run_logs (id, user_id, agent_id) VALUES ($1, $2, $3)",
        [(run_id, user_id, agent_id) for run_id in ids])
    return set(ids)


# ---------------------------------------------------------------- creation and dispatch


async def test_run_without_a_device_is_stored_pending(gateway: Harness) -> None:
    """POST /runs with nobody online: 201, status pending, nothing dispatched."""
    answer = await create_run(gateway, input={"q": "hello"})
    assert answer["status"] == "pending", answer
    row = await run_row(gateway.svc.pool, answer["run_id"])
    assert row["status"] == "pending", row
    assert row["input"] == {"q": "hello"}, row
    assert row["device_id"] is None and row["started_at"] is None, row
    assert row["gateway_instance"] is None, row


async def test_run_is_dispatched_at_once_to_an_online_device_advertising_the_agent(
    gateway: Harness,
) -> None:
    """The device gets agent_run {run_id, agent_id, input}; the run is running on it."""
    device = await gateway.device("user-1", "device-1", [AGENT])
    answer = await create_run(gateway, input={"prompt": "hi", "n": [1, 2]})
    assert answer["status"] == "running", answer
    frame = await device.recv_type("agent_run")
    assert frame == {"type": "agent_run", "run_id": answer["run_id"], "agent_id": AGENT,
                     "input": {"prompt": "hi", "n": [1, 2]}}, frame
    row = await run_row(gateway.svc.pool, answer["run_id"])
    assert row["status"] == "running", row
    assert row["device_id"] == "device-1", row
    assert row["gateway_instance"] == "test-instance", row
    assert row["started_at"] is not None, row


async def test_device_not_advertising_the_agent_gets_no_run(gateway: Harness) -> None:
    device = await gateway.device("user-1", "device-1", ["other-agent"])
    answer = await create_run(gateway)
    assert answer["status"] == "pending", answer
    await device.expect_silence(0.2)


async def test_run_for_a_named_device_goes_to_that_device_only(gateway: Harness) -> None:
    """Two devices of the user advertise the agent; device_id picks one, the other stays idle."""
    first = await gateway.device("user-1", "device-1", [AGENT])
    second = await gateway.device("user-1", "device-2", [AGENT])
    answer = await create_run(gateway, device_id="device-1")
    assert answer["status"] == "running", answer
    frame = await first.recv_type("agent_run")
    assert frame["run_id"] == answer["run_id"], frame
    await second.expect_silence(0.2)
    row = await run_row(gateway.svc.pool, answer["run_id"])
    assert row["device_id"] == "device-1", row


async def test_run_for_an_offline_device_is_never_given_to_another_device(
    gateway: Harness,
) -> None:
    """device_id names an offline device: the user's other device (same agent) must not get it,
    not even on its own later hello; the named device claims it when it connects."""
    other = await gateway.device("user-1", "device-other", [AGENT])
    answer = await create_run(gateway, device_id="device-wanted")
    assert answer["status"] == "pending", answer
    assert answer["device_id"] == "device-wanted", answer
    await other.send({"type": "device_hello", "device_id": "device-other", "agent_ids": [AGENT]})
    ack = await other.recv_type("hello_ack")
    assert ack["connection_id"], ack
    await other.expect_silence(0.2)
    assert (await run_row(gateway.svc.pool, answer["run_id"]))["status"] == "pending"

    wanted = await gateway.device("user-1", "device-wanted", [AGENT])
    frame = await wanted.recv_type("agent_run")
    assert frame["run_id"] == answer["run_id"], frame
    row = await run_row(gateway.svc.pool, answer["run_id"])
    assert (row["status"], row["device_id"]) == ("running", "device-wanted"), row
    await other.expect_silence(0.1)


async def test_run_of_another_user_is_not_dispatched_to_my_device(gateway: Harness) -> None:
    mine = await gateway.device("user-1", "device-1", [AGENT])
    answer = await create_run(gateway, user_id="user-2")
    assert answer["status"] == "pending", answer
    await mine.expect_silence(0.2)


async def test_scheduled_run_waits_then_is_dispatched_when_due(gateway: Harness) -> None:
    """scheduled_at ~1 s ahead: pending at first (even with the device online), then the
    scheduler dispatches it once due."""
    device = await gateway.device("user-1", "device-1", [AGENT])
    scheduled = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    answer = await create_run(gateway, scheduled_at=scheduled.isoformat(), input={"at": 1})
    assert answer["status"] == "pending", answer
    await device.expect_silence(0.3)
    assert (await run_row(gateway.svc.pool, answer["run_id"]))["status"] == "pending"

    frame = await device.recv_type("agent_run", timeout=5.0)
    received = dt.datetime.now(dt.UTC)
    assert frame["run_id"] == answer["run_id"], frame
    assert frame["input"] == {"at": 1}, frame
    assert received >= scheduled - dt.timedelta(milliseconds=50), (received, scheduled)
    row = await run_row(gateway.svc.pool, answer["run_id"])
    assert (row["status"], row["device_id"]) == ("running", "device-1"), row
    assert row["started_at"] >= row["scheduled_at"], row


async def test_scheduled_run_is_not_claimed_by_a_hello_before_it_is_due(
    gateway: Harness,
) -> None:
    answer = await create_run(gateway, scheduled_at=iso_in(30))
    device = await gateway.device("user-1", "device-1", [AGENT])
    await device.expect_silence(0.2)
    assert (await run_row(gateway.svc.pool, answer["run_id"]))["status"] == "pending"


async def test_pending_run_is_claimed_on_hello_and_sent_right_after_hello_ack(
    gateway: Harness,
) -> None:
    """The device sees hello_ack first, then agent_run; the run was claimed before the ack."""
    answer = await create_run(gateway, input={"k": "v"})
    assert answer["status"] == "pending", answer
    ws = await gateway.connect()
    device = Device(ws, "user-1", "device-1")
    await device.send({"type": "device_hello", "device_id": "device-1", "agent_ids": [AGENT]})
    first = await device.recv()
    assert first["type"] == "hello_ack", first
    # Claimed before the ack: by the time the device reads it, the run is running.
    row = await run_row(gateway.svc.pool, answer["run_id"])
    assert (row["status"], row["device_id"]) == ("running", "device-1"), row
    second = await device.recv()
    assert second == {"type": "agent_run", "run_id": answer["run_id"], "agent_id": AGENT,
                      "input": {"k": "v"}}, second


async def test_pending_runs_are_claimed_oldest_first(gateway: Harness) -> None:
    ids = [(await create_run(gateway, input={"i": i}))["run_id"] for i in range(3)]
    device = await gateway.device("user-1", "device-1", [AGENT])
    got = [(await device.recv_type("agent_run"))["run_id"] for _ in ids]
    assert got == ids, got


async def test_later_hello_with_new_agents_claims_their_runs_and_gets_a_new_ack(
    gateway: Harness,
) -> None:
    device = await gateway.device("user-1", "device-1", ["agent-a"])
    answer = await create_run(gateway, agent_id="agent-b")
    assert answer["status"] == "pending", answer
    await device.send({"type": "device_hello", "device_id": "device-1",
                       "agent_ids": ["agent-a", "agent-b"]})
    ack = await device.recv()
    assert ack["type"] == "hello_ack", ack
    assert ack["connection_id"] == device.hello_ack["connection_id"], (ack, device.hello_ack)
    frame = await device.recv()
    assert frame["type"] == "agent_run" and frame["run_id"] == answer["run_id"], frame
    assert frame["agent_id"] == "agent-b", frame
    row = await run_row(gateway.svc.pool, answer["run_id"])
    assert (row["status"], row["device_id"]) == ("running", "device-1"), row
    # The new agent list is the one in force: a new run for agent-b goes out at once.
    again = await create_run(gateway, agent_id="agent-b")
    assert again["status"] == "running", again
    assert (await device.recv_type("agent_run"))["run_id"] == again["run_id"]


async def test_later_hello_with_another_device_id_is_refused_and_connection_stays(
    gateway: Harness,
) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    await device.send({"type": "device_hello", "device_id": "device-2", "agent_ids": [AGENT]})
    await expect_error(device, "bad_frame", "device_hello")
    answer = await create_run(gateway, device_id="device-1")
    assert answer["status"] == "running", answer
    assert (await device.recv_type("agent_run"))["run_id"] == answer["run_id"]


async def test_concurrent_claimers_never_claim_a_run_twice(gateway: Harness) -> None:
    """claim_pending_runs from three tasks (different devices and instances) at once, over
    many pending runs, round after round: every run is claimed exactly once."""
    store = gateway.svc.store
    pool = gateway.svc.pool
    claimers = [("device-a", "instance-a"), ("device-b", "instance-b"),
                ("device-c", "instance-c")]
    for _round in range(10):
        ids = await insert_pending_runs(pool, 60)
        results = await asyncio.gather(*(
            store.claim_pending_runs(user_id="user-1", device_id=device_id, agent_ids=[AGENT],
                                     instance_id=instance_id)
            for device_id, instance_id in claimers))
        claimed = [record.id for records in results for record in records]
        assert len(claimed) == len(set(claimed)), "a run was claimed twice"
        assert set(claimed) == ids, (len(claimed), len(ids))
        by_claimer = {record.id: claimer for claimer, records in zip(claimers, results,
                                                                     strict=True)
                      for record in records}
        rows = await pool.fetch(
            "SELECT id, status, device_id, gateway_instance FROM agent_run_logs"
            " WHERE id = ANY($1::uuid[])", list(ids))
        for row in rows:
            assert row["status"] == "running", dict(row)
            assert (row["device_id"], row["gateway_instance"]) == by_claimer[row["id"]], dict(row)


async def test_two_gateways_on_one_database_dispatch_each_pending_run_once(
    make_gateway: MakeGateway,
) -> None:
    """Devices of one user hello at two gateway processes at once: each pending run reaches
    exactly one device, stamped with the instance that dispatched it."""
    gw_a = await make_gateway(instance_id="gw-a")
    gw_b = await make_gateway(instance_id="gw-b")
    ids = {(await create_run(gw_a, input={"i": i}))["run_id"] for i in range(40)}
    ids |= {(await create_run(gw_b, input={"i": i}))["run_id"] for i in range(40, 80)}
    dev_a, dev_b = await asyncio.gather(gw_a.device("user-1", "device-a", [AGENT]),
                                        gw_b.device("user-1", "device-b", [AGENT]))
    rows = await gw_a.svc.pool.fetch(
        "SELECT id::text AS id, status, device_id, gateway_instance FROM agent_run_logs")
    assert {row["status"] for row in rows} == {"running"}, [dict(r) for r in rows]
    expected = {"device-a": "gw-a", "device-b": "gw-b"}
    for row in rows:
        assert expected[row["device_id"]] == row["gateway_instance"], dict(row)
    received: list[str] = []
    for device in (dev_a, dev_b):
        mine = {row["id"] for row in rows if row["device_id"] == device.device_id}
        got = [(await device.recv_type("agent_run"))["run_id"] for _ in mine]
        assert set(got) == mine and len(got) == len(mine), (device.device_id, got)
        await device.expect_silence(0.2)
        received += got
    assert sorted(received) == sorted(ids)


# ---------------------------------------------------------------- reading runs


async def test_get_run_returns_the_record_with_its_protocol_field_names(
    gateway: Harness,
) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device, input={"x": [1, "two"]})
    await device.send({"type": "agent_data", "run_id": run_id, "data": {"step": 1}})
    await device.send({"type": "agent_complete", "run_id": run_id, "result": {"answer": 42}})
    await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] == "completed")

    status, record = await gateway.api("GET", f"/runs/{run_id}")
    assert status == 200, record
    assert set(record) == RUN_RECORD_KEYS, record
    row = await run_row(gateway.svc.pool, run_id)
    assert record["run_id"] == run_id == str(row["id"])
    for key in ("user_id", "agent_id", "device_id", "status", "input", "result", "errors",
                "event_count", "gateway_instance"):
        assert record[key] == row[key], (key, record, row)
    assert record["input"] == {"x": [1, "two"]}, record
    assert record["result"] == {"answer": 42}, record
    assert record["errors"] == [] and record["event_count"] == 1, record
    for key in ("scheduled_at", "started_at", "finished_at", "created_at", "updated_at"):
        assert dt.datetime.fromisoformat(record[key]) == row[key], (key, record)


async def test_list_runs_filters_by_user_and_status_newest_first(gateway: Harness) -> None:
    created = [(await create_run(gateway, input={"i": i}))["run_id"] for i in range(5)]
    await create_run(gateway, user_id="user-2")
    status, cancelled = await gateway.api("POST", f"/runs/{created[4]}/cancel")
    assert status == 200, cancelled

    status, body = await gateway.api("GET", "/runs?user_id=user-1")
    assert status == 200, body
    assert [r["run_id"] for r in body["runs"]] == created[::-1], body
    assert all(set(r) == RUN_RECORD_KEYS for r in body["runs"]), body

    status, body = await gateway.api("GET", "/runs?user_id=user-1&status=pending&limit=2")
    assert status == 200, body
    assert [r["run_id"] for r in body["runs"]] == [created[3], created[2]], body

    status, body = await gateway.api("GET", "/runs?user_id=user-1&status=cancelled")
    assert status == 200, body
    assert [r["run_id"] for r in body["runs"]] == [created[4]], body

    status, body = await gateway.api("GET", "/runs?user_id=nobody")
    assert (status, body) == (200, {"runs": []})


@pytest.mark.parametrize("query", [
    "", "?user_id=user-1&status=bogus", "?user_id=user-1&limit=0",
    "?user_id=user-1&limit=many",
])
async def test_list_runs_refuses_bad_queries(gateway: Harness, query: str) -> None:
    status, body = await gateway.api("GET", f"/runs{query}")
    assert status == 400, body
    assert body["error"] == "bad_request", body


@pytest.mark.parametrize("run_id", ["not-a-uuid", str(uuid.uuid4()), "1234"])
@pytest.mark.parametrize(("method", "suffix"), [
    ("GET", ""), ("GET", "/events"), ("POST", "/cancel"),
])
async def test_unknown_or_malformed_run_id_is_404_run_not_found(
    gateway: Harness, run_id: str, method: str, suffix: str,
) -> None:
    status, body = await gateway.api(method, f"/runs/{run_id}{suffix}")
    assert status == 404, body
    assert body["error"] == "run_not_found", body


@pytest.mark.parametrize(("body", "raw"), [
    pytest.param({"user_id": "user-1"}, None, id="missing-agent-id"),
    pytest.param({"agent_id": AGENT}, None, id="missing-user-id"),
    pytest.param({"user_id": "user-1", "agent_id": ""}, None, id="empty-agent-id"),
    pytest.param({"user_id": "user-1", "agent_id": 7}, None, id="agent-id-not-a-string"),
    pytest.param({"user_id": "user-1", "agent_id": AGENT, "scheduled_at": "tomorrow"}, None,
                 id="scheduled-at-not-a-date"),
    pytest.param({"user_id": "user-1", "agent_id": AGENT, "scheduled_at": 1700000000}, None,
                 id="scheduled-at-a-number"),
    pytest.param({"user_id": "user-1", "agent_id": AGENT, "device_id": "\u0007bell"}, None,
                 id="device-id-control-char"),
    pytest.param(None, b'{"user_id": "user-1", "agent_id": "agent-1", "input": {"t": "a\\u0000b"}}',
                 id="input-with-nul"),
    pytest.param(None, b'{"user_id": "user-1", "agent_id": "agent-1", "input": {"a\\u0000": 1}}',
                 id="input-key-with-nul"),
    pytest.param(None, b'{"user_id": "user-1", ', id="not-json"),
    pytest.param(None, b'["user-1"]', id="not-an-object"),
])
async def test_create_run_refuses_bad_bodies_with_400_and_stores_nothing(
    gateway: Harness, body: Any, raw: bytes | None,
) -> None:
    status, answer = await gateway.api("POST", "/runs", body, raw=raw)
    assert status == 400, answer
    assert answer["error"] == "bad_request", answer
    assert isinstance(answer["detail"], str) and answer["detail"], answer
    count = await gateway.svc.pool.fetchval("SELECT count(*) FROM agent_run_logs")
    assert count == 0


# ---------------------------------------------------------------- the end of a run


async def test_agent_complete_stores_status_errors_and_result(gateway: Harness) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    await device.send({"type": "agent_complete", "run_id": run_id, "status": "error",
                       "errors": ["tool failed", "gave up"], "result": {"partial": [1, 2]}})
    row = await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] != "running")
    assert row["status"] == "error", row
    assert row["errors"] == ["tool failed", "gave up"], row
    assert row["result"] == {"partial": [1, 2]}, row
    assert row["finished_at"] is not None, row
    await device.expect_silence(0.1)


async def test_agent_complete_without_status_means_completed(gateway: Harness) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    await device.send({"type": "agent_complete", "run_id": run_id})
    row = await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] != "running")
    assert row["status"] == "completed", row
    assert row["errors"] == [] and row["result"] is None, row


async def test_agent_complete_with_a_bogus_status_or_unstorable_fields_is_a_bad_frame(
    gateway: Harness,
) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    await device.send({"type": "agent_complete", "run_id": run_id, "status": "bogus"})
    await expect_error(device, "bad_frame", "agent_complete")
    await device.send({"type": "agent_complete", "run_id": run_id, "errors": "not a list"})
    await expect_error(device, "bad_frame", "agent_complete")
    for field in ('"errors": ["a\\u0000"]', '"result": {"r": "\\u0000"}'):
        await device.send('{"type": "agent_complete", "run_id": "' + run_id + '", ' + field
                          + "}")
        await expect_error(device, "bad_frame", "agent_complete")
    row = await run_row(gateway.svc.pool, run_id)
    assert row["status"] == "running", row
    # The run is still the device's to end.
    await device.send({"type": "agent_complete", "run_id": run_id})
    await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] == "completed")


# ---------------------------------------------------------------- cancel


async def test_cancelled_pending_runs_are_never_dispatched_later(gateway: Harness) -> None:
    """A due pending run and a scheduled one, both cancelled: a device connecting afterwards
    (and staying past the scheduled time) receives neither."""
    due = await create_run(gateway)
    scheduled_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=0.6)
    later = await create_run(gateway, scheduled_at=scheduled_at.isoformat())
    for answer in (due, later):
        status, record = await gateway.api("POST", f"/runs/{answer['run_id']}/cancel")
        assert status == 200, record
        assert record["status"] == "cancelled" and record["run_id"] == answer["run_id"], record
        assert record["finished_at"] is not None, record
    device = await gateway.device("user-1", "device-1", [AGENT])
    remaining = (scheduled_at - dt.datetime.now(dt.UTC)).total_seconds()
    await device.expect_silence(max(0.2, remaining + 0.5))
    for answer in (due, later):
        row = await run_row(gateway.svc.pool, answer["run_id"])
        assert (row["status"], row["device_id"]) == ("cancelled", None), row


async def test_cancelling_a_running_run_sends_agent_cancel_to_its_device(
    gateway: Harness,
) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    status, record = await gateway.api("POST", f"/runs/{run_id}/cancel")
    assert status == 200, record
    assert record["status"] == "cancelled", record
    frame = await device.recv_type("agent_cancel")
    assert frame["run_id"] == run_id, frame
    assert isinstance(frame["reason"], str) and frame["reason"], frame
    row = await run_row(gateway.svc.pool, run_id)
    assert row["status"] == "cancelled" and row["finished_at"] is not None, row
    # The device's late frames for it are refused, and the run stays cancelled.
    await device.send({"type": "agent_data", "run_id": run_id, "data": "late"})
    await expect_error(device, "run_finished", "agent_data")
    await device.send({"type": "agent_complete", "run_id": run_id})
    await expect_error(device, "run_finished", "agent_complete")
    row = await run_row(gateway.svc.pool, run_id)
    assert (row["status"], row["event_count"]) == ("cancelled", 0), row
    assert await stored_events(gateway.svc.pool, run_id) == []


@attrs.define(eq=False)
class RecordingTarget:
    """A RunTarget that keeps what it is sent (the seam ``gateway.runs`` is written to)."""

    user_id: str
    device_id: str
    connection_id: str = attrs.field(factory=lambda: str(uuid.uuid4()))
    closing: bool = False
    event_acks: bool = False
    sent: list[dict[str, Any]] = attrs.Factory(list)

    def send(self, frame: bytes) -> None:
        self.sent.append(orjson.loads(frame))


async def test_a_run_cancelled_between_hello_claim_and_its_agent_run_is_never_announced(
    gateway: Harness,
) -> None:
    """Claimed at hello, cancelled before hello_ack went out: the device gets neither the
    agent_run nor an agent_cancel for a run it never heard of."""
    answer = await create_run(gateway, device_id="device-1")
    runs = gateway.svc.runs
    target = RecordingTarget("user-1", "device-1")
    claimed = await runs.claim_for(target, [AGENT])
    assert [str(record.id) for record in claimed] == [answer["run_id"]]
    status, record = await gateway.api("POST", f"/runs/{answer['run_id']}/cancel")
    assert status == 200 and record["status"] == "cancelled", record
    runs.send_claimed(target, claimed)
    assert target.sent == []
    row = await run_row(gateway.svc.pool, answer["run_id"])
    assert row["status"] == "cancelled", row


async def test_a_claimed_run_once_announced_is_cancelled_on_its_device(
    gateway: Harness,
) -> None:
    answer = await create_run(gateway, device_id="device-1")
    runs = gateway.svc.runs
    target = RecordingTarget("user-1", "device-1")
    claimed = await runs.claim_for(target, [AGENT])
    runs.send_claimed(target, claimed)
    status, record = await gateway.api("POST", f"/runs/{answer['run_id']}/cancel")
    assert status == 200, record
    assert [(f["type"], f["run_id"]) for f in target.sent] == [
        ("agent_run", answer["run_id"]), ("agent_cancel", answer["run_id"])]


async def test_cancelling_a_finished_run_is_409_run_finished(gateway: Harness) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    completed = await start_run(gateway, device)
    await device.send({"type": "agent_complete", "run_id": completed})
    await poll_row(gateway.svc.pool, completed, lambda r: r["status"] == "completed")
    status, body = await gateway.api("POST", f"/runs/{completed}/cancel")
    assert status == 409, body
    assert body["error"] == "run_finished", body
    assert (await run_row(gateway.svc.pool, completed))["status"] == "completed"

    cancelled = (await create_run(gateway, user_id="user-2"))["run_id"]
    status, body = await gateway.api("POST", f"/runs/{cancelled}/cancel")
    assert status == 200, body
    status, body = await gateway.api("POST", f"/runs/{cancelled}/cancel")
    assert status == 409, body
    assert body["error"] == "run_finished", body


# ---------------------------------------------------------------- refused device frames


async def test_frames_for_a_finished_run_are_refused_run_finished(gateway: Harness) -> None:
    """On the connection that ended the run, and on a later connection of the same device."""
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    await device.send({"type": "agent_data", "run_id": run_id, "data": 1})
    await device.send({"type": "agent_complete", "run_id": run_id, "result": "done"})
    await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] == "completed")
    await device.send({"type": "agent_data", "run_id": run_id, "data": 2})
    await expect_error(device, "run_finished", "agent_data")
    await device.send({"type": "agent_complete", "run_id": run_id, "status": "error"})
    await expect_error(device, "run_finished", "agent_complete")
    await device.close()

    again = await gateway.device("user-1", "device-1", [AGENT])
    await again.send({"type": "agent_data", "run_id": run_id, "data": 3})
    await expect_error(again, "run_finished", "agent_data")
    await again.send({"type": "agent_complete", "run_id": run_id})
    await expect_error(again, "run_finished", "agent_complete")

    row = await run_row(gateway.svc.pool, run_id)
    assert (row["status"], row["result"], row["errors"]) == ("completed", "done", []), row
    assert await stored_events(gateway.svc.pool, run_id) == [(1, 1)]


async def test_frames_for_runs_not_dispatched_to_this_device_are_unknown_run(
    gateway: Harness,
) -> None:
    """Another device's run (same user or another user), an unknown id and a malformed id
    all get the same unknown_run answer; nothing is stored and the owner carries on."""
    owner = await gateway.device("user-1", "device-1", [AGENT])
    sibling = await gateway.device("user-1", "device-2", [AGENT])
    stranger = await gateway.device("user-2", "device-1", [AGENT])
    run_id = await start_run(gateway, owner)
    for intruder in (sibling, stranger):
        for rid in (run_id, str(uuid.uuid4()), "not-a-run"):
            await intruder.send({"type": "agent_data", "run_id": rid, "data": {"evil": 1}})
            await expect_error(intruder, "unknown_run", "agent_data")
            await intruder.send({"type": "agent_complete", "run_id": rid, "status": "error"})
            await expect_error(intruder, "unknown_run", "agent_complete")
    row = await run_row(gateway.svc.pool, run_id)
    assert (row["status"], row["event_count"], row["errors"]) == ("running", 0, []), row
    assert await stored_events(gateway.svc.pool, run_id) == []

    await owner.send({"type": "agent_data", "run_id": run_id, "data": "mine"})
    await owner.send({"type": "agent_complete", "run_id": run_id})
    await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] == "completed")
    assert await stored_events(gateway.svc.pool, run_id) == [(1, "mine")]
    # Finished or not, someone else's run reads the same: no probing by error code.
    await sibling.send({"type": "agent_data", "run_id": run_id, "data": 1})
    await expect_error(sibling, "unknown_run", "agent_data")


async def test_agent_data_without_data_is_a_bad_frame(gateway: Harness) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    await device.send({"type": "agent_data", "run_id": run_id})
    await expect_error(device, "bad_frame", "agent_data")
    # Shape before ownership: the same for a run that is not this device's.
    await device.send({"type": "agent_data", "run_id": str(uuid.uuid4())})
    await expect_error(device, "bad_frame", "agent_data")
    await device.send({"type": "agent_data", "data": 1})
    await expect_error(device, "bad_frame", "agent_data")
    await device.send({"type": "agent_data", "run_id": run_id, "data": 1, "seq": "one"})
    await expect_error(device, "bad_frame", "agent_data")
    assert await stored_events(gateway.svc.pool, run_id) == []


async def test_agent_data_null_is_stored_as_an_event(gateway: Harness) -> None:
    """`data` is required but any JSON, null included."""
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    await device.send({"type": "agent_data", "run_id": run_id, "data": None})
    await device.send({"type": "agent_complete", "run_id": run_id})
    await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] == "completed")
    assert await stored_events(gateway.svc.pool, run_id) == [(1, None)]


async def test_agent_data_with_nul_escape_is_refused_and_nothing_stored(
    gateway: Harness,
) -> None:
    device = await gateway.device("user-1", "device-1", [AGENT])
    run_id = await start_run(gateway, device)
    # The raw JSON text, with the escape as a device's JSON encoder writes it.
    for data_json in ('{"text": "a\\u0000b"}', '["ok", {"k\\u0000": 1}]', '"\\u0000"'):
        await device.send(raw_agent_data(run_id, data_json))
        await expect_error(device, "bad_frame", "agent_data")
    # A refused event takes no number: the next good one (an escaped backslash, not a
    # NUL) is seq 1.
    await device.send(raw_agent_data(run_id, '"fine \\\\u0000"'))
    await device.send({"type": "agent_complete", "run_id": run_id})
    row = await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] == "completed")
    assert row["event_count"] == 1, row
    assert await stored_events(gateway.svc.pool, run_id) == [(1, "fine \\u0000")]


# ---------------------------------------------------------------- devices going away


async def test_disconnect_fails_only_the_runs_of_the_device_that_went(
    make_gateway: MakeGateway,
) -> None:
    """GATEWAY_RUN_RESUME_S=0 (revision .4): the runs of the device that went fail at once."""
    gateway = await make_gateway(run_resume_s=0)
    leaving = await gateway.device("user-1", "device-1", [AGENT])
    staying = await gateway.device("user-1", "device-2", [AGENT])
    lost = await start_run(gateway, leaving)
    kept = await start_run(gateway, staying)
    await leaving.send({"type": "agent_data", "run_id": lost, "data": "before"})
    await leaving.close()

    # §1.7: within 1 s of the disconnect.
    row = await poll_row(gateway.svc.pool, lost, lambda r: r["status"] != "running",
                         timeout=1.0)
    assert row["status"] == "error", row
    assert "device disconnected" in row["errors"], row
    assert row["finished_at"] is not None, row
    assert await stored_events(gateway.svc.pool, lost) == [(1, "before")]

    row = await run_row(gateway.svc.pool, kept)
    assert (row["status"], row["errors"]) == ("running", []), row
    await staying.send({"type": "agent_data", "run_id": kept, "data": {"n": 1}})
    await staying.send({"type": "agent_complete", "run_id": kept, "result": "ok"})
    row = await poll_row(gateway.svc.pool, kept, lambda r: r["status"] != "running")
    assert (row["status"], row["result"], row["event_count"]) == ("completed", "ok", 1), row


async def test_restart_marks_its_own_orphaned_running_runs_as_error(
    make_gateway: MakeGateway, database_url: str,
) -> None:
    """GATEWAY_RUN_RESUME_S=0 (revision .4): a running row of this instance (left by its
    previous life) is error "gateway restarted" once the gateway is up; another
    instance's running row is untouched."""
    mine, theirs, waiting = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO agent_run_logs (id, user_id, agent_id, device_id, status,"
            " gateway_instance, started_at) VALUES ($1, 'user-1', $2, 'device-1', $3, $4, now())",
            [(mine, AGENT, "running", "test-instance"),
             (theirs, AGENT, "running", "other-instance"),
             (waiting, AGENT, "pending", "test-instance")])
    finally:
        await conn.close()

    gateway = await make_gateway(run_resume_s=0)
    row = await run_row(gateway.svc.pool, str(mine))
    assert row["status"] == "error", row
    assert row["errors"] == ["gateway restarted"], row
    assert row["finished_at"] is not None, row
    row = await run_row(gateway.svc.pool, str(theirs))
    assert (row["status"], row["errors"], row["finished_at"]) == ("running", [], None), row
    row = await run_row(gateway.svc.pool, str(waiting))
    assert row["status"] == "pending", row
