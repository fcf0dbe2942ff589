"""Operations routes on the public listener: /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.device.registry import REGISTRY
from gateway.metrics import METRICS
from gateway.runs.events import EVENT_WRITER
from gateway.runs.lifecycle import RUNS
from gateway.shutdown import SHUTDOWN
from gateway.tasks import TASKS

READY_DB_TIMEOUT_S = 2.0


async def healthz(request: web.Request) -> web.Response:
    """The process is alive (the event loop answers)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 only while the database answers, every background loop runs, and not draining."""
    app = request.app
    if app[SHUTDOWN].draining:
        return web.json_response({"status": "draining"}, status=503)
    try:
        async with asyncio.timeout(READY_DB_TIMEOUT_S):
            await app[RUNS].store.ping()
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        app[METRICS].db_errors.labels("readyz").inc()
        return web.json_response(
            {"status": "database_unavailable", "detail": type(exc).__name__}, status=503)
    down = app[TASKS].unhealthy()
    if down:
        return web.json_response({"status": "background_task_down", "tasks": down}, status=503)
    return web.json_response({"status": "ready", "devices": len(app[REGISTRY])})


async def metrics(request: web.Request) -> web.Response:
    exported = request.app[METRICS]
    exported.event_queue_depth.set(request.app[EVENT_WRITER].depth)
    return web.Response(body=exported.exposition(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application, *, wrap: Callable[[Handler], Handler]) -> None:
    """The operations routes, each handler inside the listener's ``wrap``."""
    app.router.add_get("/healthz", wrap(healthz))
    app.router.add_get("/readyz", wrap(readyz))
    app.router.add_get("/metrics", wrap(metrics))
