"""Operations routes on the public listener: /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.services import services

READY_DB_TIMEOUT_S = 2.0


async def healthz(request: web.Request) -> web.Response:
    """The process is alive (the event loop answers)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 only while the database answers and the gateway is not draining."""
    svc = services(request.app)
    if svc.draining:
        return web.json_response({"status": "draining"}, status=503)
    try:
        async with asyncio.timeout(READY_DB_TIMEOUT_S):
            await svc.store.ping()
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        svc.metrics.db_errors.labels("readyz").inc()
        return web.json_response(
            {"status": "database_unavailable", "detail": type(exc).__name__}, status=503)
    return web.json_response({"status": "ready", "devices": len(svc.registry)})


async def metrics(request: web.Request) -> web.Response:
    svc = services(request.app)
    svc.metrics.event_queue_depth.set(svc.writer.depth)
    return web.Response(body=svc.metrics.exposition(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application, *, wrap: Callable[[Handler], Handler]) -> None:
    """The operations routes, each handler inside the listener's ``wrap``."""
    app.router.add_get("/healthz", wrap(healthz))
    app.router.add_get("/readyz", wrap(readyz))
    app.router.add_get("/metrics", wrap(metrics))
