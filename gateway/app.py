"""Both web applications, and the serving process: start, notify, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable

import attrs
import structlog
from aiohttp import web

from gateway import ops
from gateway.auth import hmac_key_shortfall
from gateway.codes import CloseCode
from gateway.config import Settings, redacted_summary
from gateway.device.endpoint import device_ws
from gateway.devmode import print_banner
from gateway.internal_api import build_internal_app, json_errors, route_miss
from gateway.logs import AccessLogger, InternalAccessLogger
from gateway.services import SERVICES, Secrets, Services, open_services
from gateway.systemd import SystemdNotifier

log = structlog.get_logger(__name__)

DEVICE_WS_PATH = "/api/v1/ws/device"
# HTTP handlers still running when a listener stops get this long to finish
# (less when GATEWAY_SHUTDOWN_TIMEOUT_S is short: see handler_grace_s).
HANDLER_GRACE_S = 2.0
# Of GATEWAY_SHUTDOWN_TIMEOUT_S, the part kept for after the drain (handlers,
# the last event batch, the sweep), at most TEARDOWN_RESERVE_MAX_S.
TEARDOWN_SHARE = 0.25
TEARDOWN_RESERVE_MAX_S = 3.0


def teardown_reserve_s(settings: Settings) -> float:
    return min(TEARDOWN_RESERVE_MAX_S, settings.shutdown_timeout_s * TEARDOWN_SHARE)


def handler_grace_s(settings: Settings) -> float:
    # A quarter: aiohttp spends it twice (waiting for handlers, then for their
    # cancellation), and the drain's wait after dropping devices takes a half.
    return min(HANDLER_GRACE_S, teardown_reserve_s(settings) / 4)


def build_public_app(svc: Services) -> web.Application:
    """Devices and operations; the internal API is never served here."""
    app = web.Application()
    app[SERVICES] = svc
    app.router.add_get(DEVICE_WS_PATH, json_errors(device_ws))
    ops.add_routes(app, wrap=json_errors)
    app.router.add_route("*", "/{path:.*}", json_errors(route_miss))  # last: what is left
    return app


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


async def drain(svc: Services) -> None:
    """Close every device with 1001 and wait until each one's cleanup has run."""
    svc.live.end_all()  # event streams of runs still pending end now, not at the grace timeout
    for conn in list(svc.registry):
        conn.request_close(CloseCode.GOING_AWAY, "gateway shutting down")
    # Sockets still in their hello would otherwise hold the drain for the hello timeout.
    await asyncio.gather(*(
        ws.close(code=CloseCode.GOING_AWAY, message=b"gateway shutting down")
        for ws in list(svc.hello_sockets)
    ), return_exceptions=True)
    if svc.sockets > 0:
        await svc.no_sockets.wait()


async def drain_within(svc: Services, deadline: float) -> None:
    """Drain until ``deadline`` (loop time); then drop the devices still there.

    A device that never answers its close frame (or whose TCP window is full)
    is disconnected outright, so its handler runs its cleanup (pending calls
    503, its runs marked) before the listeners stop, not after the budget.
    """
    try:
        async with asyncio.timeout_at(deadline):
            await drain(svc)
        return
    except TimeoutError:
        pass
    aborted = svc.abort_sockets()
    log.error("drain_timeout", devices_left=svc.sockets, aborted=aborted)
    # Their cleanups write to the database: wait for them with half of what is
    # left, keeping the other half for the listeners, the writer and the sweep.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(svc.time_left(0.0) / 2):
            await svc.no_sockets.wait()


async def watchdog_loop(svc: Services, notifier: SystemdNotifier, interval: float) -> None:
    """WATCHDOG=1 while the event loop and the database answer; STATUS with the count."""
    while True:
        try:
            async with asyncio.timeout(interval):
                await svc.store.ping()
        except Exception as exc:
            log.warning("watchdog_database_unavailable", error=repr(exc))
        else:
            notifier.watchdog()
        notifier.status(f"{len(svc.registry)} devices connected")
        await asyncio.sleep(interval)


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
    wanted = hmac_key_shortfall(secrets.jwt_secret, settings.jwt_algorithms)
    if wanted is not None:
        log.warning("jwt_secret_short", recommended_bytes=wanted,
                    algorithms=list(settings.jwt_algorithms),
                    hint="a longer GATEWAY_JWT_SECRET needs every device token re-issued")
    async with open_services(settings, secrets, dsn) as svc:
        grace = handler_grace_s(settings)
        public = web.AppRunner(build_public_app(svc), access_log_class=AccessLogger,
                               handle_signals=False, shutdown_timeout=grace)
        internal = web.AppRunner(build_internal_app(svc), access_log_class=InternalAccessLogger,
                                 handle_signals=False, shutdown_timeout=grace,
                                 handler_cancellation=True)
        await public.setup()
        await internal.setup()
        try:
            await web.TCPSite(public, settings.public_host, settings.public_port).start()
            await web.TCPSite(internal, settings.internal_host, settings.internal_port).start()
            public_port = _port_of(public, settings.public_port)
            internal_port = _port_of(internal, settings.internal_port)
            log.info("gateway_listening", public=f"{settings.public_host}:{public_port}",
                     internal=f"{settings.internal_host}:{internal_port}",
                     instance_id=settings.instance_id)
            if settings.dev_mode:
                print_banner(settings, secrets, public_port=public_port,
                             internal_port=internal_port)
            notifier.ready("accepting devices")
            interval = SystemdNotifier.watchdog_interval(
                settings.watchdog_usec, settings.watchdog_pid, os.getpid())
            if interval is not None:
                svc.spawn(watchdog_loop(svc, notifier, interval), "systemd-watchdog")
            await stop.event.wait()

            svc.draining = True
            svc.stop_deadline = loop.time() + settings.shutdown_timeout_s
            notifier.stopping("draining")
            log.info("gateway_draining", devices=len(svc.registry))
            await drain_within(svc, svc.stop_deadline - teardown_reserve_s(settings))
        finally:
            # Both at once: each gets the same grace for its unfinished handlers.
            for failure in await asyncio.gather(internal.cleanup(), public.cleanup(),
                                                return_exceptions=True):
                if isinstance(failure, Exception):
                    log.error("listener_cleanup_failed", error=repr(failure))
    notifier.close()
    log.info("gateway_stopped")
    return 0


def _port_of(runner: web.AppRunner, configured: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured


def run(settings: Settings, secrets: Secrets, dsn: str,
        on_force_exit: Callable[[], None]) -> int:
    """Run the event loop (uvloop when installed) around ``serve``."""
    runner_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        runner_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=runner_factory) as runner:
        return runner.run(serve(settings, secrets, dsn, on_force_exit=on_force_exit))
