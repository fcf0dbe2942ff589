"""The heartbeat's promise: a peer that stops answering pings is gone within 1.5 x heartbeat.

The elapsed time checked here is the contract's correctness bound (a silent
peer must be gone by then), not a performance figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest
from harness import WS_PATH, Harness, mint

from gateway.device.endpoint import AIOHTTP_CEIL_THRESHOLD_S, aiohttp_heartbeat

MakeGateway = Callable[..., Awaitable[Harness]]


def aiohttp_bound(h: float) -> float:
    """When aiohttp drops a silent peer given ``h`` (web_ws.py: ping, then pong timeout)."""
    return 1.5 * h + (h > AIOHTTP_CEIL_THRESHOLD_S) + (h / 2 > AIOHTTP_CEIL_THRESHOLD_S)


@pytest.mark.parametrize("heartbeat_s", [0.05, 0.5, 2, 3.4, 5, 5.5, 6, 7, 10, 10.5, 11, 12,
                                         15, 30, 60, 600])
def test_aiohttp_heartbeat_keeps_the_promise_with_rounding(heartbeat_s: float) -> None:
    h = aiohttp_heartbeat(heartbeat_s)
    assert 0 < h < heartbeat_s
    assert aiohttp_bound(h) <= 1.5 * heartbeat_s * 0.9 + 1e-9
    # Not needlessly eager either: at least half the configured interval.
    assert h >= heartbeat_s / 2


async def test_a_peer_that_stops_answering_pings_is_gone_within_one_and_a_half_heartbeats(
    make_gateway: MakeGateway,
) -> None:
    heartbeat_s = 2.0
    gw = await make_gateway(heartbeat_s=heartbeat_s)
    ws = await gw.public.ws_connect(WS_PATH, params={"token": mint("user-1")},
                                    autoping=False, heartbeat=None)
    try:
        silent_from = time.monotonic()  # its last frame: the hello
        await ws.send_str(orjson.dumps({"type": "device_hello", "device_id": "d1"}).decode())
        pings = 0
        while True:
            msg = await ws.receive(timeout=10 * heartbeat_s)
            if msg.type is aiohttp.WSMsgType.PING:
                pings += 1  # never answered
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                              aiohttp.WSMsgType.ERROR):
                break
        await gw.wait_for(lambda: len(gw.svc.registry) == 0, timeout=10 * heartbeat_s)
        gone_after = time.monotonic() - silent_from
    finally:
        await ws.close()
    assert pings >= 1
    assert gone_after <= 1.5 * heartbeat_s, gone_after


async def test_a_peer_that_answers_pings_stays(make_gateway: MakeGateway) -> None:
    heartbeat_s = 0.5
    gw = await make_gateway(heartbeat_s=heartbeat_s)
    # aiohttp's client answers each ping while it reads; it sends nothing else.
    ws = await gw.public.ws_connect(WS_PATH, params={"token": mint("user-1")},
                                    autoping=True, heartbeat=None)
    try:
        await ws.send_str(orjson.dumps({"type": "device_hello", "device_id": "d1"}).decode())
        # ~6 of aiohttp's pings (h = 0.45 s). One deadline for the whole read:
        # receive(timeout=) restarts its timeout at every ping it answers.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(6 * heartbeat_s):
                while True:
                    msg = await ws.receive()
                    assert msg.type is aiohttp.WSMsgType.TEXT, msg
        assert not ws.closed
        assert len(gw.svc.registry) == 1
    finally:
        await ws.close()
