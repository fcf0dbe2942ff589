"""The envelope of both listeners: JSON errors, and for the internal API request ids and auth.

Every error leaves as ``{"error": code, "detail": ...}`` (PROTOCOL.md §2).
Wrappers per route, not aiohttp middleware: an application with any
middleware makes aiohttp build a chain of wrappers and run its own
current-app middleware on every request, a measurable share of a tool call
(benchmarks/RESULTS.md). ``route_miss``, registered last, sends
routing misses through the same envelope.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import HttpVersion11, web
from aiohttp.typedefs import Handler

from gateway.auth import ServiceTokens, bearer_token
from gateway.wire import codes

log = structlog.get_logger(__name__)


class ApiError(Exception):
    """An error answer: ``{"error": code, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def error_response(status: int, code: str, detail: str, **extra: Any) -> web.Response:
    return json_response({"error": code, "detail": detail, **extra}, status=status)


HTTP_ERROR_CODES = {
    404: codes.NOT_FOUND,
    405: codes.METHOD_NOT_ALLOWED,
    413: codes.PAYLOAD_TOO_LARGE,
}


def _response_started(request: web.Request) -> bool:
    """Bytes of a response already went out (a stream, a WebSocket's 101).

    A handler failing then cannot be answered with an error response: it would
    be written into the middle of the first one. Re-raised, aiohttp logs it
    and closes the connection (its own handle_error makes the same check).
    """
    return request.writer is not None and request.writer.output_size > 0


def _error_response(request: web.Request, exc: Exception) -> web.Response:
    """The {"error", "detail"} answer for an exception a handler raised."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.detail, **exc.extra)
    if isinstance(exc, web.HTTPException):
        code = HTTP_ERROR_CODES.get(exc.status, codes.BAD_REQUEST)
        response = error_response(exc.status, code, exc.reason)
        if "Allow" in exc.headers:  # a 405 must say which methods work (RFC 9110 §15.5.6)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    log.error("request_failed", path=request.path, error=repr(exc), exc_info=exc)
    return error_response(500, codes.INTERNAL, "internal error")


def json_errors(handler: Handler) -> Handler:
    """The public listener's envelope: every error leaves as {"error", "detail"}.

    It also keeps the device WebSocket handler, held for a connection's whole
    life, one frame lighter than a middleware would.
    """

    async def with_json_errors(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if _response_started(request) or (
                    isinstance(exc, web.HTTPException) and exc.status < 400):
                raise
            return _error_response(request, exc)

    with_json_errors.__name__ = with_json_errors.__qualname__ = handler.__name__
    return with_json_errors


def envelope(tokens: ServiceTokens) -> Callable[[Handler], Handler]:
    """Wrap a handler in the internal API's envelope: request id, service auth, JSON errors.


    A caller's own ``X-Request-Id`` is kept; otherwise ids are a random per-app
    prefix plus a counter. The id
    is in every log line of the request and in the response, errors included.
    (a uuid4 per request was a measurable share of a tool call).
    """
    prefix = uuid.uuid4().hex[:12]
    counter = itertools.count(1)

    def wrap(handler: Handler) -> Handler:
        async def enveloped(request: web.Request) -> web.StreamResponse:
            headers = request.headers
            given = headers.get("X-Request-Id", "")
            if 0 < len(given) <= 128 and given.isprintable():
                request_id = given
            else:
                request_id = f"{prefix}-{next(counter)}"
            # Each request on a keep-alive connection rebinds it before logging, so
            # a plain bind (cheaper than a bind/reset context manager) cannot leak.
            structlog.contextvars.bind_contextvars(request_id=request_id)
            response: web.StreamResponse
            try:
                token = bearer_token(headers.get("Authorization"))
                if token is None or not tokens.accepts(token):
                    raise ApiError(401, codes.UNAUTHORIZED,
                                   "a valid service bearer token is required")
                response = await handler(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _response_started(request):
                    raise
                if isinstance(exc, web.HTTPException) and exc.status < 400:
                    exc.headers["X-Request-Id"] = request_id  # a redirect stays one
                    raise
                response = _error_response(request, exc)
            if not response.prepared:
                response.headers["X-Request-Id"] = request_id
            return response

        enveloped.__name__ = enveloped.__qualname__ = handler.__name__
        return enveloped

    return wrap


ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def expect_continue(tokens: ServiceTokens) -> ExpectHandler:
    """The internal API's ``Expect: 100-continue`` answer: the token first.

    aiohttp's own handler sends "100 Continue" before any handler runs, so a
    caller without a token was invited to send its body. Here a missing or
    wrong token gets its 401 at once (and the connection closes: the body the
    caller may still send is never read).
    """

    async def expect(request: web.Request) -> web.StreamResponse | None:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None or not tokens.accepts(token):
            response = error_response(401, codes.UNAUTHORIZED,
                                      "a valid service bearer token is required")
            response.force_close()
            return response
        if request.headers.get("Expect", "").lower() != "100-continue":
            response = error_response(417, codes.BAD_REQUEST,
                                      "only 'Expect: 100-continue' is understood")
            response.force_close()
            return response
        if request.version == HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            # As aiohttp's own handler: the interim answer is not the response.
            request.writer.output_size = 0
        return None

    return expect


async def route_miss(request: web.Request) -> web.Response:
    """What no route matched: 405 with Allow when the path exists, else 404.

    Registered last, for every method and path, so that misses get the
    envelope too (a token check first, so routes cannot be probed without one).
    """
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _match, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))
    raise web.HTTPNotFound()
