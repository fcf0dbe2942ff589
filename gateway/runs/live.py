"""Live fan-out of stored events to HTTP readers of a run's stream.

Each reader holds a bounded buffer. A reader that falls behind is never
waited for (a slow reader never slows a device): its buffer is dropped and it
is told to catch up from the database, which holds every event it missed.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Callable, Sequence

import attrs
from aiohttp import web

from gateway.store import StoredEvent

# Bytes of event JSON one reader may have waiting, besides the event count: a
# reader of large events re-reads the database (in pages bounded by bytes too).
SUBSCRIBER_MAX_BYTES = 8 * 1024 * 1024


@attrs.define(eq=False)
class Subscription:
    run_id: uuid.UUID
    capacity: int
    capacity_bytes: int = SUBSCRIBER_MAX_BYTES
    _events: collections.deque[StoredEvent] = attrs.Factory(collections.deque)
    _bytes: int = 0
    overflowed: bool = False
    ended: bool = False
    _signal: asyncio.Event = attrs.Factory(asyncio.Event)

    def push(self, events: Sequence[StoredEvent]) -> None:
        if self.overflowed:
            return
        size = self._bytes + sum(len(event.data) for event in events)
        if len(self._events) + len(events) > self.capacity or size > self.capacity_bytes:
            # Past its bound the reader re-reads the database instead.
            self._events.clear()
            self._bytes = 0
            self.overflowed = True
        else:
            self._events.extend(events)
            self._bytes = size
        self._signal.set()

    def end(self) -> None:
        self.ended = True
        self._signal.set()

    def nudge(self) -> None:
        """Wake the reader with no events: it reads the database (stored elsewhere)."""
        self._signal.set()

    async def wait(self, within_s: float) -> None:
        """Wait for news (events, overflow, end), at most ``within_s``."""
        try:
            async with asyncio.timeout(within_s):
                await self._signal.wait()
        except TimeoutError:
            pass

    def take(self) -> tuple[list[StoredEvent], bool]:
        """Buffered events and whether some were lost to overflow; resets both."""
        events = list(self._events)
        overflowed = self.overflowed
        self._events.clear()
        self._bytes = 0
        self.overflowed = False
        self._signal.clear()
        if self.ended:
            self._signal.set()
        return events, overflowed


@attrs.define
class LiveEvents:
    capacity: int = 1000
    # Told of every run that ends here (its readers on other processes are told too).
    on_end: Callable[[uuid.UUID], None] | None = None
    _subscriptions: dict[uuid.UUID, set[Subscription]] = attrs.Factory(dict)

    def subscribe(self, run_id: uuid.UUID) -> Subscription:
        subscription = Subscription(run_id, self.capacity)
        self._subscriptions.setdefault(run_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subs = self._subscriptions.get(subscription.run_id)
        if subs is not None:
            subs.discard(subscription)
            if not subs:
                del self._subscriptions[subscription.run_id]

    def wanted(self, run_id: uuid.UUID) -> bool:
        return run_id in self._subscriptions

    def publish(self, run_id: uuid.UUID, events: Sequence[StoredEvent]) -> None:
        for subscription in self._subscriptions.get(run_id, ()):
            subscription.push(events)

    def end(self, run_id: uuid.UUID) -> None:
        for subscription in self._subscriptions.get(run_id, ()):
            subscription.end()
        if self.on_end is not None:
            self.on_end(run_id)

    def nudge(self, run_id: uuid.UUID) -> None:
        """Events of the run were stored elsewhere: its readers re-read the table now."""
        for subscription in self._subscriptions.get(run_id, ()):
            subscription.nudge()

    def nudge_all(self) -> None:
        """We may have missed news (the listener was deaf): every reader re-reads."""
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription.nudge()

    def end_all(self) -> None:
        """Wake every reader (the gateway is draining)."""
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription.end()

    @property
    def reader_count(self) -> int:
        return sum(len(subs) for subs in self._subscriptions.values())


LIVE = web.AppKey("live_events", LiveEvents)
