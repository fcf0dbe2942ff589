"""The composition root: every component built and wired here, both listeners, serving, draining.

Only ``gateway.cli`` imports this module; it imports every component. The
order things start and stop in, and the one budget a stop must keep to
(``GATEWAY_SHUTDOWN_TIMEOUT_S`` from the signal to the exit), live here and
nowhere else. It is longer than the other modules for that reason: splitting
start-up from teardown would put the two halves of one order in two files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Mapping

import asyncpg
import attrs
import structlog
from aiohttp import web

from gateway.allocator import return_large_blocks_when_freed
from gateway.auth import AUTHENTICATOR, DeviceAuthenticator, ServiceTokens, hmac_key_shortfall
from gateway.cluster.notify import (
    DEVICES_CHANNEL,
    EVENTS_CHANNEL,
    RUN_CANCELLED_CHANNEL,
    EventAnnouncer,
    Notifications,
    parse_device_message,
)
from gateway.cluster.peers import PEERS, Peers, dispatch_elsewhere
from gateway.cluster.presence import PRESENCE, Held, Presence
from gateway.config import SETTINGS, Secrets, Settings, redacted_summary
from gateway.dev.devmode import print_banner
from gateway.device.app_ping import app_ping_loop
from gateway.device.endpoint import DEVICE_OPTIONS, DeviceOptions, device_ws
from gateway.device.handlers import DEVICE_CONTEXT, DeviceContext
from gateway.device.moved import let_go
from gateway.device.registry import REGISTRY, Registry
from gateway.device.sockets import DEVICE_SOCKETS, DeviceSockets
from gateway.heap import HeapPolicy
from gateway.http import internal_api, ops
from gateway.http.admission import KEEPALIVE_S, Admission
from gateway.http.envelope import envelope, expect_continue, json_errors, route_miss
from gateway.http.tls import ServerTls, reload_on_sighup
from gateway.logs import AccessLogger, InternalAccessLogger
from gateway.metrics import METRICS, Metrics
from gateway.migrate import apply_migrations, default_migrations_dir
from gateway.runs.continuity import Continuity
from gateway.runs.events import EVENT_WRITER, EventWriter
from gateway.runs.lifecycle import RUNS, Runs
from gateway.runs.live import LIVE, LiveEvents
from gateway.runs.retention import retention_loop
from gateway.runs.scheduler import run_scheduler
from gateway.runs.tracking import Tracking, parse_run_id
from gateway.shutdown import SHUTDOWN, Shutdown
from gateway.store import ClusterStore, Store, create_pool
from gateway.systemd import SystemdNotifier
from gateway.tasks import TASKS, Tasks
from gateway.wire import codes
from gateway.wire.codes import CloseCode

log = structlog.get_logger(__name__)

DEVICE_WS_PATH = "/api/v1/ws/device"
EVENT_WRITER_TASK = "event-writer"

# ---------------------------------------------------------------- the stop budget
# Of GATEWAY_SHUTDOWN_TIMEOUT_S, the part kept for after the drain (handlers,
# the last event batch, the sweep), at most TEARDOWN_RESERVE_MAX_S.
TEARDOWN_SHARE = 0.25
TEARDOWN_RESERVE_MAX_S = 3.0
# HTTP handlers still running when a listener stops get this long to finish
# (less when the budget is short: see handler_grace_s).
HANDLER_GRACE_S = 2.0
# Teardown steps with floors where data is at stake: accepted events get at
# least 5 s even past the budget (a slow database; the unit's TimeoutStopSec is
# 20 s above it), the last sweep, one UPDATE, a moment. Pool connections still
# busy are then dropped.
WRITER_STOP_MIN_S = 5.0
SWEEP_MIN_S = 0.25
POOL_CLOSE_S = 1.0
# Pending TCP connections the public listener queues (capped by net.core.somaxconn).
LISTEN_BACKLOG = 4096


def teardown_reserve_s(settings: Settings) -> float:
    return min(TEARDOWN_RESERVE_MAX_S, settings.shutdown_timeout_s * TEARDOWN_SHARE)


def handler_grace_s(settings: Settings) -> float:
    # A quarter: aiohttp spends it twice (waiting for handlers, then for their
    # cancellation), and the drain's wait after dropping devices takes a half.
    return min(HANDLER_GRACE_S, teardown_reserve_s(settings) / 4)


# ---------------------------------------------------------------- the components


@attrs.define(eq=False)
class Gateway:
    """Every component of one gateway process (or of one test), built by ``open_gateway``."""

    settings: Settings
    secrets: Secrets
    pool: asyncpg.Pool
    store: Store
    registry: Registry
    device_sockets: DeviceSockets
    live: LiveEvents
    writer: EventWriter
    runs: Runs
    metrics: Metrics
    authenticator: DeviceAuthenticator
    service_tokens: ServiceTokens
    shutdown: Shutdown
    tasks: Tasks
    presence: Presence
    peers: Peers
    notifications: Notifications
    announcer: EventAnnouncer

    @property
    def draining(self) -> bool:
        return self.shutdown.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.shutdown.draining = value

    @property
    def sockets(self) -> int:
        """Device sockets held, upgraded or upgrading (GATEWAY_MAX_CONNECTIONS counts these)."""
        return len(self.device_sockets)


@contextlib.asynccontextmanager
async def open_gateway(
    settings: Settings, secrets: Secrets, dsn: str, *, metrics: Metrics | None = None
) -> AsyncIterator[Gateway]:
    """Pool, migrations, orphan sweep, background loops; undone in reverse order."""
    pool = await create_pool(dsn)
    try:
        if settings.auto_migrate:
            # A connection of its own: the migration lock is session-level, and
            # pooled connections are not reset on release (store._keep_session).
            conn = await asyncpg.connect(dsn)
            try:
                applied = await apply_migrations(conn, default_migrations_dir())
            finally:
                await conn.close()
            if applied:
                log.info("migrations_applied", migrations=applied)
        metrics = metrics or Metrics()
        store = Store(pool)
        registry = Registry()
        live = LiveEvents(capacity=settings.subscriber_buffer)
        writer = EventWriter(store=store, metrics=metrics, live=live,
                             queue_max=settings.event_queue_max,
                             queue_max_bytes=settings.event_queue_max_bytes,
                             batch_max=settings.event_batch_max)
        tracking = Tracking()
        continuity = Continuity(store=store, tracking=tracking, live=live, metrics=metrics,
                                instance_id=settings.instance_id,
                                resume_s=settings.run_resume_s)
        runs = Runs(store=store, writer=writer, live=live, metrics=metrics,
                    instance_id=settings.instance_id, targets=registry,
                    continuity=continuity, tracking=tracking)
        cluster_store = ClusterStore(pool)
        presence = Presence(store=cluster_store, metrics=metrics,
                            instance_id=settings.instance_id, ttl_s=settings.instance_ttl_s,
                            detach_dead_runs=continuity.enabled,
                            advertise_url=settings.advertise_url)
        peers = Peers(token=secrets.internal_tokens[0] if secrets.internal_tokens else "")
        announcer = EventAnnouncer(cluster_store, settings.instance_id, metrics)
        notifications = Notifications(dsn, metrics)
        gw = Gateway(
            settings=settings, secrets=secrets, pool=pool, store=store, registry=registry,
            device_sockets=DeviceSockets(), live=live, writer=writer, runs=runs,
            metrics=metrics,
            authenticator=DeviceAuthenticator.from_settings(settings, secret=secrets.jwt_secret),
            service_tokens=ServiceTokens.of(secrets.internal_tokens),
            shutdown=Shutdown(), tasks=Tasks(), presence=presence, peers=peers,
            notifications=notifications, announcer=announcer,
        )
        _wire_cluster(gw, cluster_store)
        await presence.start()
        # Before any device is accepted: runs left attached by our previous life.
        await runs.mark_orphans()
        tasks = gw.tasks
        tasks.supervise(EVENT_WRITER_TASK, writer.run, stalled=writer.stalled)
        tasks.supervise("run-scheduler", lambda: run_scheduler(runs, metrics))
        tasks.supervise("listener", notifications.run)
        tasks.supervise("event-announcer", announcer.run)
        tasks.supervise("presence-heartbeat", presence.heartbeat_loop)
        if continuity.enabled:
            tasks.supervise("run-expiry", continuity.expire_loop)
        if settings.app_ping:
            tasks.supervise("app-ping", lambda: app_ping_loop(registry, settings.heartbeat_s))
        tasks.supervise("retention",
                        lambda: retention_loop(pool, settings.retention_days, metrics))
        try:
            yield gw
        finally:
            await _stop(gw)
    finally:
        await _close_pool(pool, within_s=POOL_CLOSE_S)


async def _stop(gw: Gateway) -> None:
    """The loops, then the writer's last batches, then the sweep: within what is left."""
    budget = gw.settings.shutdown_timeout_s
    await gw.tasks.cancel(exclude=(EVENT_WRITER_TASK,))
    await gw.writer.stop(max(gw.shutdown.time_left(budget), WRITER_STOP_MIN_S))
    await gw.tasks.close()
    await _sweep(gw.runs, gw.shutdown.time_left(budget))
    await gw.presence.stop()
    await gw.peers.close()


def _wire_cluster(gw: Gateway, cluster_store: ClusterStore) -> None:
    """What the other processes tell us, and what we tell them (PROTOCOL.md §5)."""
    runs, live, announcer = gw.runs, gw.live, gw.announcer
    instance_id = gw.settings.instance_id

    stored = gw.writer.on_commit

    def committed(last_seq_by_run: Mapping[uuid.UUID, int]) -> None:
        if stored is not None:
            stored(last_seq_by_run)
        announcer.committed(last_seq_by_run)

    gw.writer.on_commit = committed
    live.on_end = announcer.ended

    async def dispatch(run_id: uuid.UUID, user_id: str, agent_id: str,
                       device_id: str | None) -> bool:
        return await dispatch_elsewhere(gw.presence, gw.peers, run_id, user_id, agent_id,
                                        device_id)

    runs.dispatch_elsewhere = dispatch

    async def on_events(payload: str) -> None:
        sender, _, rest = payload.partition(" ")
        if sender == instance_id:
            return  # our own readers were handed the events directly
        run_id = parse_run_id(rest.partition(" ")[0])
        if run_id is not None and live.wanted(run_id):
            live.nudge(run_id)

    async def on_devices(payload: str) -> None:
        message = parse_device_message(payload)
        if message is None or message.get("instance_id") != instance_id:
            return
        if message.get("op") == "replace":
            await let_go(gw.registry, runs, gw.presence, user_id=message.get("user_id", ""),
                         device_id=message.get("device_id", ""),
                         connection_id=message.get("connection_id", ""))

    async def lost(conn: Held) -> None:
        await let_go(gw.registry, runs, gw.presence, user_id=conn.user_id,
                     device_id=conn.device_id, connection_id=conn.connection_id)

    gw.presence.on_lost = lost

    async def resync() -> None:
        live.nudge_all()
        for run_id in await cluster_store.cancelled_among(runs.tracked_run_ids()):
            await runs.cancelled_elsewhere(str(run_id))

    notifications = gw.notifications
    notifications.on(RUN_CANCELLED_CHANNEL, runs.cancelled_elsewhere)
    notifications.on(EVENTS_CHANNEL, on_events)
    notifications.on(DEVICES_CHANNEL, on_devices)
    notifications.on_reconnect.append(resync)


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
        # The next start's sweep finds them (GATEWAY_INSTANCE_ID is stable).
        log.error("shutdown_sweep_failed", error=repr(exc))
        return 0


# ---------------------------------------------------------------- the two listeners


def _provide(app: web.Application, gw: Gateway) -> None:
    """Each component under its own AppKey, for the handlers of ``app``."""
    app[SETTINGS] = gw.settings
    app[SHUTDOWN] = gw.shutdown
    app[METRICS] = gw.metrics
    app[AUTHENTICATOR] = gw.authenticator
    app[REGISTRY] = gw.registry
    app[DEVICE_SOCKETS] = gw.device_sockets
    app[RUNS] = gw.runs
    app[LIVE] = gw.live
    app[EVENT_WRITER] = gw.writer
    app[TASKS] = gw.tasks
    app[PRESENCE] = gw.presence
    app[PEERS] = gw.peers


def build_public_app(gw: Gateway) -> web.Application:
    """Devices and operations; the internal API is never served here."""
    app = web.Application()
    _provide(app, gw)
    app[DEVICE_OPTIONS] = DeviceOptions.from_settings(gw.settings)
    app[DEVICE_CONTEXT] = DeviceContext(
        runs=gw.runs, authenticator=gw.authenticator, metrics=gw.metrics,
        heartbeat_s=gw.settings.heartbeat_s,
        bad_frames_per_minute=gw.settings.bad_frames_per_minute)
    app.router.add_get(DEVICE_WS_PATH, device_ws)  # its own JSON errors (its docstring)
    ops.add_routes(app, wrap=json_errors)
    app.router.add_route("*", "/{path:.*}", json_errors(route_miss))  # last: what is left
    return app


def build_internal_app(gw: Gateway) -> web.Application:
    """The internal API for sibling services, on its own listener."""
    app = web.Application(client_max_size=gw.settings.max_frame_bytes)
    _provide(app, gw)
    wrap = envelope(gw.service_tokens)
    expect = expect_continue(gw.service_tokens)
    internal_api.add_routes(app, wrap=wrap, expect=expect)
    # last: only what is left
    app.router.add_route("*", "/{path:.*}", wrap(route_miss), expect_handler=expect)
    return app


# ---------------------------------------------------------------- serving and draining


@attrs.define
class StopSignal:
    """First SIGTERM/SIGINT: drain. Second: leave at once."""

    on_force: Callable[[], None]
    event: asyncio.Event = attrs.Factory(asyncio.Event)

    def __call__(self, signum: int) -> None:
        if self.event.is_set():
            log.warning("second_signal_exiting_now", signal=signal.Signals(signum).name)
            self.on_force()
            os._exit(1)
        log.info("stop_signal", signal=signal.Signals(signum).name)
        self.event.set()


async def drain(gw: Gateway) -> None:
    """Close every device with 1001 and wait until each one's cleanup has run."""
    gw.live.end_all()  # event streams of runs still pending end now, not at the grace timeout
    for conn in list(gw.registry):
        conn.request_close(CloseCode.GOING_AWAY, "gateway shutting down")
    # Sockets still in their hello would otherwise hold the drain for the hello timeout.
    await gw.device_sockets.close_before_hello()
    await gw.device_sockets.wait_none_held()


async def drain_within(gw: Gateway, deadline: float) -> None:
    """Drain until ``deadline`` (loop time); then drop the devices still there.

    A device that never answers its close frame (or whose TCP window is full)
    is disconnected outright, so its handler runs its cleanup (pending calls
    503, its runs marked) before the listeners stop, not after the budget.
    """
    try:
        async with asyncio.timeout_at(deadline):
            await drain(gw)
        return
    except TimeoutError:
        pass
    aborted = gw.device_sockets.abort_all()
    log.error("drain_timeout", devices_left=gw.sockets, aborted=aborted)
    # Their cleanups write to the database: wait for them with half of what is
    # left, keeping the other half for the listeners, the writer and the sweep.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(gw.shutdown.time_left(0.0) / 2):
            await gw.device_sockets.wait_none_held()


async def watchdog_loop(gw: Gateway, notifier: SystemdNotifier, interval: float) -> None:
    """WATCHDOG=1 while the event loop answers; STATUS with the device count.

    Only the event loop: this loop running on time is the proof. The database
    belongs to /readyz, which takes the process out of the balancer while
    devices keep their sockets; a failover longer than WatchdogSec must not
    make systemd restart every gateway and disconnect every device.
    """
    while True:
        notifier.watchdog()
        notifier.status(f"{len(gw.registry)} devices connected")
        await asyncio.sleep(interval)


PARENT_CHECK_S = 1.0


async def watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """A worker of ``serve --workers N``: its parent gone (SIGKILL), it drains and exits."""
    while True:  # no event tells us: getppid() changes when the parent dies
        if os.getppid() != parent_pid:
            break
        await asyncio.sleep(PARENT_CHECK_S)
    log.error("worker_parent_gone", parent_pid=parent_pid)
    stop.set()


async def serve(
    settings: Settings, secrets: Secrets, dsn: str, *, on_force_exit: Callable[[], None]
) -> int:
    """Run until SIGTERM/SIGINT, then drain within GATEWAY_SHUTDOWN_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    stop = StopSignal(on_force=on_force_exit)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    notifier = SystemdNotifier(settings.notify_socket)
    log.info("gateway_starting", settings=redacted_summary(settings))
    tls = ServerTls.from_settings(settings)  # a bad pair: ConfigError, exit 2
    loop.add_signal_handler(signal.SIGHUP, reload_on_sighup, tls)
    wanted = hmac_key_shortfall(secrets.jwt_secret, settings.jwt_algorithms)
    if wanted is not None:
        log.warning("jwt_secret_short", recommended_bytes=wanted,
                    algorithms=list(settings.jwt_algorithms),
                    hint="a longer GATEWAY_JWT_SECRET needs every device token re-issued")
    async with open_gateway(settings, secrets, dsn) as gw:
        grace = handler_grace_s(settings)
        public = web.AppRunner(build_public_app(gw), access_log_class=AccessLogger,
                               handle_signals=False, shutdown_timeout=grace,
                               keepalive_timeout=KEEPALIVE_S)
        internal = web.AppRunner(build_internal_app(gw), access_log_class=InternalAccessLogger,
                                 handle_signals=False, shutdown_timeout=grace,
                                 handler_cancellation=True, keepalive_timeout=KEEPALIVE_S)
        await public.setup()
        await internal.setup()
        admission = Admission.for_this_process(settings.header_timeout_s)
        loop.set_exception_handler(admission.handle_loop_exception)
        for runner in (public, internal):
            assert runner.server is not None
            admission.attach(runner.server)
        heap = HeapPolicy()
        heap.install()
        gw.tasks.supervise("heap", heap.release_loop)
        try:
            reuse = settings.reuse_port or None
            # A reconnect storm: aiohttp's default backlog of 128 drops SYNs, and each
            # dropped device waits out TCP's retransmission (1 s, 3 s, 7 s, …). The
            # kernel caps this at net.core.somaxconn.
            await web.TCPSite(public, settings.public_host, settings.public_port,
                              ssl_context=tls.context if tls else None,
                              reuse_port=reuse, backlog=LISTEN_BACKLOG).start()
            await web.TCPSite(internal, settings.internal_host, settings.internal_port,
                              reuse_port=reuse).start()
            public_port = _port_of(public, settings.public_port)
            internal_port = _port_of(internal, settings.internal_port)
            advertised_port = internal_port
            if settings.peer_port is not None:
                # A worker sharing the internal port: its siblings need its own.
                await web.TCPSite(internal, settings.internal_host, settings.peer_port).start()
                advertised_port = _port_of(internal, settings.peer_port, last=True)
            await gw.presence.advertise(
                settings.advertise_url or advertise_url(settings.internal_host, advertised_port))
            log.info("gateway_listening", public=f"{settings.public_host}:{public_port}",
                     internal=f"{settings.internal_host}:{internal_port}",
                     instance_id=settings.instance_id, tls=tls is not None)
            if settings.dev_mode:
                print_banner(settings, secrets, public_port=public_port,
                             internal_port=internal_port)
            notifier.ready("accepting devices")
            interval = SystemdNotifier.watchdog_interval(
                settings.watchdog_usec, settings.watchdog_pid, os.getpid())
            if interval is not None:
                every = interval
                gw.tasks.supervise("systemd-watchdog",
                                   lambda: watchdog_loop(gw, notifier, every))
            if settings.parent_pid is not None:
                parent = settings.parent_pid
                gw.tasks.supervise("parent-watch", lambda: watch_parent(parent, stop.event))
            await stop.event.wait()

            gw.shutdown.begin(settings.shutdown_timeout_s)
            notifier.stopping("draining")
            log.info("gateway_draining", devices=len(gw.registry))
            assert gw.shutdown.deadline is not None
            await drain_within(gw, gw.shutdown.deadline - teardown_reserve_s(settings))
        finally:
            heap.uninstall()
            # Both at once: each gets the same grace for its unfinished handlers.
            for failure in await asyncio.gather(internal.cleanup(), public.cleanup(),
                                                return_exceptions=True):
                if isinstance(failure, Exception):
                    log.error("listener_cleanup_failed", error=repr(failure))
    notifier.close()
    log.info("gateway_stopped")
    return 0


def _port_of(runner: web.AppRunner, configured: int, *, last: bool = False) -> int:
    addresses = runner.addresses[::-1] if last else runner.addresses
    for address in addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured


def advertise_url(host: str, port: int) -> str:
    """GATEWAY_ADVERTISE_URL's default (PROTOCOL.md §4): a wildcard host is our name."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def run(settings: Settings, secrets: Secrets, dsn: str,
        on_force_exit: Callable[[], None]) -> int:
    """Run the event loop (uvloop when installed) around ``serve``."""
    if not return_large_blocks_when_freed():
        log.info("malloc_threshold_not_set", reason="not glibc")
    runner_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        runner_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=runner_factory) as runner:
        return runner.run(serve(settings, secrets, dsn, on_force_exit=on_force_exit))
