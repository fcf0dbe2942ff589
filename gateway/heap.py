"""The cyclic garbage collector's policy: full collections at most every few seconds.

CPython runs a full collection (generation 2: every tracked object walked)
whenever the objects promoted since the last one exceed a quarter of all
long-lived objects. A process gaining thousands of connections, a few hundred
long-lived objects each, crosses that quarter again and again: a reconnect
storm of 10,000 devices made 18 full collections, 4.7 s of a 7.9 s storm,
each a pause of a quarter second for every device and call on the process
(``python -m benchmarks.run storm 10000``).

Full collections cannot simply be made rare, though: the cycles of
connections and calls that lived a few seconds (aiohttp's objects form
cycles) are only freed by them, and with rare full collections a 3-minute
churn soak grew from 67 to 118 MB instead of 77 (``python -m
benchmarks.soak``). So CPython's own rule still decides *whether*; this
policy only holds the next full collection back until ``min_interval_s``
after the last one. A storm then pays one or two, and churn is still
collected every few seconds. What start-up built is frozen (it is never
garbage, and the collector need not walk it).

A full collection that frees (almost) nothing doubles that wait, up to
``max_interval_s``; one that frees something brings it back. CPython's rule
counts objects *promoted*, not objects still alive: a fleet of idle devices
promotes thousands of heartbeat timers a second (each lives ~25 s, then is
freed by its reference count), so the rule asked for a full collection every
~20 s at 18,500 devices, and each walked 1.5 M objects for 0.6-0.8 s and
freed none (``python -m benchmarks.run fleet 18500``).

What such a full collection walked is all alive, and stays so while the
devices idle; it is frozen (``gc.freeze``), so the next ones walk only what
came after: 0.11 s instead of 0.56 s at 18,500 devices. A frozen object
that later becomes part of a cycle of garbage (a device that leaves) is freed
only once thawed (``gc.unfreeze``), so the heap thaws as soon as any
collection finds garbage again (churn), and at the latest ``frozen_max_s``
after freezing; the next full collection then walks, and frees, everything.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import attrs

# Between two automatic full collections.
FULL_COLLECTION_MIN_INTERVAL_S = 10.0
# ... and at most this, after full collections that freed nothing.
FULL_COLLECTION_MAX_INTERVAL_S = 80.0
# A full collection that freed fewer objects than this was fruitless (a closed
# connection alone leaves a cycle of ~50).
FRUITLESS_BELOW = 1000
# What a fruitless full collection found alive is frozen at most this long: the
# bound on how long a frozen cycle of garbage waits when no collection finds
# any other garbage meanwhile (a fleet that idles while a few devices leave).
FROZEN_MAX_S = 300.0
# How often the hold is looked at (so the interval is kept within this).
RELEASE_CHECK_S = 1.0
# Generation 2's threshold while held: CPython considers a full collection after
# this many generation-1 collections, i.e. not before the hold is released.
HELD = 1 << 30


@attrs.define(eq=False)
class HeapPolicy:
    min_interval_s: float = FULL_COLLECTION_MIN_INTERVAL_S
    max_interval_s: float = FULL_COLLECTION_MAX_INTERVAL_S
    fruitless_below: int = FRUITLESS_BELOW
    frozen_max_s: float = FROZEN_MAX_S
    full_collections: int = 0  # automatic or not, since install (tests, logs)
    freezes: int = 0  # fruitless full collections' heaps frozen, since install
    thaws: int = 0
    # The hold after the last full collection: min_interval_s, doubled per fruitless one.
    interval_s: float = attrs.field(init=False)
    _old_threshold: int | None = None  # generation 2's own while held, else None
    _last_full: float = 0.0  # monotonic time of the last full collection's end
    _frozen_at: float | None = None  # monotonic time of our freeze, while frozen

    def __attrs_post_init__(self) -> None:
        self.interval_s = self.min_interval_s

    @property
    def held(self) -> bool:
        return self._old_threshold is not None

    def install(self) -> None:
        """Once the process is built, before it takes traffic."""
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
        self._release()
        self._thaw()

    @property
    def frozen(self) -> bool:
        """A fruitless full collection's heap is frozen now."""
        return self._frozen_at is not None

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Inside the collector, anywhere in the program: only numbers and the
        # collector's own lists change here (gc.freeze and gc.unfreeze move whole
        # lists and allocate nothing; no event-loop call: the loop itself may be
        # mid-update).
        if phase != "stop":
            return
        fruitful = info["collected"] >= self.fruitless_below
        if fruitful:
            self._thaw()  # garbage again: what is frozen may be leaving too
        if info["generation"] != 2:
            return
        self.full_collections += 1
        self._last_full = time.monotonic()
        if fruitful:
            self.interval_s = self.min_interval_s
        else:
            self.interval_s = min(2 * self.interval_s, self.max_interval_s)
            # All it walked is alive (and the young generations are empty): the
            # next full collections need not walk it again.
            gc.freeze()
            if self._frozen_at is None:
                self._frozen_at = self._last_full
                self.freezes += 1
        if self._old_threshold is None:
            young, middle, old = gc.get_threshold()
            self._old_threshold = old
            gc.set_threshold(young, middle, HELD)

    def _release(self) -> None:
        if self._old_threshold is not None:
            young, middle, _ = gc.get_threshold()
            gc.set_threshold(young, middle, self._old_threshold)
            self._old_threshold = None

    def _thaw(self) -> None:
        if self._frozen_at is not None:
            gc.unfreeze()
            self._frozen_at = None
            self.thaws += 1

    def release_due(self) -> None:
        """Let CPython's rule decide again once the interval has passed; thaw what
        was frozen ``frozen_max_s`` ago."""
        now = time.monotonic()
        if self.held and now - self._last_full >= self.interval_s:
            self._release()
        if self._frozen_at is not None and now - self._frozen_at >= self.frozen_max_s:
            self._thaw()

    async def release_loop(self) -> None:
        while True:
            await asyncio.sleep(RELEASE_CHECK_S)
            self.release_due()
