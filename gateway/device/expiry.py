"""When device tokens expire: one schedule per process, one timer per second that has any.

A timer per connection (asyncio's ``TimerHandle`` with its bound callback and
its copy of the context) was ~270 B of every idle device's memory, for a
deadline hours away that most connections leave before; with 18,500 devices
it was also 18,500 more entries in the loop's timer heap, which every timer
of the heartbeat sifts through. Here a connection is one entry in the set of
the whole second its token expires in (rounded up), and each such second has
one timer: a device is closed at most a second after its exp (plus leeway),
never before.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Protocol

import attrs
import structlog

log = structlog.get_logger(__name__)


class Expiring(Protocol):
    """A connection whose token expires (hashable by identity)."""

    def token_expired(self) -> None:
        """Its token's exp (plus leeway) passed: close it."""


@attrs.define(eq=False)
class Expiries:
    _due: dict[int, set[Expiring]] = attrs.Factory(dict)  # unix second → who expires in it
    _timers: dict[int, asyncio.TimerHandle] = attrs.Factory(dict)

    def add(self, conn: Expiring, expires_at: float) -> None:
        """``conn`` expires at ``expires_at`` (unix time, leeway included)."""
        second = math.ceil(expires_at)
        due = self._due.get(second)
        if due is None:
            due = self._due[second] = set()
            loop = asyncio.get_running_loop()
            delay = max(0.0, second - time.time())
            self._timers[second] = loop.call_at(loop.time() + delay, self._expire, second)
        due.add(conn)

    def remove(self, conn: Expiring, expires_at: float) -> None:
        """``conn`` no longer expires at ``expires_at`` (refreshed, or closing)."""
        second = math.ceil(expires_at)
        due = self._due.get(second)
        if due is None:
            return
        due.discard(conn)
        if not due:
            del self._due[second]
            self._timers.pop(second).cancel()

    def __len__(self) -> int:
        """Connections waiting for their expiry."""
        return sum(map(len, self._due.values()))

    @property
    def timers(self) -> int:
        return len(self._timers)

    def _expire(self, second: int) -> None:
        self._timers.pop(second, None)
        for conn in self._due.pop(second, ()):
            try:
                conn.token_expired()
            except Exception:  # one connection's failure does not keep the others open
                log.exception("device_expiry_failed")
