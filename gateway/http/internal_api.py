"""The internal HTTP API for sibling services (PROTOCOL.md §2), on its own listener."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.cluster.peers import PEER_PREFIX, PEERS, PeerFailed, PeerUnreachable
from gateway.cluster.presence import PRESENCE
from gateway.device.connection import CallFailed, Connection
from gateway.device.registry import REGISTRY
from gateway.http.envelope import ApiError, ExpectHandler, json_response
from gateway.http.openapi import document_handler
from gateway.http.streaming import stream_run_events
from gateway.metrics import METRICS
from gateway.runs.lifecycle import RUNS, RunAlreadyFinished, RunNotFound
from gateway.runs.tracking import parse_run_id
from gateway.shutdown import SHUTDOWN
from gateway.store import RUN_STATUSES, PresenceRow, RunRecord, Store
from gateway.wire import codes
from gateway.wire.frames import id_problem, jsonb_problem, text_problem

log = structlog.get_logger(__name__)

PREFIX = "/internal/v1"
MAX_TIMEOUT_S = 3600.0
# The device sees timeout_ms; below 1 ms it would read 0 ("no timeout" to some).
MIN_TIMEOUT_S = 0.001
MAX_HARD_TIMEOUT_S = 24 * 3600.0
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 1000
TOOL_NAME_MAX = 256
# Event seqs are PostgreSQL integers; a larger ?after= failed in the query,
# after the stream's 200 had gone out.
MAX_SEQ = 2**31 - 1

T = TypeVar("T")

CALL_FAILURE_STATUS = {
    codes.DEVICE_DISCONNECTED: 503,
    codes.GATEWAY_SHUTDOWN: 503,
    codes.TIMEOUT: 504,
    codes.TOO_MANY_CALLS: 429,
}


# ---------------------------------------------------------------- side effects


async def _to_the_end(coro: Coroutine[Any, Any, T], what: str) -> T:
    """Run ``coro`` to its end even when the caller hangs up meanwhile.

    The internal listener cancels a handler whose caller went away. A create or
    a cancel interrupted between its commit and what follows it (dispatching
    the run, telling the device) would leave a run `running` that no device
    feeds, or a cancelled run its device keeps feeding. So the work runs as
    its own task, which the cancelled handler still waits for.
    """
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            await task
        except Exception as exc:  # nobody is left to answer: the log is the answer
            log.warning("caller_gone_request_failed", request=what, error=repr(exc))
        else:
            log.info("caller_gone_request_completed", request=what)
        raise


# ---------------------------------------------------------------- input helpers


async def _body(request: web.Request) -> bytes:
    """The request body, taken from aiohttp's buffer when it is all there.

    A small body has usually arrived with the headers: it is then taken as it
    lies, without ``read()``'s coroutine and its second ``readany`` for the
    end (~3 µs of a tool call inside the loaded process). A body still coming,
    or over ``client_max_size``, goes through ``read()``, which waits for it
    and answers 413.
    """
    content = request.content
    if content.is_eof() and content.total_bytes <= request.client_max_size:
        return content.read_nowait()
    return await request.read()


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await _body(request)
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, codes.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, codes.BAD_REQUEST, "body must be a JSON object")
    if problem := text_problem(raw, body):
        raise ApiError(400, codes.BAD_REQUEST, f"body refused: {problem}")
    return body


def _bad(detail: str) -> ApiError:
    return ApiError(400, codes.BAD_REQUEST, detail)


def _id_field(body: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(f"'{name}' is required")
        return None
    if problem := id_problem(value):
        raise _bad(f"'{name}' {problem}")
    assert isinstance(value, str)
    return value


def _seconds(body: dict[str, Any], name: str, default: float, maximum: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not math.isfinite(value) or value < MIN_TIMEOUT_S):
        raise _bad(f"'{name}' must be a number of seconds, at least {MIN_TIMEOUT_S:g}")
    if value > maximum:
        raise _bad(f"'{name}' must be at most {maximum:g}")
    return float(value)


def _query_id(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if value is None:
        raise _bad(f"query parameter '{name}' is required")
    if problem := id_problem(value):
        raise _bad(f"'{name}' {problem}")
    return value


def _run_id(request: web.Request) -> uuid.UUID:
    run_id = parse_run_id(request.match_info["run_id"])
    if run_id is None:
        raise ApiError(404, codes.RUN_NOT_FOUND, "no such run")
    return run_id


def _parse_time(value: Any) -> dt.datetime:
    if not isinstance(value, str):
        raise _bad("'scheduled_at' must be an ISO-8601 string")
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _bad("'scheduled_at' must be an ISO-8601 date-time") from None
    if moment.tzinfo is None:  # a time without an offset is read as UTC
        moment = moment.replace(tzinfo=dt.UTC)
    try:
        # In UTC here, so a time at the edge of Python's range (year 1 at +14:00)
        # is refused now rather than failing as it is stored.
        return moment.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        raise _bad("'scheduled_at' is out of range") from None


# ---------------------------------------------------------------- presence


def _device_json(conn: Connection) -> dict[str, Any]:
    return {
        "user_id": conn.user_id,
        "device_id": conn.device_id,
        "agent_ids": list(conn.agent_ids),
        "connection_id": conn.connection_id,
        "connected_at": conn.connected_at.isoformat(),
    }


async def list_devices(request: web.Request) -> web.Response:
    """Ours from the registry (exact, no lag), the other live processes' from presence."""
    user_id = _query_id(request, "user_id")
    conns = [c for c in request.app[REGISTRY].devices_of(user_id) if not c.closing]
    devices = [_device_json(c) for c in conns]
    local = {c.device_id for c in conns}
    elsewhere = await request.app[PRESENCE].elsewhere(user_id)
    devices += [row.as_json() for row in reversed(elsewhere) if row.device_id not in local]
    return json_response({"devices": devices})


# ---------------------------------------------------------------- tool calls


async def create_tool_call(request: web.Request) -> web.StreamResponse:
    """§2.2; also the peer route, where a sibling process forwards a call for a device
    we hold (§5): that one is served here or not at all, never forwarded again."""
    app = request.app  # a property lookup each time, on the busiest route
    forward = not request.path.startswith(PEER_PREFIX)
    if app[SHUTDOWN].draining:
        raise ApiError(503, codes.GATEWAY_SHUTDOWN, "the gateway is shutting down")
    body = await _json_body(request)
    user_id = _id_field(body, "user_id", required=True)
    device_id = _id_field(body, "device_id", required=False)
    tool = body.get("tool")
    if not isinstance(tool, str) or not tool.strip() or len(tool) > TOOL_NAME_MAX:
        raise _bad(f"'tool' must be a non-empty string of at most {TOOL_NAME_MAX} characters")
    args = body.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _bad("'args' must be a JSON object")
    timeout_s = _seconds(body, "timeout_s", 30.0, MAX_TIMEOUT_S)
    max_timeout_s = _seconds(body, "max_timeout_s", min(10 * timeout_s, MAX_HARD_TIMEOUT_S),
                             MAX_HARD_TIMEOUT_S)
    if max_timeout_s < timeout_s:
        raise _bad("'max_timeout_s' must not be less than 'timeout_s'")
    assert user_id is not None

    metrics = app[METRICS]
    # Our own registry first: a local device costs no database round trip.
    conn = app[REGISTRY].pick(user_id, device_id)
    if conn is None and forward:
        presence = app[PRESENCE]
        row, cached = await presence.locate(user_id, device_id)
        if row is not None:
            forwarded = await _forward_call(request, row, body, max_timeout_s)
            if cached and (forwarded is None or forwarded.status == 404):
                # Remembered, and gone from there: it may have moved on. Look once more.
                row, _ = await presence.locate(user_id, device_id, fresh=True)
                forwarded = (await _forward_call(request, row, body, max_timeout_s)
                             if row is not None else None)
            if forwarded is not None:
                return forwarded
            metrics.tool_calls.inc(codes.DEVICE_OFFLINE)
            raise ApiError(404, codes.DEVICE_OFFLINE, "the device's gateway process cannot "
                           "be reached", device_id=device_id)
    if conn is None:
        metrics.tool_calls.inc(codes.DEVICE_OFFLINE)
        raise ApiError(404, codes.DEVICE_OFFLINE, "no connected device for this user"
                       if device_id is None else "the device is not connected")
    started = time.perf_counter()
    outcome = "ok"
    try:
        result = await conn.call(tool=tool, args=args, timeout_s=timeout_s,
                                 max_timeout_s=max_timeout_s)
        outcome = "ok" if result.ok else "tool_error"
    except CallFailed as exc:
        outcome = exc.code
        raise ApiError(CALL_FAILURE_STATUS.get(exc.code, 502), exc.code, exc.message,
                       device_id=conn.device_id) from None
    except asyncio.CancelledError:
        outcome = "caller_gone"
        raise
    finally:
        elapsed = time.perf_counter() - started
        metrics.tool_call(outcome, elapsed)
        # round(x * 1e5) / 100, not round(x * 1000, 2): the same figure without
        # the decimal-string detour a round to digits takes.
        log.info("tool_call", user_id=user_id, device_id=conn.device_id, tool=tool,
                 outcome=outcome, duration_ms=round(elapsed * 100_000) / 100)
    answer: dict[str, Any] = {"call_id": result.id, "device_id": conn.device_id, "ok": result.ok}
    if result.ok:
        answer["result"] = result.result
    else:
        answer["error"] = {"code": result.error_code, "message": result.error_message}
    return json_response(answer)


async def _forward_call(request: web.Request, row: PresenceRow, body: dict[str, Any],
                        max_timeout_s: float) -> web.Response | None:
    """The owner's answer, verbatim; None when it cannot be reached (nothing delivered).

    Cancelled with us (the caller went away): so is the request, and the
    owner's handler, which sends tool_cancel caller_gone.
    """
    if not row.advertise_url:
        return None
    started = time.perf_counter()
    outcome = "forwarded"
    try:
        answer = await request.app[PEERS].tool_call(
            row.advertise_url, {**body, "device_id": row.device_id}, max_timeout_s)
    except PeerUnreachable:
        outcome = "unreachable"
        return None
    except PeerFailed:
        outcome = codes.DEVICE_DISCONNECTED
        raise ApiError(503, codes.DEVICE_DISCONNECTED, "the device's gateway process went "
                       "away during the call", device_id=row.device_id) from None
    except asyncio.CancelledError:
        outcome = "caller_gone"
        raise
    finally:
        elapsed = time.perf_counter() - started
        request.app[METRICS].calls_forwarded.labels(outcome).inc()
        log.info("tool_call_forwarded", user_id=row.user_id, device_id=row.device_id,
                 instance_id=row.instance_id, outcome=outcome,
                 duration_ms=round(elapsed * 1000, 2))
    return web.Response(status=answer.status, body=answer.body,
                        content_type=answer.content_type.split(";")[0])


async def peer_dispatch_run(request: web.Request) -> web.Response:
    """A sibling process created a due run for a device we hold: dispatch it here."""
    record = await request.app[RUNS].dispatch_here(_run_id(request))
    if record is None:
        raise ApiError(404, codes.DEVICE_OFFLINE, "no fitting device here, or not pending")
    return json_response(record.as_json())


# ---------------------------------------------------------------- runs


async def create_run(request: web.Request) -> web.Response:
    body = await _json_body(request)
    user_id = _id_field(body, "user_id", required=True)
    agent_id = _id_field(body, "agent_id", required=True)
    device_id = _id_field(body, "device_id", required=False)
    input_value = body.get("input", {})
    if problem := jsonb_problem(input_value):
        raise _bad(f"'input' cannot be stored: {problem}")
    scheduled_at = body.get("scheduled_at")
    moment = _parse_time(scheduled_at) if scheduled_at is not None else None
    assert user_id is not None and agent_id is not None
    record = await _to_the_end(request.app[RUNS].create(
        user_id=user_id, agent_id=agent_id, device_id=device_id, input_value=input_value,
        scheduled_at=moment), "create_run")
    return json_response(record.as_json(), status=201)


async def _record_or_404(store: Store, run_id: uuid.UUID) -> RunRecord:
    record = await store.get_run(run_id)
    if record is None:
        raise ApiError(404, codes.RUN_NOT_FOUND, "no such run")
    return record


async def get_run(request: web.Request) -> web.Response:
    record = await _record_or_404(request.app[RUNS].store, _run_id(request))
    return json_response(record.as_json())


async def list_runs(request: web.Request) -> web.Response:
    user_id = _query_id(request, "user_id")
    status = request.query.get("status")
    if status is not None and status not in RUN_STATUSES:
        raise _bad(f"'status' must be one of {', '.join(sorted(RUN_STATUSES))}")
    limit_text = request.query.get("limit", str(LIST_LIMIT_DEFAULT))
    try:
        limit = int(limit_text)
    except ValueError:
        raise _bad("'limit' must be an integer") from None
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise _bad(f"'limit' must be 1-{LIST_LIMIT_MAX}")
    records = await request.app[RUNS].store.list_runs(
        user_id=user_id, status=status, limit=limit)
    return json_response({"runs": [r.as_json() for r in records]})


async def cancel_run(request: web.Request) -> web.Response:
    run_id = _run_id(request)
    try:
        record = await _to_the_end(request.app[RUNS].cancel(run_id), "cancel_run")
    except RunNotFound:
        raise ApiError(404, codes.RUN_NOT_FOUND, "no such run") from None
    except RunAlreadyFinished as exc:
        raise ApiError(409, codes.RUN_FINISHED, f"the run is already {exc.record.status}",
                       run=exc.record.as_json()) from None
    return json_response(record.as_json())


async def run_events(request: web.Request) -> web.StreamResponse:
    """Stored events after ``after``, then live ones, until the run ends (§2.3)."""
    run_id = _run_id(request)
    after_text = request.query.get("after", "0")
    try:
        after = int(after_text)
    except ValueError:
        raise _bad("'after' must be an integer") from None
    if not 0 <= after <= MAX_SEQ:
        raise _bad(f"'after' must be 0-{MAX_SEQ}")
    await _record_or_404(request.app[RUNS].store, run_id)
    sse = "text/event-stream" in request.headers.get("Accept", "")
    return await stream_run_events(request, run_id, after=after, sse=sse)


def add_routes(app: web.Application, *, wrap: Callable[[Handler], Handler],
               expect: ExpectHandler | None = None) -> None:
    """The internal API's routes, each inside the listener's envelope ``wrap``.

    Every route here is in gateway/openapi.json (tests/test_openapi.py checks).
    ``expect`` answers ``Expect: 100-continue`` (aiohttp's default when None).
    """
    router = app.router
    more: dict[str, Any] = {} if expect is None else {"expect_handler": expect}
    router.add_get(f"{PREFIX}/openapi.json", wrap(document_handler()), **more)
    router.add_get(f"{PREFIX}/devices", wrap(list_devices), **more)
    router.add_post(f"{PREFIX}/tool-calls", wrap(create_tool_call), **more)
    router.add_post(f"{PREFIX}/runs", wrap(create_run), **more)
    router.add_get(f"{PREFIX}/runs", wrap(list_runs), **more)
    router.add_get(f"{PREFIX}/runs/{{run_id}}", wrap(get_run), **more)
    router.add_get(f"{PREFIX}/runs/{{run_id}}/events", wrap(run_events), **more)
    router.add_post(f"{PREFIX}/runs/{{run_id}}/cancel", wrap(cancel_run), **more)
    # Between gateway processes (PROTOCOL.md §5), same service tokens.
    router.add_post(f"{PEER_PREFIX}/tool-calls", wrap(create_tool_call), **more)
    router.add_post(f"{PEER_PREFIX}/runs/{{run_id}}/dispatch", wrap(peer_dispatch_run), **more)
