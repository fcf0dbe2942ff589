"""The batched, back-pressured writer of agent_run_events.

One supervised task (``run``) drains a bounded buffer into PostgreSQL with
one binary ``COPY`` per batch (``Store.write_events``). When the buffer is full,
``put`` waits, and since the device's receive loop awaits ``put``, that
device's socket stops being read: memory
stays bounded and no event is ever dropped (PROTOCOL.md §3.4). Only after a
batch is committed are its events handed to live readers, so a reader that
subscribes and then reads the database can never miss one.

A failed write is classified (``_classify``): a broken connection, a server
restarting, a timeout are *transient* and the same batch is tried again, for
as long as it takes (devices stay paused; after ``stall_after_s`` without a
commit the writer reports itself stalled and /readyz turns 503). Rows the
database refuses for good (their run was deleted, data it cannot store) are
*permanent*: the batch is split until only those rows are left, the others
are stored, and the refused ones are dropped with an error log line naming
run and seqs; ``on_lost`` then ends those runs. Anything else is a bug: it
propagates to the supervisor, which logs it and restarts the loop with the
buffer intact.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
import attrs
import structlog
from aiohttp import web

from gateway.metrics import Metrics
from gateway.runs.live import LiveEvents
from gateway.store import EventRow, Store, StoredEvent, received_at

log = structlog.get_logger(__name__)

# Events put before the putting task yields to the event loop. A device's task
# does not suspend while its socket has frames buffered, so it would put a whole
# read (hundreds of events) in one step, and the writer's database round trip
# would wait for every streaming device's step to end (benchmarks/RESULTS.md).
PUTS_PER_TURN = 16
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
# Events waiting and no commit for this long: the writer is stalled (/readyz 503).
STALL_AFTER_S = 10.0
# Seqs named in one event_rows_dropped log line, at most.
LOGGED_SEQS_MAX = 50

# The rows themselves can never be stored, however often they are tried: a
# foreign key (their run was deleted), a check or unique constraint, a value
# the column type refuses (PostgreSQL class 22), a limit (class 54), or a
# value asyncpg cannot encode.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.DataError,
    asyncpg.ProgramLimitExceededError,
    asyncpg_base.DataError,
)
# Every database failure; any but the permanent ones is transient: the same batch
# may succeed later. The connection broke (mid-statement asyncpg raises
# InternalClientError, neither of the other two), the server restarts, fails
# over or refuses connections for now, the network, a statement timeout.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


class PermanentWriteError(Exception):
    """A batch failed with a permanent error (its ``__cause__``)."""


@attrs.define(eq=False)
class EventWriter:
    store: Store
    metrics: Metrics
    live: LiveEvents
    queue_max: int = 20_000
    # Bytes of event JSON buffered at most (one larger event is let in alone):
    # 60 events of 3.5 MiB were 363 MiB under the count bound alone.
    queue_max_bytes: int = 64 * 1024 * 1024
    batch_max: int = 10_000
    # Bytes of event JSON in one batch at most (one larger event goes alone): the
    # batch is encoded into one COPY buffer of about that size besides the buffer.
    batch_max_bytes: int = 4 * 1024 * 1024
    # Told, after each commit, the highest seq stored per run in the batch
    # (acks under event_acks); must not wait for anything.
    on_commit: Callable[[Mapping[uuid.UUID, int]], None] | None = None
    # Told, after a batch, the seqs per run the database refused for good; ends
    # those runs. Awaited by the writer loop: a failure of its own is its to log.
    on_lost: Callable[[Mapping[uuid.UUID, list[int]]], Awaitable[None]] | None = None
    stall_after_s: float = STALL_AFTER_S
    _buffer: collections.deque[EventRow] = attrs.Factory(collections.deque)
    _enqueued: int = 0  # events ever put
    _committed: int = 0  # events ever stored
    _has_work: asyncio.Event = attrs.Factory(asyncio.Event)
    _has_room: asyncio.Event = attrs.Factory(asyncio.Event)
    _flush_waiters: list[tuple[int, asyncio.Future[None]]] = attrs.Factory(list)
    _stopping: bool = False
    _stopped: asyncio.Event = attrs.Factory(asyncio.Event)
    # Bytes of event JSON in the buffer: ``put`` adds, ``run`` subtracts a batch once stored.
    _bytes: int = 0
    # time.monotonic() when the batch being written was first tried; None when idle.
    _writing_since: float | None = None

    def __attrs_post_init__(self) -> None:
        self._has_room.set()

    @property
    def depth(self) -> int:
        return len(self._buffer)

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def stalled(self) -> bool:
        """A batch has waited longer than ``stall_after_s`` for its commit (Tasks asks)."""
        since = self._writing_since
        return since is not None and time.monotonic() - since > self.stall_after_s

    async def put(self, run_id: uuid.UUID, seq: int, data_json: bytes) -> None:
        """Queue one event (its JSON in UTF-8); waits while the buffer is full (back-pressure)."""
        waiting = self.put_now(run_id, seq, data_json)
        if waiting is not None:
            await waiting

    def put_now(self, run_id: uuid.UUID, seq: int, data_json: bytes) -> Awaitable[None] | None:
        """``put`` without a coroutine of its own: None once the event is queued, else
        what the caller must await before its next event (for the event to be queued
        once the buffer has room, or the writer's turn, see PUTS_PER_TURN).

        A device's receive loop calls this once per agent_data frame, and a
        coroutine per event was a measurable share of the ingest path.
        """
        if len(self._buffer) >= self.queue_max or (
                self._buffer and self._bytes + len(data_json) > self.queue_max_bytes):
            return self._put_when_room(run_id, seq, data_json)
        self._append(run_id, seq, data_json)
        if self._enqueued % PUTS_PER_TURN == 0:
            return asyncio.sleep(0)  # the writer's turn, see PUTS_PER_TURN
        return None

    async def _put_when_room(self, run_id: uuid.UUID, seq: int, data_json: bytes) -> None:
        size = len(data_json)
        try:
            while len(self._buffer) >= self.queue_max or (
                    self._buffer and self._bytes + size > self.queue_max_bytes):
                self._has_room.clear()
                await self._has_room.wait()
        finally:
            # Queued even when the waiting device's task is cancelled (its socket
            # went): the event was numbered, and the run, handed over to the
            # device's next connection, numbers the next one after it, so dropping
            # it would leave a gap (under event_acks the device would not resend
            # it: its seq counts as received). One event per waiting device past
            # the bound at most.
            self._append(run_id, seq, data_json)

    def _append(self, run_id: uuid.UUID, seq: int, data_json: bytes) -> None:
        self._bytes += len(data_json)
        self._buffer.append((run_id, seq, data_json, time.time_ns() // 1000))
        self._enqueued += 1
        self._has_work.set()

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
            batch, size, last_seqs = self._next_batch()
            count = len(batch)
            if self._writing_since is None:
                self._writing_since = time.monotonic()
            lost = await self._write_isolating(batch, last_seqs)
            self._writing_since = None
            for _ in range(count):
                self._buffer.popleft()
            self._committed += count  # lost rows too: nobody may wait for them
            self._bytes -= size
            self._has_room.set()
            stored = batch
            if lost:
                gone = {(run_id, seq) for run_id, seq, _data, _at in lost}
                stored = [e for e in batch if (e[0], e[1]) not in gone]
                last_seqs = _last_seqs(stored)
            self.metrics.events_stored.inc(len(stored))
            self.metrics.event_batch_size.observe(count)
            self.metrics.event_queue_depth.set(len(self._buffer))
            self._release_flush_waiters()
            self._publish(stored, last_seqs)
            if self.on_commit is not None and stored:
                self.on_commit(last_seqs)
            if lost:
                await self._report_lost(lost)

    def _next_batch(self) -> tuple[list[EventRow], int, dict[uuid.UUID, int]]:
        """The oldest events, up to ``batch_max`` and ``batch_max_bytes``; their bytes
        and the highest seq per run."""
        buffer = self._buffer
        if len(buffer) <= self.batch_max and self._bytes <= self.batch_max_bytes:
            # All of it, the usual case: no pass in Python to size the batch.
            batch = list(buffer)
            return batch, self._bytes, _last_seqs(batch)
        size = 0
        count = 0
        limit = self.batch_max_bytes
        for _run_id, _seq, data, _at in itertools.islice(buffer, self.batch_max):
            if count and size + len(data) > limit:
                break
            size += len(data)
            count += 1
        batch = list(itertools.islice(buffer, count))
        return batch, size, _last_seqs(batch)

    async def _write_isolating(self, batch: list[EventRow],
                               last_seqs: dict[uuid.UUID, int] | None = None
                               ) -> list[EventRow]:
        """Store ``batch``, or every row of it the database can take; return the others.

        Transient errors are retried (``_write_with_retry``). On a permanent one
        the batch is written run by run; a run whose rows break a foreign key
        is gone (every row of it would), otherwise its rows are halved until
        the refused ones stand alone. Order within a run is kept.
        """
        try:
            await self._write_with_retry(batch, last_seqs or _last_seqs(batch))
            return []
        except PermanentWriteError as failure:
            exc = failure.__cause__
        by_run: dict[uuid.UUID, list[EventRow]] = {}
        for event in batch:
            by_run.setdefault(event[0], []).append(event)
        if len(by_run) > 1:
            lost: list[EventRow] = []
            for rows in by_run.values():
                lost += await self._write_isolating(rows)
            return lost
        if len(batch) == 1 or isinstance(exc, asyncpg.ForeignKeyViolationError):
            self._log_lost(batch, exc)
            return batch
        half = len(batch) // 2
        return (await self._write_isolating(batch[:half])
                + await self._write_isolating(batch[half:]))

    def _log_lost(self, rows: list[EventRow], exc: BaseException | None) -> None:
        self.metrics.events_dropped.inc(len(rows))
        self.metrics.db_errors.labels("write_events_refused").inc()
        seqs = [seq for _run, seq, _data, _at in rows]
        log.error("event_rows_dropped", run_id=str(rows[0][0]), count=len(seqs),
                  seqs=seqs[:LOGGED_SEQS_MAX], error=repr(exc))

    async def _report_lost(self, lost: list[EventRow]) -> None:
        by_run: dict[uuid.UUID, list[int]] = {}
        for run_id, seq, _data, _at in lost:
            by_run.setdefault(run_id, []).append(seq)
        if self.on_lost is not None:
            await self.on_lost(by_run)

    async def _write_with_retry(self, batch: list[EventRow],
                                last_seq: dict[uuid.UUID, int]) -> None:
        """Write ``batch`` in one statement, retrying transient errors until it is stored.

        Raises PermanentWriteError when the rows can never be stored; anything
        unclassified propagates (a bug: the supervisor logs and restarts).
        """
        delay = RETRY_FIRST_S
        retried = False
        while True:
            try:
                await self.store.write_events(batch, last_seq)
                return
            except asyncpg.UniqueViolationError as exc:
                if retried:
                    # The connection broke after the commit, before its answer:
                    # the statement is atomic, so the whole batch is stored.
                    log.warning("event_batch_already_stored", batch=len(batch), error=repr(exc))
                    return
                raise PermanentWriteError(repr(exc)) from exc
            except PERMANENT_ERRORS as exc:
                raise PermanentWriteError(repr(exc)) from exc
            except DATABASE_ERRORS as exc:
                retried = True
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

    def _publish(self, batch: list[EventRow], runs: Iterable[uuid.UUID]) -> None:
        """Hand ``batch`` to the live readers of its ``runs`` (usually none: no pass)."""
        wanted = {run_id for run_id in runs if self.live.wanted(run_id)}
        if not wanted:
            return
        by_run: dict[uuid.UUID, list[StoredEvent]] = {}
        for run_id, seq, data, unix_us in batch:
            if run_id in wanted:
                by_run.setdefault(run_id, []).append(
                    StoredEvent(seq, data.decode(), received_at(unix_us)))
        for run_id, events in by_run.items():
            self.live.publish(run_id, events)


def _last_seqs(batch: list[EventRow]) -> dict[uuid.UUID, int]:
    """The highest seq per run in ``batch`` (the runs' new event_count).

    A run's events are put in seq order (its one device's receive loop waits
    for each ``put``), so its last row in the batch has its highest seq.
    """
    return {run_id: seq for run_id, seq, _data, _at in batch}


EVENT_WRITER = web.AppKey("event_writer", EventWriter)
