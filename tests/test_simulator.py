"""The device simulator (gateway/dev/simulator.py) against a real gateway: it resumes its
runs after the gateway closes its connection, waits for acks at its bound, and stops for
good when another connection of its device replaces it. Its command line refuses bad
values. (tests/e2e/test_continuity.py runs it as a process across kill -9 and a drain.)"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import orjson
import pytest
from harness import WS_PATH, Harness, mint

from gateway.cli import main
from gateway.dev.simulator import RECONNECT_BASE_S, SimulatorOptions, backoff_s, run_simulator
from gateway.wire.codes import CloseCode

MakeGateway = Callable[..., Awaitable[Harness]]


def options(gw: Harness, device_id: str, **overrides: object) -> SimulatorOptions:
    url = str(gw.public.make_url(WS_PATH)).replace("http://", "ws://")
    values: dict[str, object] = {"url": url, "token": mint("user-1"), "device_id": device_id,
                                 "verbose": False, "reconnect_max_s": 0.2}
    values.update(overrides)
    return SimulatorOptions(**values)  # type: ignore[arg-type]


async def wait_connected(gw: Harness, device_id: str) -> None:
    await gw.wait_for(lambda: gw.svc.registry.get("user-1", device_id) is not None)


@pytest.mark.parametrize("event_acks", [True, False])
async def test_a_run_goes_on_after_the_gateway_drops_the_connection(
    make_gateway: MakeGateway, database_url: str, event_acks: bool
) -> None:
    """The gateway closes the simulator's connection (1011) mid-run, twice; the simulator
    reconnects, resends what was not confirmed and completes: each event stored once, in
    order. With event_acks it keeps at most 5 events unacked, so its agent waits (without,
    a bound that small would forget events: there it is the default)."""
    gw = await make_gateway()
    bound = {"max_unacked": 5} if event_acks else {}
    task = asyncio.create_task(run_simulator(
        options(gw, "sim", event_acks=event_acks, **bound), rng=random.Random(1)))
    try:
        await wait_connected(gw, "sim")
        status, run = await gw.api("POST", "/runs", {
            "user_id": "user-1", "agent_id": "stream", "input": {"events": 60, "delay_s": 0.01}})
        assert status == 201, run
        run_id = uuid.UUID(run["run_id"])
        conn = await asyncpg.connect(database_url)
        try:
            for stored in (15, 35):
                async with asyncio.timeout(20):
                    while True:  # polling the database: nothing to wait on in-process
                        count = await conn.fetchval(
                            "SELECT event_count FROM agent_run_logs WHERE id = $1", run_id)
                        if count >= stored:
                            break
                        await asyncio.sleep(0.01)
                device = gw.svc.registry.get("user-1", "sim")
                assert device is not None
                device.request_close(CloseCode.INTERNAL_ERROR, "test")
            async with asyncio.timeout(20):
                while True:
                    row = await conn.fetchrow("SELECT status, event_count FROM agent_run_logs "
                                              "WHERE id = $1", run_id)
                    if row["status"] != "running":
                        break
                    await asyncio.sleep(0.01)
            events = await conn.fetch("SELECT seq, data::text AS data FROM agent_run_events "
                                      "WHERE run_id = $1 ORDER BY seq", run_id)
        finally:
            await conn.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert (row["status"], row["event_count"]) == ("completed", 60)
    assert [(e["seq"], orjson.loads(e["data"])["i"]) for e in events] == [
        (i, i) for i in range(1, 61)]
    # Resumed by its hello, or handed over when the hello came before the old one's cleanup.
    resumed = gw.svc.metrics.runs_resumed
    assert resumed.labels("hello")._value.get() + resumed.labels("replacement")._value.get() == 2


async def test_replaced_stops_the_simulator_for_good(make_gateway: MakeGateway) -> None:
    """4000: another connection of the same device took over; reconnecting would replace it
    back, so the simulator exits (0) and the newer connection stays."""
    gw = await make_gateway()
    task = asyncio.create_task(run_simulator(options(gw, "twin")))
    await wait_connected(gw, "twin")
    newer = await gw.device("user-1", "twin")
    async with asyncio.timeout(10):
        assert await task == 0
    registered = gw.svc.registry.get("user-1", "twin")
    assert registered is not None
    await newer.send({"type": "ping"})
    assert (await newer.recv_type("pong"))["type"] == "pong"
    assert registered is gw.svc.registry.get("user-1", "twin")


async def test_a_refused_token_stops_the_simulator(make_gateway: MakeGateway) -> None:
    """401 at the handshake: reconnecting with the same token cannot help."""
    gw = await make_gateway()
    async with asyncio.timeout(10):
        assert await run_simulator(options(gw, "bad", token="not-a-jwt")) == 1


def test_backoff_is_full_jitter_below_a_doubling_cap() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        bound = min(3.0, RECONNECT_BASE_S * 2 ** attempt)
        samples = [backoff_s(attempt, 3.0, rng) for _ in range(200)]
        assert all(0 <= s <= bound for s in samples)
        assert max(samples) > 0.8 * bound  # spread over the whole range, not a fixed delay
    assert backoff_s(10_000, 3.0, rng) <= 3.0


@pytest.mark.parametrize("flag", [
    ["--reconnect-max-s", "0"], ["--reconnect-max-s", "nan"], ["--reconnect-max-s", "x"],
    ["--max-unacked", "0"], ["--max-unacked", "1.5"]])
def test_bad_simulator_options_are_refused(flag: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["device", "--device-id", "d", "--token", "t", *flag])
    assert exited.value.code == 2
    assert flag[0] in capsys.readouterr().err


@pytest.mark.parametrize("minted", [True, False])
async def test_token_expiry_mints_a_new_token_only_when_the_simulator_minted_its_own(
    make_gateway: MakeGateway, minted: bool
) -> None:
    """4001: a simulator that minted its token mints a new one and is back; one given a
    token cannot get another, so it stops (1) instead of being refused forever."""
    gw = await make_gateway(jwt_leeway_s=0)
    fresh: list[str] = []

    def mint_token() -> str:
        fresh.append(mint("user-1"))
        return fresh[-1]

    task = asyncio.create_task(run_simulator(options(
        gw, "expiring", token=mint("user-1", ttl_s=1),
        mint_token=mint_token if minted else None)))
    try:
        await wait_connected(gw, "expiring")
        first = gw.svc.registry.get("user-1", "expiring")
        if minted:
            def replaced_by_a_new_connection() -> bool:
                current = gw.svc.registry.get("user-1", "expiring")
                return current is not None and current is not first
            await gw.wait_for(replaced_by_a_new_connection, timeout=10)
            assert first is not None and first.close_code == CloseCode.TOKEN_EXPIRED
            assert len(fresh) == 1 and not task.done()
        else:
            async with asyncio.timeout(10):
                assert await task == 1
            assert gw.svc.registry.get("user-1", "expiring") is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
