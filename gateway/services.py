"""The gateway's shared state, created once per process (or per test) and torn down in order.

Both web applications reach it through one typed ``AppKey`` and the
``services(app)`` accessor. ``open_services`` is the single place where
resources are created, background tasks started, and both undone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import attrs
import structlog
from aiohttp import web

from gateway import codes
from gateway.auth import DeviceAuthenticator, ServiceTokens
from gateway.config import Settings
from gateway.device import messages
from gateway.device.registry import Registry
from gateway.events import EventWriter
from gateway.live import LiveEvents
from gateway.metrics import Metrics
from gateway.migrate import apply_migrations, default_migrations_dir
from gateway.retention import retention_loop
from gateway.runs import Runs, RunTarget
from gateway.store import RUN_CANCELLED_CHANNEL, RunRecord, Store

log = structlog.get_logger(__name__)

# Teardown steps that keep to the stop budget, with floors where data is at stake:
# accepted events get at least 5 s even past the budget (a slow database; the
# unit's TimeoutStopSec is 20 s above it), the last sweep, one UPDATE, a moment.
# Pool connections still busy are then dropped.
WRITER_STOP_MIN_S = 5.0
SWEEP_MIN_S = 0.25
POOL_CLOSE_S = 1.0
# A LISTEN connection that does not close at once is dropped.
LISTENER_CLOSE_S = 1.0


@attrs.frozen
class Secrets:
    """The secrets in force: configured, or generated for dev mode."""

    jwt_secret: str | None
    internal_tokens: tuple[str, ...]


@attrs.define(eq=False)
class Services:
    settings: Settings
    secrets: Secrets
    pool: asyncpg.Pool
    store: Store
    registry: Registry
    live: LiveEvents
    writer: EventWriter
    runs: Runs
    metrics: Metrics
    authenticator: DeviceAuthenticator
    service_tokens: ServiceTokens
    draining: bool = False
    # Loop time by which a stopping gateway must be gone (GATEWAY_SHUTDOWN_TIMEOUT_S
    # after the signal); every step of the teardown keeps to it.
    stop_deadline: float | None = None
    no_sockets: asyncio.Event = attrs.Factory(asyncio.Event)
    # Upgraded sockets still waiting for their device_hello: in no registry yet, so
    # the drain finds them here to close them with 1001.
    hello_sockets: set[web.WebSocketResponse] = attrs.Factory(set)
    # Every device socket held, upgraded or upgrading, with its request (which has
    # the transport): counted for GATEWAY_MAX_CONNECTIONS, and dropped outright
    # when a drain runs out of time.
    _device_sockets: dict[web.WebSocketResponse, web.BaseRequest] = attrs.Factory(dict)
    _tasks: list[asyncio.Task[Any]] = attrs.Factory(list)

    @property
    def sockets(self) -> int:
        return len(self._device_sockets)

    def socket_opened(self, ws: web.WebSocketResponse, request: web.BaseRequest) -> None:
        self._device_sockets[ws] = request
        self.no_sockets.clear()

    def socket_closed(self, ws: web.WebSocketResponse) -> None:
        self._device_sockets.pop(ws, None)
        if not self._device_sockets:
            self.no_sockets.set()

    def abort_sockets(self) -> int:
        """Drop the TCP connection of every device socket still held; how many.

        The drain's last resort for peers that never finish the close handshake
        (or cannot even take the close frame): their handlers then end, and run
        their cleanup, at once.
        """
        aborted = 0
        for request in list(self._device_sockets.values()):
            transport = request.transport
            if transport is not None:
                transport.abort()
                aborted += 1
        return aborted

    def time_left(self, default: float) -> float:
        """Seconds until ``stop_deadline`` (``default`` when no stop is under way)."""
        if self.stop_deadline is None:
            return default
        return max(0.0, self.stop_deadline - asyncio.get_running_loop().time())

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Start a background task owned by the services (cancelled on close)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(_log_task_end)
        self._tasks.append(task)
        return task

    async def cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


def _log_task_end(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background_task_failed", task=task.get_name(), error=repr(exc),
                  exc_info=exc)


SERVICES = web.AppKey("services", Services)


def services(app: web.Application) -> Services:
    return app[SERVICES]


def _agent_run_frame(record: RunRecord) -> bytes:
    return messages.agent_run(run_id=str(record.id), agent_id=record.agent_id,
                              input_json=record.input)


def _agent_cancel_frame(run_id: str, reason: str) -> bytes:
    return messages.agent_cancel(run_id=run_id, reason=reason)


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Session settings every pooled connection shares.
    await conn.execute("SET TIME ZONE 'UTC'")


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection,
        command_timeout=60,
    )
    assert pool is not None
    return pool


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, secrets: Secrets, dsn: str, *, metrics: Metrics | None = None
) -> AsyncIterator[Services]:
    """Pool, migrations, orphan sweep, writer and scheduler; undone in reverse order."""
    pool = await create_pool(dsn)
    try:
        if settings.auto_migrate:
            async with pool.acquire() as conn:
                applied = await apply_migrations(conn, default_migrations_dir())  # type: ignore[arg-type]
            if applied:
                log.info("migrations_applied", migrations=applied)
        metrics = metrics or Metrics()
        store = Store(pool)
        registry = Registry()
        live = LiveEvents(capacity=settings.subscriber_buffer)
        writer = EventWriter(store=store, metrics=metrics, live=live,
                             queue_max=settings.event_queue_max,
                             batch_max=settings.event_batch_max)

        def locate(user_id: str, agent_id: str, device_id: str | None) -> RunTarget | None:
            return registry.locate_agent(user_id, agent_id, device_id)

        runs = Runs(store=store, writer=writer, live=live, metrics=metrics,
                    instance_id=settings.instance_id, locate=locate,
                    build_agent_run=_agent_run_frame, build_agent_cancel=_agent_cancel_frame)
        svc = Services(
            settings=settings, secrets=secrets, pool=pool, store=store, registry=registry,
            live=live, writer=writer, runs=runs, metrics=metrics,
            authenticator=DeviceAuthenticator.from_settings(settings, secret=secrets.jwt_secret),
            service_tokens=ServiceTokens.of(secrets.internal_tokens),
        )
        # Before any device is accepted: runs left running by our previous life.
        await runs.mark_orphans()
        writer.start()
        svc.spawn(runs.run_scheduler(), "run-scheduler")
        svc.spawn(listen_for_cancels(runs, metrics, dsn), "cancel-listener")
        if settings.app_ping:
            svc.spawn(app_ping_loop(svc), "app-ping")
        svc.spawn(retention_loop(pool, settings.retention_days, metrics), "retention")
        try:
            yield svc
        finally:
            await svc.cancel_tasks()
            await writer.stop(max(svc.time_left(settings.shutdown_timeout_s), WRITER_STOP_MIN_S))
            swept = await _sweep(runs, svc.time_left(settings.shutdown_timeout_s))
            if swept:
                log.warning("runs_failed_at_shutdown", count=swept)
    finally:
        await _close_pool(pool, within_s=POOL_CLOSE_S)


async def _close_pool(pool: asyncpg.Pool, *, within_s: float) -> None:
    try:
        async with asyncio.timeout(within_s):
            await pool.close()
    except TimeoutError:
        log.warning("database_pool_close_timeout", within_s=within_s)
        pool.terminate()


async def _sweep(runs: Runs, within_s: float) -> int:
    try:
        async with asyncio.timeout(max(within_s, SWEEP_MIN_S)):
            return await runs.fail_instance_runs(codes.RUN_ERROR_GATEWAY_SHUTDOWN)
    except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, TimeoutError) as exc:
        # The next start's orphan sweep marks them (GATEWAY_INSTANCE_ID is stable).
        log.error("shutdown_sweep_failed", error=repr(exc))
        return 0


CANCEL_QUEUE_MAX = 10_000


async def listen_for_cancels(runs: Runs, metrics: Metrics, dsn: str) -> None:
    """LISTEN for runs cancelled through any gateway process; stop ours among them."""
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=CANCEL_QUEUE_MAX)

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
        try:
            queue.put_nowait(str(payload))
        except asyncio.QueueFull:
            log.warning("cancel_notification_dropped", run_id=payload)

    while True:
        try:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.add_listener(RUN_CANCELLED_CHANNEL, on_notify)
                while not conn.is_closed():
                    try:
                        async with asyncio.timeout(5.0):
                            payload = await queue.get()
                    except TimeoutError:
                        continue  # look at the connection again
                    await runs.cancelled_elsewhere(payload)
            finally:
                await conn.close(timeout=LISTENER_CLOSE_S)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            metrics.db_errors.labels("cancel_listener").inc()
            log.error("cancel_listener_failed", error=repr(exc))
            await asyncio.sleep(1.0)


async def app_ping_loop(svc: Services) -> None:
    """Legacy application heartbeat: {"type": "ping"} to every device each interval.

    Not a liveness check (aiohttp's WebSocket heartbeat is): old Electron
    builds simply expect the frame. One task for all devices, not one each.
    """
    interval = svc.settings.heartbeat_s
    while True:
        await asyncio.sleep(interval)
        for index, conn in enumerate(svc.registry, start=1):
            if conn.closing:
                continue
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await conn.send(messages.PING)
            if index % 500 == 0:
                await asyncio.sleep(0)  # let other work in between large fan-outs
