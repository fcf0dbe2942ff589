"""The legacy application heartbeat: ``{"type": "ping"}`` to every device each interval.

Not a liveness check (aiohttp's WebSocket heartbeat is): old Electron builds
simply expect the frame. One task for all devices, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.device.connection import ConnectionGone
from gateway.device.registry import Registry
from gateway.wire import messages

# Let other work in between large fan-outs.
YIELD_EVERY = 500


async def app_ping_loop(registry: Registry, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        for index, conn in enumerate(registry, start=1):
            if conn.closing:
                continue
            with contextlib.suppress(ConnectionGone):
                # Never waits: a device that does not read holds up no one.
                conn.send(messages.PING, at_once=True)
            if index % YIELD_EVERY == 0:
                await asyncio.sleep(0)
