"""Which TCP connections the two listeners keep: a header deadline and a file budget.

aiohttp's only timer before a connection's first request is
``keepalive_timeout`` (3630 s by default): a client that connected and then
trickled, or never finished, its request headers held a file descriptor for
an hour without counting toward ``GATEWAY_MAX_CONNECTIONS``. A few hundred
used up the process's open files; every listener then stalled, and asyncio
(3.11) logged thousands of accept errors a second, since on EMFILE it retries
the whole backlog and reschedules itself once per try.

So each new connection gets a timer, and one whose first request was not
parsed when it fires is dropped (later requests on a kept-alive connection
are bounded by ``KEEPALIVE_S``: aiohttp closes a connection that waits that
long for its next request, whole or partial). And the listeners together
hold at most the open-file limit less a reserve for the database pool, logs
and the process itself: a connection past that is dropped as it arrives, so
``accept`` never fails for want of a descriptor. Accept errors that happen
anyway are logged once a second with a count, without a traceback.

aiohttp has no hook for this, so the attributes of its ``Server`` that see a
connection arrive (``connection_made``), leave (``connection_lost``) and its
first request parsed (``request_factory``) are wrapped on the one server
instance of each listener.
"""

from __future__ import annotations

import asyncio
import math
import resource
from typing import Any

import attrs
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger(__name__)

# Idle time allowed between requests on a kept-alive connection: longer than
# common clients' own idle timeouts (aiohttp's 15 s), so a client rarely reuses
# a connection the gateway is closing at that moment; nginx's default.
KEEPALIVE_S = 75.0
# Descriptors kept for everything but client connections: the database pool,
# log files, the event loop's own, a connection being shed.
FD_RESERVE_MIN = 64
FD_RESERVE_SHARE = 1 / 16
# At most one line per this many seconds about shed connections or accept errors.
REPORT_EVERY_S = 1.0
ACCEPT_ERROR = "socket.accept() out of system resource"


def connection_budget(fd_limit: int) -> int:
    """Client connections both listeners may hold under an open-file limit."""
    return max(1, fd_limit - max(FD_RESERVE_MIN, int(fd_limit * FD_RESERVE_SHARE)))


@attrs.define(eq=False)
class Admission:
    header_timeout_s: float
    max_held: int
    # Connections held now (counted, not kept: a dict entry per idle device was
    # memory per idle device).
    _held: int = 0
    # Held connections still awaiting their first request, with its deadline.
    _awaiting: dict[RequestHandler, asyncio.TimerHandle] = attrs.Factory(dict)
    # Connections shed as they arrived, until aiohttp reports them lost: never counted.
    _shedding: set[RequestHandler] = attrs.Factory(set)
    _shed: int = 0
    _accept_errors: int = 0
    _reported_at: float = -math.inf

    @classmethod
    def for_this_process(cls, header_timeout_s: float) -> Admission:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        budget = connection_budget(soft) if soft != resource.RLIM_INFINITY else 1 << 30
        return cls(header_timeout_s=header_timeout_s, max_held=budget)

    @property
    def held(self) -> int:
        return self._held

    def attach(self, server: web.Server) -> None:
        """Apply the deadline and the budget to ``server``'s connections."""
        loop = asyncio.get_running_loop()
        connection_made = server.connection_made
        connection_lost = server.connection_lost
        request_factory = server.request_factory
        awaiting = self._awaiting
        shedding = self._shedding

        def expire(handler: RequestHandler, transport: asyncio.Transport) -> None:
            if awaiting.pop(handler, None) is not None and not transport.is_closing():
                # abort, not close: nothing was answered, and descriptors are what
                # is short when this matters.
                transport.abort()

        def on_connection(handler: RequestHandler, transport: asyncio.Transport) -> None:
            connection_made(handler, transport)
            if self._held >= self.max_held:
                self._shed += 1
                self._report(loop.time())
                shedding.add(handler)
                transport.abort()
                return
            self._held += 1
            awaiting[handler] = loop.call_later(self.header_timeout_s, expire, handler, transport)

        def on_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            if handler in shedding:
                shedding.discard(handler)
            else:
                self._held -= 1
                timer = awaiting.pop(handler, None)
                if timer is not None:
                    timer.cancel()
            connection_lost(handler, exc)

        def on_request(message: Any, payload: Any, protocol: RequestHandler, writer: Any,
                       task: Any) -> web.BaseRequest:
            timer = awaiting.pop(protocol, None)
            if timer is not None:
                timer.cancel()
            return request_factory(message, payload, protocol, writer, task)

        server.connection_made = on_connection  # type: ignore[method-assign]
        server.connection_lost = on_lost  # type: ignore[method-assign]
        server.request_factory = on_request

    def handle_loop_exception(self, loop: asyncio.AbstractEventLoop,
                              context: dict[str, Any]) -> None:
        """The event loop's exception handler: accept errors counted, not each logged."""
        if context.get("message") == ACCEPT_ERROR:
            self._accept_errors += 1
            self._report(loop.time())
            return
        loop.default_exception_handler(context)

    def _report(self, now: float) -> None:
        if now - self._reported_at < REPORT_EVERY_S:
            return
        self._reported_at = now
        log.warning("connections_over_budget", shed=self._shed,
                    accept_errors=self._accept_errors, held=self._held,
                    max_held=self.max_held)
        self._shed = self._accept_errors = 0
