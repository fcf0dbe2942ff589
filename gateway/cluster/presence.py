"""Who is alive and which process holds which device (PROTOCOL.md §5).

Each process records itself in ``gateway_instances`` and heart-beats every
TTL / 3; every device it holds is a row of ``device_presence``, written before
its ``hello_ack`` and deleted by its connection's cleanup *by connection id*,
so the cleanup of a replaced connection never deletes its successor's row.
The same loop reaps dead processes: a heartbeat older than the TTL, and any
live process removes that one's presence and detaches its running runs
("gateway restarted"), so their devices resume them wherever they reconnect.
Rows of a dead process are ignored by every query (joined on a fresh
heartbeat) even before they are reaped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import asyncpg
import attrs
import structlog
from aiohttp import web

from gateway.cluster.notify import device_message
from gateway.metrics import Metrics
from gateway.runs.coalesce import Coalescer
from gateway.store import ClusterStore, HelloPresence, PresenceRow, connection_digest
from gateway.wire import codes

log = structlog.get_logger(__name__)

# A replacement waits this long for the earlier process to let the device go
# (close it with 4000, detach its runs) before it resumes them.
RELEASE_WAIT_S = 2.0
RELEASE_POLL_S = 0.02
# Where a remote device was found is remembered this long, so a stream of
# forwarded calls costs no database round trip each. A device that moved
# meanwhile is answered 404 by its old process (peer routes never forward), and
# the caller looks again with ``fresh=True``.
LOCATE_CACHE_S = 1.0
LOCATE_CACHE_MAX = 10_000


class Held(Protocol):
    """A device connection as presence sees it."""

    @property
    def user_id(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def connection_id(self) -> str: ...
    @property
    def agent_ids(self) -> tuple[str, ...]: ...
    @property
    def connected_at(self) -> dt.datetime: ...


@attrs.define(eq=False)
class Presence:
    store: ClusterStore
    metrics: Metrics
    instance_id: str
    ttl_s: float
    # Dead processes' runs: detached for resume (False: failed at once, resume 0).
    detach_dead_runs: bool = True
    advertise_url: str | None = None
    # A connection of ours whose row another process's hello overwrote: let it go
    # (the NOTIFY that should have said so was missed). Wired by app.py.
    on_lost: Callable[[Held], Awaitable[object]] | None = None
    beats: int = 0
    _written: dict[str, Held] = attrs.Factory(dict)  # connection id → its row is written
    # The sum of connection_digest over _written: what our rows add up to if
    # none was taken (check_lost).
    _written_digest: int = 0
    _located: dict[tuple[str, str | None], tuple[float, PresenceRow]] = attrs.Factory(dict)
    # A reconnect storm's hellos share their presence statements (see runs/coalesce.py).
    _looks: Coalescer[tuple[str, str], HelloPresence] = attrs.field(init=False)
    _ups: Coalescer[Held, None] = attrs.field(init=False)
    _downs: Coalescer[str, None] = attrs.field(init=False)  # a mass disconnect's cleanups

    @_looks.default
    def _looks_coalescer(self) -> Coalescer[tuple[str, str], HelloPresence]:
        return Coalescer(self._look_batch)

    @_ups.default
    def _ups_coalescer(self) -> Coalescer[Held, None]:
        return Coalescer(self._up_batch)

    @_downs.default
    def _downs_coalescer(self) -> Coalescer[str, None]:
        return Coalescer(self._down_batch)

    @property
    def heartbeat_s(self) -> float:
        return self.ttl_s / 3

    async def start(self) -> None:
        await self.store.register_instance(self.instance_id, self.advertise_url)
        log.info("instance_registered", instance_id=self.instance_id,
                 advertise_url=self.advertise_url, ttl_s=self.ttl_s)

    async def advertise(self, url: str) -> None:
        """The listeners are up: this is where the other processes reach us."""
        self.advertise_url = url
        await self.store.set_advertise_url(self.instance_id, url)
        log.info("instance_advertised", instance_id=self.instance_id, advertise_url=url)

    async def stop(self) -> None:
        try:
            async with asyncio.timeout(1.0):
                await self.store.unregister_instance(self.instance_id)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, TimeoutError) as exc:
            # The others reap us after the TTL.
            log.warning("instance_unregister_failed", error=repr(exc))

    # ------------------------------------------------------------ devices

    async def device_up(self, conn: Held) -> None:
        await self._ups.submit(conn)
        if conn.connection_id not in self._written:
            self._written_digest += connection_digest(conn.connection_id)
        self._written[conn.connection_id] = conn

    async def _up_batch(self, conns: Sequence[Held]) -> list[None]:
        await self.store.devices_up(self.instance_id, [
            (c.user_id, c.device_id, c.connection_id, c.agent_ids, c.connected_at)
            for c in conns])
        return [None] * len(conns)

    async def device_down(self, conn: Held) -> None:
        if self._written.pop(conn.connection_id, None) is not None:
            self._written_digest -= connection_digest(conn.connection_id)
        try:
            await self._downs.submit(conn.connection_id)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            # The row stays until we stop or are reaped; a later hello overwrites it.
            self.metrics.db_errors.labels("presence").inc()
            log.error("presence_delete_failed", error=repr(exc))

    async def _down_batch(self, connection_ids: Sequence[str]) -> list[None]:
        await self.store.devices_down(connection_ids)
        return [None] * len(connection_ids)

    async def at_hello(self, user_id: str, device_id: str) -> HelloPresence:
        try:
            return await self._looks.submit((user_id, device_id))
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            # The database is down: the hello's own run work fails next anyway;
            # the limit is then this process's count alone.
            self.metrics.db_errors.labels("presence").inc()
            log.error("presence_lookup_failed", error=repr(exc))
            return HelloPresence(0, None)

    async def _look_batch(self, hellos: Sequence[tuple[str, str]]) -> list[HelloPresence]:
        return await self.store.at_hellos(hellos, instance_id=self.instance_id,
                                          ttl_s=self.ttl_s)

    async def take_over(self, holder: PresenceRow, connection_id: str) -> bool:
        """Ask the process holding the device to let it go; wait (bounded) until it has.

        True when its connection's row is gone: its cleanup ran, so its runs
        are detached and this hello can resume them.
        """
        await self.store.notify_devices(device_message(
            "replace", instance_id=holder.instance_id, user_id=holder.user_id,
            device_id=holder.device_id, connection_id=holder.connection_id,
            by=connection_id))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELEASE_WAIT_S
        while await self.store.presence_exists(holder.connection_id):
            if loop.time() > deadline:
                log.warning("device_release_timeout", holder=holder.instance_id,
                            old_connection_id=holder.connection_id)
                return False
            await asyncio.sleep(RELEASE_POLL_S)
        return True

    async def elsewhere(self, user_id: str) -> list[PresenceRow]:
        """The user's devices on the other live processes, newest first."""
        return await self.store.elsewhere(user_id, instance_id=self.instance_id,
                                          ttl_s=self.ttl_s)

    async def locate(self, user_id: str, device_id: str | None, *,
                     fresh: bool = False) -> tuple[PresenceRow | None, bool]:
        """The named device (or the user's newest) on another live process, and
        whether that answer came from the short cache (see LOCATE_CACHE_S)."""
        key = (user_id, device_id)
        now = asyncio.get_running_loop().time()
        cached = self._located.get(key)
        if cached is not None and not fresh and cached[0] > now:
            return cached[1], True
        found = None
        for row in await self.elsewhere(user_id):
            if device_id is None or row.device_id == device_id:
                found = row
                break
        if found is None:
            self._located.pop(key, None)
        else:
            if len(self._located) >= LOCATE_CACHE_MAX:
                self._located.clear()
            self._located[key] = (now + LOCATE_CACHE_S, found)
        return found, False

    async def locate_agent(self, user_id: str, agent_id: str,
                           device_id: str | None) -> PresenceRow | None:
        for row in await self.elsewhere(user_id):
            if agent_id in row.agent_ids and (device_id is None or row.device_id == device_id):
                return row
        return None

    # ------------------------------------------------------------ heartbeat and reaper

    async def heartbeat_loop(self) -> None:
        """Every TTL / 3: our heartbeat, then the reaper's look for dead processes."""
        while True:
            try:
                await self.beat()
                await self.reap()
                await self.check_lost()
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                # Kept here: a restart would wait for the back-off, and a missed
                # beat is what makes the others declare us dead.
                self.metrics.db_errors.labels("heartbeat").inc()
                log.error("heartbeat_failed", error=repr(exc))
            await asyncio.sleep(self.heartbeat_s)

    async def beat(self) -> None:
        if await self.store.heartbeat(self.instance_id):
            self.beats += 1
            return
        # Reaped while we stalled past the TTL: back, with what we hold now.
        held = list(self._written.values())
        log.warning("instance_reregistered", instance_id=self.instance_id, devices=len(held))
        await self.store.reregister(self.instance_id, self.advertise_url, [
            (c.user_id, c.device_id, c.connection_id, c.agent_ids, c.connected_at)
            for c in held])

    @property
    def written_digest(self) -> tuple[int, int]:
        """The rows we wrote and hold: how many, and their ``connection_digest`` sum."""
        return len(self._written), self._written_digest

    async def check_lost(self) -> int:
        """Connections whose row is no longer ours: replaced from another process."""
        if await self.store.presence_digest(self.instance_id) == self.written_digest:
            # Our rows are exactly those we wrote: none was taken. The ids
            # themselves (20,000 of them every few seconds) go only otherwise.
            return 0
        written = dict(self._written)
        lost = await self.store.presence_lost(self.instance_id, list(written))
        for connection_id in lost:
            conn = written[connection_id]
            if connection_id in self._written and self.on_lost is not None:
                log.warning("device_presence_lost", user_id=conn.user_id,
                            device_id=conn.device_id, connection_id=connection_id)
                await self.on_lost(conn)
        return len(lost)

    async def reap(self) -> list[str]:
        dead, runs = await self.store.reap(
            instance_id=self.instance_id, ttl_s=self.ttl_s,
            reason=codes.RUN_ERROR_GATEWAY_RESTARTED, detach=self.detach_dead_runs)
        if dead:
            self.metrics.instances_reaped.inc(len(dead))
            if self.detach_dead_runs:
                self.metrics.runs_detached.inc(len(runs))
            else:
                self.metrics.runs.labels("error").inc(len(runs))
            log.warning("instances_reaped", instances=dead, runs=[str(r) for r in runs],
                        detached=self.detach_dead_runs)
        return dead


PRESENCE = web.AppKey("presence", Presence)
