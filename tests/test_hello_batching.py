"""Hellos that arrive together share their database work (issue 14, reconnect storm).

Claiming pending runs (§3.3) and resuming detached ones (§1.8) is one query per
batch of hellos (``gateway/runs/coalesce.py``). Whatever the batching, every
device gets exactly its own runs, a run is never given twice, and a run created
or detached while the hellos are in flight is still found.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence

import pytest
from harness import Device, Harness

from gateway.runs.coalesce import Coalescer

AGENT = "agent-1"
MakeGateway = Callable[..., Awaitable[Harness]]


# ---------------------------------------------------------------- the helper itself


async def test_one_tick_of_submits_is_one_batch_in_order() -> None:
    seen: list[list[int]] = []

    async def double(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        return [2 * i for i in items]

    coalescer: Coalescer[int, int] = Coalescer(double)
    assert await asyncio.gather(*(coalescer.submit(i) for i in range(10))) == [
        2 * i for i in range(10)]
    assert seen == [list(range(10))]
    assert await coalescer.submit(7) == 14  # a later one: a batch of its own
    assert seen[-1] == [7] and coalescer.batches == 2


async def test_submits_while_the_slots_are_busy_join_the_next_batch() -> None:
    release = asyncio.Event()
    seen: list[list[int]] = []

    async def slow(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        await release.wait()
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(slow, slots=1)
    first = asyncio.ensure_future(coalescer.submit(0))
    await asyncio.sleep(0.01)  # batch [0] is in flight
    later = [asyncio.ensure_future(coalescer.submit(i)) for i in range(1, 6)]
    for _ in range(5):
        await asyncio.sleep(0)
    release.set()
    assert await first == 0 and await asyncio.gather(*later) == [1, 2, 3, 4, 5]
    assert seen == [[0], [1, 2, 3, 4, 5]]


async def test_a_failed_batch_fails_each_caller_and_the_next_batch_runs() -> None:
    calls = 0

    async def flaky(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("database went away")
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(flaky)
    results = await asyncio.gather(*(coalescer.submit(i) for i in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results), results
    assert await coalescer.submit(5) == 5


async def test_a_batch_giving_the_wrong_count_fails_instead_of_misassigning() -> None:
    async def short(items: Sequence[int]) -> list[int]:
        return list(items)[:-1]

    coalescer: Coalescer[int, int] = Coalescer(short)
    results = await asyncio.gather(coalescer.submit(1), coalescer.submit(2),
                                   return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results), results


async def test_a_cancelled_caller_still_waits_for_its_batch() -> None:
    """What the batch does for a caller (tracking its runs) is done before it unwinds."""
    release = asyncio.Event()
    done: list[int] = []

    async def work(items: Sequence[int]) -> list[int]:
        await release.wait()
        done.extend(items)
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(work)
    caller = asyncio.ensure_future(coalescer.submit(1))
    await asyncio.sleep(0.01)
    caller.cancel()
    await asyncio.sleep(0.01)
    assert not caller.done()  # still waiting for the batch, not unwound
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert done == [1]


# ---------------------------------------------------------------- through the gateway


async def _hello(gateway: Harness, user_id: str, device_id: str,
                 agent_ids: list[str] | None = None) -> Device:
    return await gateway.device(user_id, device_id, agent_ids)


async def _runs_sent(device: Device, count: int) -> list[str]:
    return [(await device.recv_type("agent_run"))["run_id"] for _ in range(count)]


async def test_a_storm_of_hellos_claims_every_pending_run_once_in_few_batches(
    gateway: Harness,
) -> None:
    """40 devices (two per user) say hello at once: each gets its own pending runs,
    the runs for "any device" of a user go to exactly one of them, in few queries."""
    users = [f"u{i}" for i in range(20)]
    mine: dict[str, list[str]] = {}
    anyone: dict[str, str] = {}
    for user in users:
        for d in ("a", "b"):
            status, body = await gateway.api("POST", "/runs", {
                "user_id": user, "agent_id": AGENT, "device_id": f"{user}-{d}"})
            assert status == 201 and body["status"] == "pending", body
            mine[f"{user}-{d}"] = [body["run_id"]]
        status, body = await gateway.api("POST", "/runs", {"user_id": user, "agent_id": AGENT})
        assert status == 201, body
        anyone[user] = body["run_id"]
    claims = gateway.svc.runs._claims
    before = claims.batches

    devices = await asyncio.gather(*(_hello(gateway, user, f"{user}-{d}", [AGENT])
                                     for user in users for d in ("a", "b")))
    assert claims.batches - before < len(devices) // 2, claims.batches - before

    by_id = {device.device_id: device for device in devices}
    for user in users:
        extra = []
        for d in ("a", "b"):
            device = by_id[f"{user}-{d}"]
            # Its own run first (claimed oldest first), then perhaps the user's.
            assert await _runs_sent(device, 1) == mine[device.device_id]
            try:
                async with asyncio.timeout(0.3):
                    extra.append((await device.recv_type("agent_run"))["run_id"])
            except TimeoutError:
                pass
        assert extra == [anyone[user]], (user, extra)  # exactly one of the two got it
    rows = await gateway.svc.pool.fetch(
        "SELECT status, count(*) AS n FROM agent_run_logs GROUP BY status")
    assert {r["status"]: r["n"] for r in rows} == {"running": 60}


async def test_runs_created_while_their_devices_say_hello_are_dispatched_once(
    gateway: Harness,
) -> None:
    """The race between POST /runs and a hello: whichever side gets the run, it is
    dispatched exactly once (the claim's UPDATE and the dispatch's UPDATE both
    require status 'pending', so the second finds nothing)."""
    n = 30
    connecting = [asyncio.ensure_future(_hello(gateway, f"r{i}", f"r{i}-d", [AGENT]))
                  for i in range(n)]
    created = await asyncio.gather(*(gateway.api("POST", "/runs", {
        "user_id": f"r{i}", "agent_id": AGENT, "device_id": f"r{i}-d"}) for i in range(n)))
    devices = await asyncio.gather(*connecting)
    for i, ((status, body), device) in enumerate(zip(created, devices, strict=True)):
        assert status == 201, body
        assert await _runs_sent(device, 1) == [body["run_id"]], i
        await device.expect_silence(0.05)  # never a second agent_run
    rows = await gateway.svc.pool.fetch("SELECT status, device_id FROM agent_run_logs")
    assert sorted((r["status"], r["device_id"]) for r in rows) == sorted(
        ("running", f"r{i}-d") for i in range(n))


async def test_a_storm_of_reconnects_resumes_each_devices_own_runs(gateway: Harness) -> None:
    """30 devices with a running run each drop and come back at once: each hello_ack
    lists exactly its own run, and its events carry on from where they were."""
    n = 30
    devices = await asyncio.gather(*(_hello(gateway, f"s{i}", f"s{i}-d", [AGENT])
                                     for i in range(n)))
    run_ids = []
    for device in devices:
        status, body = await gateway.api("POST", "/runs", {
            "user_id": device.user_id, "agent_id": AGENT, "device_id": device.device_id})
        assert status == 201 and body["status"] == "running", body
        assert await _runs_sent(device, 1) == [body["run_id"]]
        await device.send({"type": "agent_data", "run_id": body["run_id"], "data": 1})
        run_ids.append(body["run_id"])
    await asyncio.gather(*(device.close() for device in devices))
    pool = gateway.svc.pool

    async def all_detached() -> bool:
        return await pool.fetchval(
            "SELECT count(*) FROM agent_run_logs WHERE detached_at IS NOT NULL") == n

    for _ in range(250):
        if await all_detached():
            break
        await asyncio.sleep(0.02)
    assert await all_detached()
    resumes = gateway.svc.runs.continuity._resumes
    before = resumes.batches

    back = await asyncio.gather(*(_hello(gateway, f"s{i}", f"s{i}-d", [AGENT])
                                  for i in range(n)))
    assert resumes.batches - before < n // 2, resumes.batches - before
    for device, run_id in zip(back, run_ids, strict=True):
        assert device.hello_ack is not None
        assert [(r["run_id"], r["last_seq"]) for r in device.hello_ack["runs"]] == [
            (run_id, 1)], device.hello_ack
        await device.send({"type": "agent_data", "run_id": run_id, "data": 2})
        await device.send({"type": "agent_complete", "run_id": run_id})
    for run_id in run_ids:
        for _ in range(250):
            row = await pool.fetchrow(
                "SELECT status, event_count FROM agent_run_logs WHERE id = $1",
                uuid.UUID(run_id))
            if row is not None and row["status"] != "running":
                break
            await asyncio.sleep(0.02)
        assert row is not None and (row["status"], row["event_count"]) == ("completed", 2), row


async def test_a_storm_of_hellos_shares_its_presence_statements(gateway: Harness) -> None:
    """40 hellos at once (PROTOCOL.md §5): the limit look and the presence write are
    a few statements, and every device's row holds its own connection; then the
    same for their cleanups."""
    presence = gateway.svc.presence
    looks, ups = presence._looks.batches, presence._ups.batches
    devices = await asyncio.gather(*(_hello(gateway, f"p{i // 2}", f"p{i}-d")
                                     for i in range(40)))
    assert presence._looks.batches - looks < 20, presence._looks.batches - looks
    assert presence._ups.batches - ups < 20, presence._ups.batches - ups
    rows = await gateway.svc.pool.fetch(
        "SELECT user_id, device_id, connection_id FROM device_presence")
    assert sorted((r["user_id"], r["device_id"], r["connection_id"]) for r in rows) == sorted(
        (d.user_id, d.device_id, d.hello_ack["connection_id"]) for d in devices
        if d.hello_ack is not None)
    assert all(d.hello_ack is not None for d in devices)

    # And a mass disconnect: every row goes, in few statements.
    downs = presence._downs.batches
    await asyncio.gather(*(d.close() for d in devices))
    for _ in range(250):
        if not await gateway.svc.pool.fetchval("SELECT count(*) FROM device_presence"):
            break
        await asyncio.sleep(0.02)
    assert await gateway.svc.pool.fetchval("SELECT count(*) FROM device_presence") == 0
    assert presence._downs.batches - downs < 20, presence._downs.batches - downs

