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


async def _readiness(app: web.Application) -> tuple[int, dict[str, object]]:
    """What /readyz answers: 200 only while the database answers, every background
    loop runs, and we are not draining."""
    if app[SHUTDOWN].draining:
        return 503, {"status": "draining"}
    try:
        async with asyncio.timeout(READY_DB_TIMEOUT_S):
            await app[RUNS].store.ping()
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        app[METRICS].db_errors.labels("readyz").inc()
        return 503, {"status": "database_unavailable", "detail": type(exc).__name__}
    down = app[TASKS].unhealthy()
    if down:
        return 503, {"status": "background_task_down", "tasks": down}
    return 200, {"status": "ready", "devices": len(app[REGISTRY])}


async def readyz(request: web.Request) -> web.Response:
    status, body = await _readiness(request.app)
    return web.json_response(body, status=status)


async def metrics(request: web.Request) -> web.Response:
    exported = request.app[METRICS]
    writer = request.app[EVENT_WRITER]
    exported.event_queue_depth.set(writer.depth)
    exported.event_queue_capacity.set(writer.queue_max)
    exported.asyncio_tasks.set(len(asyncio.all_tasks()))
    # The same check as /readyz, so an alert on gateway_ready == 0 fires for a
    # process that is up (scraped) but would be taken out of the balancer.
    status, _ = await _readiness(request.app)
    exported.ready.set(1 if status == 200 else 0)
    return web.Response(body=exported.exposition(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application, *, wrap: Callable[[Handler], Handler]) -> None:
    """The operations routes, each handler inside the listener's ``wrap``."""
    app.router.add_get("/healthz", wrap(healthz))
    app.router.add_get("/readyz", wrap(readyz))
    app.router.add_get("/metrics", wrap(metrics))
