"""Session continuity (PROTOCOL.md §1.8): runs outlive a dropped connection, and the races.

A device streaming a run loses its connection, comes back within
GATEWAY_RUN_RESUME_S and goes on; a replacement takes the runs straight over;
what does not come back expires. With event_acks, every event is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from harness import Device, Harness
from run_helpers import AGENT, poll_row, run_row, start_run, stored_events

MakeGateway = Callable[..., Awaitable[Harness]]
ACKS = ["event_acks"]


def attached(device: Device) -> list[dict[str, Any]]:
    assert device.hello_ack is not None
    runs: list[dict[str, Any]] = device.hello_ack["runs"]
    return runs


async def send_events(device: Device, run_id: str, values: range, *,
                      seq: bool = False) -> list[int]:
    """Send ``values`` as agent_data; returns the acks seen before they were all accepted."""
    for n in values:
        frame: dict[str, Any] = {"type": "agent_data", "run_id": run_id, "data": {"n": n}}
        if seq:
            frame["seq"] = n
        await device.send(frame)
    # Frames are handled in order: the pong proves every one was accepted.
    await device.send({"type": "ping"})
    acks = []
    while (frame := await device.recv()) != {"type": "pong"}:
        assert frame["type"] in ("agent_ack", "ping"), frame
        if frame["type"] == "agent_ack":
            assert frame["run_id"] == run_id, frame
            acks.append(frame["seq"])
    return acks


async def acks_until(device: Device, run_id: str, seq: int, seen: list[int]) -> list[int]:
    """Read agent_ack frames for ``run_id`` until one covers ``seq``; every ack seen."""
    seen = list(seen)
    while not seen or seen[-1] < seq:
        frame = await device.recv_type("agent_ack")
        assert frame["run_id"] == run_id, frame
        seen.append(frame["seq"])
    return seen


async def detached_row(gateway: Harness, run_id: str) -> dict[str, Any]:
    return await poll_row(gateway.svc.pool, run_id, lambda r: r["detached_at"] is not None)


# ---------------------------------------------------------------- detach and resume


async def test_a_dropped_device_resumes_its_run_and_finishes_it(gateway: Harness) -> None:
    """TCP lost mid-run (no close frame): the run stays running, detached "device
    disconnected"; the device's next hello lists it with last_seq, sends no second
    agent_run, and the events go on without a gap to a completed run."""
    device = await gateway.device("user-1", "laptop", [AGENT])
    run_id = await start_run(gateway, device)
    await send_events(device, run_id, range(1, 4))
    device.drop()

    row = await detached_row(gateway, run_id)
    assert (row["status"], row["detach_reason"]) == ("running", "device disconnected"), row
    status, record = await gateway.api("GET", f"/runs/{run_id}")
    assert status == 200 and record["detached_at"] is not None, record

    again = await gateway.device("user-1", "laptop", [AGENT])
    assert attached(again) == [{"run_id": run_id, "agent_id": AGENT, "last_seq": 3}]
    row = await run_row(gateway.svc.pool, run_id)
    assert (row["detached_at"], row["detach_reason"]) == (None, None), row
    await send_events(again, run_id, range(4, 6))
    await again.send({"type": "agent_complete", "run_id": run_id, "result": "done"})
    row = await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] != "running")
    assert (row["status"], row["event_count"]) == ("completed", 5), row
    assert await stored_events(gateway.svc.pool, run_id) == [(n, {"n": n}) for n in range(1, 6)]
    await again.expect_silence()  # no agent_run again


async def test_a_replacement_takes_the_runs_over_without_detaching_them(
    gateway: Harness,
) -> None:
    """A second connection of the same device (the old one not yet gone): the old closes
    4000, the new hello_ack lists the run, and it never was detached."""
    old = await gateway.device("user-1", "laptop", [AGENT])
    run_id = await start_run(gateway, old)
    await send_events(old, run_id, range(1, 3))
    new = await gateway.device("user-1", "laptop", [AGENT])
    assert attached(new) == [{"run_id": run_id, "agent_id": AGENT, "last_seq": 2}]
    assert await old.expect_close() == 4000
    await gateway.wait_for(lambda: gateway.svc.sockets == 1)  # the old cleanup ran
    row = await run_row(gateway.svc.pool, run_id)
    assert (row["status"], row["detached_at"]) == ("running", None), row
    await new.send({"type": "agent_data", "run_id": run_id, "data": {"n": 3}})
    await new.send({"type": "agent_complete", "run_id": run_id})
    row = await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] != "running")
    assert (row["status"], row["event_count"]) == ("completed", 3), row


async def test_the_old_connections_cleanup_after_the_new_hello_never_detaches_the_run(
    gateway: Harness,
) -> None:
    """Drop and hello again at once, many times: whether the old connection's cleanup
    runs before or after the new hello, the new hello always gets the run, and the run
    ends attached and complete."""
    device = await gateway.device("user-1", "laptop", [AGENT])
    run_id = await start_run(gateway, device)
    for n in range(1, 21):
        await send_events(device, run_id, range(n, n + 1))
        device.drop()
        device = await gateway.device("user-1", "laptop", [AGENT])
        assert [r["run_id"] for r in attached(device)] == [run_id], (n, device.hello_ack)
        assert attached(device)[0]["last_seq"] == n
    await gateway.wait_for(lambda: gateway.svc.sockets == 1)
    row = await run_row(gateway.svc.pool, run_id)
    assert (row["status"], row["detached_at"]) == ("running", None), row
    await device.send({"type": "agent_complete", "run_id": run_id})
    row = await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] != "running")
    assert (row["status"], row["event_count"]) == ("completed", 20), row


async def test_two_hellos_at_once_resume_the_run_once(gateway: Harness) -> None:
    """Two connections of a detached device say hello together: the run is resumed once,
    and the connection left standing (the later one) holds it."""
    device = await gateway.device("user-1", "laptop", [AGENT])
    run_id = await start_run(gateway, device)
    device.drop()
    await detached_row(gateway, run_id)

    first, second = await asyncio.gather(
        gateway.device("user-1", "laptop", [AGENT]), gateway.device("user-1", "laptop", [AGENT]))
    listed = [d for d in (first, second) if attached(d)]
    assert listed, (first.hello_ack, second.hello_ack)
    resumed = gateway.svc.metrics.registry.get_sample_value(
        "gateway_runs_resumed_total", {"how": "hello"})
    assert resumed == 1.0
    # Whichever was registered last replaced the other and holds the run now.
    closes = await asyncio.gather(first.expect_close(timeout=1.0),
                                  second.expect_silence(0.3), return_exceptions=True)
    survivor = second if closes[0] == 4000 else first
    await survivor.send({"type": "agent_complete", "run_id": run_id})
    row = await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] != "running")
    assert row["status"] == "completed", row


async def test_a_detached_run_can_be_cancelled_and_is_not_resumed(gateway: Harness) -> None:
    """Cancelled while its device is away: 200 cancelled, and the device's next hello
    gets neither the run nor an agent_cancel for it."""
    device = await gateway.device("user-1", "laptop", [AGENT])
    run_id = await start_run(gateway, device)
    device.drop()
    await detached_row(gateway, run_id)
    status, record = await gateway.api("POST", f"/runs/{run_id}/cancel")
    assert status == 200 and record["status"] == "cancelled", record
    again = await gateway.device("user-1", "laptop", [AGENT])
    assert attached(again) == []
    await again.expect_silence()
    await again.send({"type": "agent_data", "run_id": run_id, "data": 1})
    frame = await again.recv_type("error")
    assert frame["code"] == "run_finished", frame


async def test_a_detached_run_keeps_its_event_stream_open(gateway: Harness) -> None:
    """A reader following a run sees the events from before and after the blip, and the
    end, in one stream."""
    device = await gateway.device("user-1", "laptop", [AGENT])
    run_id = await start_run(gateway, device)
    async with gateway.internal.get(
            f"/internal/v1/runs/{run_id}/events",
            headers={"Authorization": f"Bearer {gateway.settings.internal_tokens[0]}"}) as stream:
        assert stream.status == 200
        await send_events(device, run_id, range(1, 3))
        device.drop()
        await detached_row(gateway, run_id)
        again = await gateway.device("user-1", "laptop", [AGENT])
        await send_events(again, run_id, range(3, 5))
        await again.send({"type": "agent_complete", "run_id": run_id})
        async with asyncio.timeout(5):
            body = await stream.read()
    seqs = [orjson.loads(line)["seq"] for line in body.splitlines()]
    assert seqs == [1, 2, 3, 4], body


# ---------------------------------------------------------------- the window


async def test_a_device_that_never_returns_leaves_the_run_error_after_the_window(
    make_gateway: MakeGateway,
) -> None:
    """Not resumed within GATEWAY_RUN_RESUME_S: error with its detach reason, within 1 s
    of the window's end, and the device's late hello does not get it back."""
    gateway = await make_gateway(run_resume_s=1.0)
    device = await gateway.device("user-1", "laptop", [AGENT])
    run_id = await start_run(gateway, device)
    device.drop()
    row = await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] != "running",
                         timeout=5.0)
    assert row["status"] == "error", row
    assert row["errors"] == ["device disconnected"], row
    late_s = (row["finished_at"] - row["detached_at"]).total_seconds()
    assert 1.0 <= late_s <= 2.0, late_s
    again = await gateway.device("user-1", "laptop", [AGENT])
    assert attached(again) == []


async def test_the_window_ending_while_a_hello_waits_resumes_or_expires_never_both(
    make_gateway: MakeGateway, database_url: str,
) -> None:
    """The run's row is locked (another transaction) while the hello wants it and the
    window runs out: when the lock goes, either the hello resumed it (running, listed) or
    the expiry ended it (error, not listed) — never a run listed and failed."""
    gateway = await make_gateway(run_resume_s=1.0)
    device = await gateway.device("user-1", "laptop", [AGENT])
    run_id = await start_run(gateway, device)
    device.drop()
    await detached_row(gateway, run_id)
    blocker = await asyncpg.connect(database_url)
    try:
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("SELECT 1 FROM agent_run_logs WHERE id = $1 FOR UPDATE",
                              uuid.UUID(run_id))
        hello = asyncio.create_task(gateway.device("user-1", "laptop", [AGENT]))
        await asyncio.sleep(1.5)  # past the window, the hello and the expiry both waiting
        assert not hello.done()
        await lock.rollback()
    finally:
        await blocker.close()
    again = await hello
    await asyncio.sleep(0.8)  # an expiry pass after the hello
    row = await run_row(gateway.svc.pool, run_id)
    if attached(again):
        assert (row["status"], row["detached_at"]) == ("running", None), row
    else:
        assert row["status"] == "error", row


async def test_resume_zero_fails_runs_at_once_and_lists_none(make_gateway: MakeGateway) -> None:
    """GATEWAY_RUN_RESUME_S=0 is revision .4: a drop fails the run at once; a replacement
    fails the replaced connection's runs; hello_ack.runs is always empty."""
    gateway = await make_gateway(run_resume_s=0)
    device = await gateway.device("user-1", "laptop", [AGENT])
    dropped = await start_run(gateway, device)
    device.drop()
    row = await poll_row(gateway.svc.pool, dropped, lambda r: r["status"] != "running",
                         timeout=1.0)
    assert (row["status"], row["errors"], row["detached_at"]) == (
        "error", ["device disconnected"], None), row
    old = await gateway.device("user-1", "laptop", [AGENT])
    replaced = await start_run(gateway, old)
    new = await gateway.device("user-1", "laptop", [AGENT])
    assert attached(new) == []
    row = await poll_row(gateway.svc.pool, replaced, lambda r: r["status"] != "running")
    assert row["status"] == "error", row


async def test_a_drained_run_is_resumed_by_the_next_gateway_life(
    make_gateway: MakeGateway, database_url: str,
) -> None:
    """Drain (1001) detaches "gateway shutdown"; the restarted gateway (same instance id)
    keeps it detached, and the device's hello there resumes it."""
    first = await make_gateway()
    device = await first.device("user-1", "laptop", [AGENT])
    run_id = await start_run(first, device)
    await send_events(device, run_id, range(1, 3))
    first.svc.draining = True
    for conn in list(first.svc.registry):
        conn.request_close(1001, "gateway shutting down")
    assert await device.expect_close() == 1001
    row = await poll_row(first.svc.pool, run_id, lambda r: r["detached_at"] is not None)
    assert row["detach_reason"] == "gateway shutdown", row

    second = await make_gateway()
    row = await run_row(second.svc.pool, run_id)
    assert (row["status"], row["detach_reason"]) == ("running", "gateway shutdown"), row
    again = await second.device("user-1", "laptop", [AGENT])
    assert attached(again) == [{"run_id": run_id, "agent_id": AGENT, "last_seq": 2}]
    await again.send({"type": "agent_complete", "run_id": run_id})
    row = await poll_row(second.svc.pool, run_id, lambda r: r["status"] != "running")
    assert (row["status"], row["event_count"]) == ("completed", 2), row


# ---------------------------------------------------------------- event_acks


async def test_acks_are_cumulative_and_follow_storage(gateway: Harness) -> None:
    """Under event_acks every agent_data carries seq; acks name stored events only, never
    go down, and one ack may cover many events."""
    device = await gateway.device("user-1", "laptop", [AGENT], capabilities=ACKS)
    run_id = await start_run(gateway, device)
    seen = await acks_until(device, run_id, 200,
                            await send_events(device, run_id, range(1, 201), seq=True))
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen
    assert len(seen) < 200  # cumulative, one per committed batch
    assert await stored_events(gateway.svc.pool, run_id) == [
        (n, {"n": n}) for n in range(1, 201)]


async def test_a_resent_event_is_acked_not_stored_again(gateway: Harness) -> None:
    """After a reconnect the device resends from its last ack: seqs at or below the
    highest accepted are duplicates (acked, not stored); the rest go on."""
    device = await gateway.device("user-1", "laptop", [AGENT], capabilities=ACKS)
    run_id = await start_run(gateway, device)
    await acks_until(device, run_id, 5,
                     await send_events(device, run_id, range(1, 6), seq=True))
    device.drop()
    again = await gateway.device("user-1", "laptop", [AGENT], capabilities=ACKS)
    assert attached(again)[0]["last_seq"] == 5
    # 3-5 again, then 6-8
    await acks_until(again, run_id, 8, await send_events(again, run_id, range(3, 9), seq=True))
    assert await stored_events(gateway.svc.pool, run_id) == [(n, {"n": n}) for n in range(1, 9)]
    duplicates = gateway.svc.metrics.registry.get_sample_value(
        "gateway_events_duplicate_total")
    assert duplicates == 3.0


async def test_a_gap_in_seq_is_a_bad_frame_naming_the_expected_seq(gateway: Harness) -> None:
    device = await gateway.device("user-1", "laptop", [AGENT], capabilities=ACKS)
    run_id = await start_run(gateway, device)
    await acks_until(device, run_id, 2,
                     await send_events(device, run_id, range(1, 3), seq=True))
    await device.send({"type": "agent_data", "run_id": run_id, "data": {}, "seq": 5})
    frame = await device.recv_type("error")
    assert frame["code"] == "bad_frame" and "expected 3" in frame["message"], frame
    await device.send({"type": "agent_data", "run_id": run_id, "data": {}})
    frame = await device.recv_type("error")
    assert frame["code"] == "bad_frame" and "seq" in frame["message"], frame
    assert [seq for seq, _ in await stored_events(gateway.svc.pool, run_id)] == [1, 2]


async def test_without_the_capability_there_are_no_acks_and_seq_is_ignored(
    gateway: Harness,
) -> None:
    device = await gateway.device("user-1", "laptop", [AGENT])
    run_id = await start_run(gateway, device)
    for seq in (7, 7, 1):
        await device.send({"type": "agent_data", "run_id": run_id, "data": seq, "seq": seq})
    await device.send({"type": "agent_complete", "run_id": run_id})
    row = await poll_row(gateway.svc.pool, run_id, lambda r: r["status"] != "running")
    assert row["event_count"] == 3, row
    await device.expect_silence()


@pytest.mark.parametrize("capabilities", [
    "event_acks", ["x" * 65], [1], ["a"] * 33,
])
async def test_bad_capabilities_refuse_the_hello(gateway: Harness, capabilities: Any) -> None:
    ws = await gateway.connect()
    await ws.send_json({"type": "device_hello", "device_id": "d", "capabilities": capabilities})
    async with asyncio.timeout(5):
        msg = await ws.receive()
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1008), msg


# ---------------------------------------------------------------- the per-device turn


async def test_a_devices_turn_is_taken_one_at_a_time_and_dropped_when_free(
    gateway: Harness,
) -> None:
    """Holders of one device's turn run one after another, another device's turn is
    independent, and nothing is left behind, a waiter cancelled in line included."""
    continuity = gateway.svc.runs.continuity
    order: list[str] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def hold(name: str, device: str) -> None:
        async with continuity.turn("turn-user", device):
            order.append(f"{name} in")
            first_in.set()
            await release.wait()
            order.append(f"{name} out")

    first = asyncio.ensure_future(hold("a", "d1"))
    await first_in.wait()
    second = asyncio.ensure_future(hold("b", "d1"))
    cancelled = asyncio.ensure_future(hold("c", "d1"))
    other = asyncio.ensure_future(hold("x", "d2"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["a in", "x in"]  # d2 does not wait for d1
    cancelled.cancel()
    release.set()
    await asyncio.gather(first, second, other)
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    assert order.index("a out") < order.index("b in")
    assert "c in" not in order
    assert continuity._turns == {}
