"""The batched, back-pressured writer of agent_run_events.

One supervised task (``run``) drains a bounded buffer into PostgreSQL with
one multi-row ``INSERT … FROM unnest(…)`` per batch. When the buffer is full,
``put`` waits, and since the device's receive loop awaits ``put``, that
device's socket stops being read: memory
stays bounded and no event is ever dropped (PROTOCOL.md §3.4). Only after a
batch is committed are its events handed to live readers, so a reader that
subscribes and then reads the database can never miss one.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import uuid
from collections.abc import Callable, Mapping

import asyncpg
import attrs
import structlog
from aiohttp import web

from gateway.metrics import Metrics
from gateway.runs.live import LiveEvents
from gateway.store import Store, StoredEvent

log = structlog.get_logger(__name__)

EventRecord = tuple[uuid.UUID, int, str, dt.datetime]

# Events put before the putting task yields to the event loop. A device's task
# does not suspend while its socket has frames buffered, so it would put a whole
# read (hundreds of events) in one step, and the writer's database round trip
# would wait for every streaming device's step to end (benchmarks/RESULTS.md).
PUTS_PER_TURN = 16
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0


@attrs.define(eq=False)
class EventWriter:
    store: Store
    metrics: Metrics
    live: LiveEvents
    queue_max: int = 20_000
    # Bytes of event JSON buffered at most (one larger event is let in alone):
    # 60 events of 3.5 MiB were 363 MiB under the count bound alone.
    queue_max_bytes: int = 64 * 1024 * 1024
    batch_max: int = 2000
    # Told, after each commit, the highest seq stored per run in the batch
    # (acks under event_acks); must not wait for anything.
    on_commit: Callable[[Mapping[uuid.UUID, int]], None] | None = None
    _buffer: collections.deque[EventRecord] = attrs.Factory(collections.deque)
    _enqueued: int = 0  # events ever put
    _committed: int = 0  # events ever stored
    _has_work: asyncio.Event = attrs.Factory(asyncio.Event)
    _has_room: asyncio.Event = attrs.Factory(asyncio.Event)
    _flush_waiters: list[tuple[int, asyncio.Future[None]]] = attrs.Factory(list)
    _stopping: bool = False
    _stopped: asyncio.Event = attrs.Factory(asyncio.Event)
    # The size of each buffered event, oldest first, and their sum. ``run`` only
    # counts commits (``_committed``); ``_buffered_bytes`` lets the committed ones go.
    _sizes: collections.deque[int] = attrs.Factory(collections.deque)
    _sizes_total: int = 0
    _sizes_released: int = 0

    def __attrs_post_init__(self) -> None:
        self._has_room.set()

    @property
    def depth(self) -> int:
        return len(self._buffer)

    def _buffered_bytes(self) -> int:
        while self._sizes_released < self._committed and self._sizes:
            self._sizes_total -= self._sizes.popleft()
            self._sizes_released += 1
        return self._sizes_total

    async def put(self, run_id: uuid.UUID, seq: int, data_json: str) -> None:
        """Queue one event; waits while the buffer is full (back-pressure)."""
        size = len(data_json)
        while len(self._buffer) >= self.queue_max or (
                self._buffer and self._buffered_bytes() + size > self.queue_max_bytes):
            self._has_room.clear()
            await self._has_room.wait()
        self._buffered_bytes()
        self._sizes.append(size)
        self._sizes_total += size
        self._buffer.append((run_id, seq, data_json, dt.datetime.now(dt.UTC)))
        self._enqueued += 1
        self._has_work.set()
        if self._enqueued % PUTS_PER_TURN == 0:
            await asyncio.sleep(0)  # the writer's turn, see PUTS_PER_TURN

    async def flush(self) -> None:
        """Return once every event put before this call is committed."""
        target = self._enqueued
        if self._committed >= target:
            return
        if self._stopped.is_set():
            raise RuntimeError("event writer is not running")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, future))
        self._has_work.set()
        await future

    async def stop(self, within_s: float) -> None:
        """Let ``run`` write what is buffered (within ``within_s``) and return.

        The task itself belongs to the supervisor, which cancels it afterwards
        if it is still there (then the loss is logged here, by run).
        """
        self._stopping = True
        self._has_work.set()
        try:
            async with asyncio.timeout(within_s):
                await self._stopped.wait()
        except TimeoutError:
            # What is lost, by run, for whoever reconciles with the devices' own logs.
            lost = collections.Counter(str(run_id) for run_id, _seq, _data, _at in self._buffer)
            log.error("event_writer_stop_timeout", unwritten=len(self._buffer),
                      runs=dict(lost.most_common(100)))
            self._stopped.set()
            self._release_flush_waiters(failed=True)

    async def run(self) -> None:
        """The writer loop, run under the supervisor (restarted with its buffer intact)."""
        while True:
            if not self._buffer:
                if self._stopping:
                    self._stopped.set()
                    return
                self._has_work.clear()
                await self._has_work.wait()
                continue
            count = min(len(self._buffer), self.batch_max)
            batch = [self._buffer[i] for i in range(count)]
            last_seq = await self._write_with_retry(batch)
            for _ in range(count):
                self._buffer.popleft()
            self._committed += count
            self._has_room.set()
            self.metrics.events_stored.inc(count)
            self.metrics.event_batch_size.observe(count)
            self.metrics.event_queue_depth.set(len(self._buffer))
            self._release_flush_waiters()
            self._publish(batch)
            if self.on_commit is not None:
                self.on_commit(last_seq)

    async def _write_with_retry(self, batch: list[EventRecord]) -> dict[uuid.UUID, int]:
        last_seq: dict[uuid.UUID, int] = {}
        for run_id, seq, _data, _at in batch:
            if seq > last_seq.get(run_id, 0):
                last_seq[run_id] = seq
        delay = RETRY_FIRST_S
        while True:
            try:
                await self.store.write_events(batch, last_seq)
                return last_seq
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                # Never drop: keep the batch, back off, try again. Devices stay
                # paused meanwhile because the buffer stays full.
                self.metrics.db_errors.labels("write_events").inc()
                log.error("event_write_failed", error=repr(exc), batch=len(batch),
                          retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def _release_flush_waiters(self, *, failed: bool = False) -> None:
        if not self._flush_waiters:
            return
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, future in self._flush_waiters:
            if failed:
                if not future.done():
                    future.set_exception(RuntimeError("event writer is not running"))
            elif self._committed >= target:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((target, future))
        self._flush_waiters = still

    def _publish(self, batch: list[EventRecord]) -> None:
        by_run: dict[uuid.UUID, list[StoredEvent]] = {}
        wanted = self.live.wanted
        for run_id, seq, data, received_at in batch:
            if wanted(run_id):
                by_run.setdefault(run_id, []).append(StoredEvent(seq, data, received_at))
        for run_id, events in by_run.items():
            self.live.publish(run_id, events)


EVENT_WRITER = web.AppKey("event_writer", EventWriter)
