"""``gateway.device.expiry``: tokens expire at their second, never before, one
timer per second however many connections share it; a connection that leaves
(refreshed, closed) leaves no timer behind.

The 4001 close on a real socket is in test_device_ws
(``test_token_expiry_closes_4001``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import attrs

from gateway.device.expiry import Expiries


@attrs.define(eq=False)
class Device:
    expired_at: float | None = None
    fails: bool = False

    def token_expired(self) -> None:
        self.expired_at = time.time()
        if self.fails:
            raise RuntimeError("its close failed")


async def wait_until(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_connections_expiring_in_one_second_share_one_timer_and_never_expire_early(
) -> None:
    expiries = Expiries()
    exp = time.time() + 0.3
    devices = [Device() for _ in range(100)]
    for device in devices:
        expiries.add(device, exp)
    assert (len(expiries), expiries.timers) == (100, 1)
    await wait_until(lambda: all(d.expired_at is not None for d in devices))
    for device in devices:
        assert device.expired_at is not None
        assert exp <= device.expired_at <= exp + 1.5, (exp, device.expired_at)
    assert (len(expiries), expiries.timers) == (0, 0)


async def test_a_connection_removed_is_not_expired_and_an_emptied_second_keeps_no_timer(
) -> None:
    expiries = Expiries()
    exp = time.time() + 0.2
    stays, leaves, alone = Device(), Device(), Device()
    expiries.add(stays, exp)
    expiries.add(leaves, exp)
    later = time.time() + 3600
    expiries.add(alone, later)
    assert expiries.timers == 2
    expiries.remove(alone, later)
    assert (len(expiries), expiries.timers) == (2, 1)
    expiries.remove(leaves, exp)
    expiries.remove(leaves, exp)  # twice (refreshed, then closing): harmless
    await wait_until(lambda: stays.expired_at is not None)
    await asyncio.sleep(0.1)
    assert leaves.expired_at is None
    assert alone.expired_at is None
    assert (len(expiries), expiries.timers) == (0, 0)


async def test_an_exp_already_past_expires_at_once() -> None:
    expiries = Expiries()
    device = Device()
    expiries.add(device, time.time() - 10)
    await wait_until(lambda: device.expired_at is not None, within_s=1.0)


async def test_one_connection_failing_to_close_does_not_keep_the_others_open() -> None:
    expiries = Expiries()
    exp = time.time() + 0.1
    devices = [Device(fails=i == 0) for i in range(5)]
    for device in devices:
        expiries.add(device, exp)
    await wait_until(lambda: all(d.expired_at is not None for d in devices))
    assert (len(expiries), expiries.timers) == (0, 0)
