"""Operations routes on the public listener: /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.services import Services, services

READY_DB_TIMEOUT_S = 2.0


async def healthz(request: web.Request) -> web.Response:
    """The process is alive (the event loop answers)."""
    return web.json_response({"status": "ok"})


async def _readiness(svc: Services) -> tuple[int, dict[str, object]]:
    """What /readyz answers: 200 only while the database answers and we are not draining."""
    if svc.draining:
        return 503, {"status": "draining"}
    try:
        async with asyncio.timeout(READY_DB_TIMEOUT_S):
            await svc.store.ping()
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        svc.metrics.db_errors.labels("readyz").inc()
        return 503, {"status": "database_unavailable", "detail": type(exc).__name__}
    return 200, {"status": "ready", "devices": len(svc.registry)}


async def readyz(request: web.Request) -> web.Response:
    status, body = await _readiness(services(request.app))
    return web.json_response(body, status=status)


async def metrics(request: web.Request) -> web.Response:
    svc = services(request.app)
    svc.metrics.event_queue_depth.set(svc.writer.depth)
    svc.metrics.event_queue_capacity.set(svc.writer.queue_max)
    # The same check as /readyz, so an alert on gateway_ready == 0 fires for a
    # process that is up (scraped) but would be taken out of the balancer.
    status, _ = await _readiness(svc)
    svc.metrics.ready.set(1 if status == 200 else 0)
    return web.Response(body=svc.metrics.exposition(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application, *, wrap: Callable[[Handler], Handler]) -> None:
    """The operations routes, each handler inside the listener's ``wrap``."""
    app.router.add_get("/healthz", wrap(healthz))
    app.router.add_get("/readyz", wrap(readyz))
    app.router.add_get("/metrics", wrap(metrics))
