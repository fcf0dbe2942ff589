"""PostgreSQL LISTEN/NOTIFY between gateway processes, on one connection kept alive.

Three channels ride on the one LISTEN connection:

- ``gateway_run_cancelled``: a run was cancelled through another process; the
  one whose device feeds it sends ``agent_cancel`` (``Runs.cancelled_elsewhere``);
- ``gateway_run_events``: a batch of a run's events was committed elsewhere
  (``"<instance> <run id> <last seq>"``, one per run per batch); readers of
  that run here re-read the table at once instead of polling;
- ``gateway_devices``: a device moved (JSON): the process holding its earlier
  connection closes it with 4000 (PROTOCOL.md §5).

asyncpg gives no signal when the server or the network silently drops a
LISTEN connection, so the loop sends ``SELECT 1`` on it every
``PROBE_EVERY_S`` and gives it ``PROBE_TIMEOUT_S`` to answer; otherwise the
connection is dropped and made again, and ``on_reconnect`` runs: readers
re-read what they may have missed from the table, tracked runs are checked for
cancels that went unheard.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import attrs
import orjson
import structlog

from gateway.metrics import Metrics
from gateway.store import DEVICES_CHANNEL, EVENTS_CHANNEL, RUN_CANCELLED_CHANNEL, ClusterStore

log = structlog.get_logger(__name__)

QUEUE_MAX = 10_000
PROBE_EVERY_S = 2.0
PROBE_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 5.0
LISTENER_CLOSE_S = 1.0
RETRY_S = 1.0
# Commits are announced at most this long after they happen; what commits in
# the meantime goes out in the same statement.
ANNOUNCE_QUEUE_MAX = 100_000

Handler = Callable[[str], Awaitable[None]]


@attrs.define(eq=False)
class Notifications:
    """The one LISTEN connection of this process, and what each channel does here."""

    dsn: str
    metrics: Metrics
    handlers: dict[str, Handler] = attrs.Factory(dict)
    on_reconnect: list[Callable[[], Awaitable[None]]] = attrs.Factory(list)
    connected: asyncio.Event = attrs.Factory(asyncio.Event)
    connections: int = 0  # made so far (a test sees a re-establishment)
    backend_pid: int | None = None

    def on(self, channel: str, handler: Handler) -> None:
        self.handlers[channel] = handler

    async def run(self) -> None:
        """Listen until cancelled; re-establish the connection whenever it fails."""
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(maxsize=QUEUE_MAX)

        def on_notify(_conn: Any, _pid: int, channel: str, payload: object) -> None:
            try:
                queue.put_nowait((channel, str(payload)))
            except asyncio.QueueFull:
                self.metrics.db_errors.labels("notification_dropped").inc()
                log.warning("notification_dropped", channel=channel)

        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT_S)
                try:
                    for channel in self.handlers:
                        await conn.add_listener(channel, on_notify)
                    self.connections += 1
                    self.metrics.listener_connections.inc()
                    self.backend_pid = conn.get_server_pid()
                    if self.connections > 1:
                        log.info("listener_reconnected", connections=self.connections)
                        # Whatever was notified while we were deaf is in the tables.
                        for resync in self.on_reconnect:
                            await resync()
                    self.connected.set()
                    await self._serve(conn, queue)
                finally:
                    self.connected.clear()
                    await _close(conn)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, TimeoutError) as exc:
                self.metrics.db_errors.labels("listener").inc()
                log.error("listener_failed", error=repr(exc))
                await asyncio.sleep(RETRY_S)

    async def _serve(self, conn: asyncpg.Connection,
                     queue: asyncio.Queue[tuple[str, str]]) -> None:
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + PROBE_EVERY_S
        while True:
            wait_s = next_probe - loop.time()
            if wait_s > 0:
                try:
                    async with asyncio.timeout(wait_s):
                        channel, payload = await queue.get()
                except TimeoutError:
                    pass
                else:
                    await self._handle(channel, payload)
                    continue
            # A connection that died silently answers nothing: TimeoutError.
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await conn.fetchval("SELECT 1")
            next_probe = loop.time() + PROBE_EVERY_S

    async def _handle(self, channel: str, payload: str) -> None:
        handler = self.handlers.get(channel)
        if handler is None:
            return
        try:
            await handler(payload)
        except Exception as exc:  # one bad notification never stops the listener
            log.error("notification_failed", channel=channel, error=repr(exc))


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=LISTENER_CLOSE_S)
    except Exception:  # a dead connection: drop it
        conn.terminate()


@attrs.define(eq=False)
class EventAnnouncer:
    """Tells the other processes which runs got events: one NOTIFY per run per batch.

    The event writer's commit hook hands it the batch's last seq per run (it
    must not wait); this loop sends them in one statement, coalescing the
    commits that happened while the previous statement ran.
    """

    store: ClusterStore
    instance_id: str
    metrics: Metrics
    _pending: dict[uuid.UUID, int] = attrs.Factory(dict)
    _wake: asyncio.Event = attrs.Factory(asyncio.Event)
    sent: int = 0  # notifications sent (the README's NOTIFY rate)

    def committed(self, last_seq_by_run: Mapping[uuid.UUID, int]) -> None:
        pending = self._pending
        for run_id, seq in last_seq_by_run.items():
            if seq > pending.get(run_id, -1):
                pending[run_id] = seq
        if len(pending) > ANNOUNCE_QUEUE_MAX:  # bounded: readers fall back to polling
            pending.clear()
            self.metrics.db_errors.labels("announce_dropped").inc()
        self._wake.set()

    def ended(self, run_id: uuid.UUID) -> None:
        """A run ended here: its readers elsewhere read its final record."""
        self._pending.setdefault(run_id, 0)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, {}
            if not batch:
                continue
            try:
                await self.store.notify_events(self.instance_id, batch)
                self.sent += len(batch)
                self.metrics.events_announced.inc(len(batch))
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                # Readers elsewhere still poll the table; nothing is lost.
                self.metrics.db_errors.labels("announce_events").inc()
                log.warning("event_announce_failed", error=repr(exc), runs=len(batch))
                await asyncio.sleep(RETRY_S)


def device_message(op: str, **fields: str) -> str:
    return orjson.dumps({"op": op, **fields}).decode()


def parse_device_message(payload: str) -> dict[str, str] | None:
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return None
    return value


__all__ = ["DEVICES_CHANNEL", "EVENTS_CHANNEL", "RUN_CANCELLED_CHANNEL", "EventAnnouncer",
           "Notifications", "device_message", "parse_device_message"]
