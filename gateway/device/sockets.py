"""Every device socket the process holds: counted, found by a drain, dropped when it must be.

Registered devices are in the ``Registry``; this also sees sockets that are
still upgrading or waiting for their ``device_hello``, which count toward
``GATEWAY_MAX_CONNECTIONS`` and must be closed by a drain too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import attrs
from aiohttp import web

from gateway.wire.codes import CloseCode


@attrs.define(eq=False)
class DeviceSockets:
    # Every device socket held, upgraded or upgrading, with its request (which
    # has the transport): dropped outright when a drain runs out of time.
    _held: dict[web.WebSocketResponse, web.BaseRequest] = attrs.Factory(dict)
    # Upgraded sockets still waiting for their device_hello: in no registry yet.
    _before_hello: set[web.WebSocketResponse] = attrs.Factory(set)
    # Sockets held and not yet past their hello, by user: one user's token must
    # not take every connection slot with sockets that never say hello.
    _pending_user: dict[web.WebSocketResponse, str] = attrs.Factory(dict)
    _pending_count: dict[str, int] = attrs.Factory(dict)
    _none_held: asyncio.Event = attrs.Factory(asyncio.Event)

    def __len__(self) -> int:
        return len(self._held)

    def opened(self, ws: web.WebSocketResponse, request: web.BaseRequest,
               user_id: str) -> None:
        self._held[ws] = request
        self._pending_user[ws] = user_id
        self._pending_count[user_id] = self._pending_count.get(user_id, 0) + 1
        self._none_held.clear()

    def pending_of(self, user_id: str) -> int:
        """Sockets of ``user_id`` held and not yet past their hello."""
        return self._pending_count.get(user_id, 0)

    def hello_done(self, ws: web.WebSocketResponse) -> None:
        """``ws`` said hello (or failed to): it no longer counts as pending."""
        user_id = self._pending_user.pop(ws, None)
        if user_id is None:
            return
        left = self._pending_count[user_id] - 1
        if left:
            self._pending_count[user_id] = left
        else:
            del self._pending_count[user_id]

    def closed(self, ws: web.WebSocketResponse) -> None:
        self.hello_done(ws)
        self._held.pop(ws, None)
        self._before_hello.discard(ws)
        if not self._held:
            self._none_held.set()

    @contextlib.contextmanager
    def awaiting_hello(self, ws: web.WebSocketResponse) -> Iterator[None]:
        self._before_hello.add(ws)
        try:
            yield
        finally:
            self._before_hello.discard(ws)

    async def close_before_hello(self) -> None:
        """Close sockets still in their hello with 1001 (they would hold a drain up)."""
        await asyncio.gather(*(
            ws.close(code=CloseCode.GOING_AWAY, message=b"gateway shutting down")
            for ws in list(self._before_hello)
        ), return_exceptions=True)

    async def wait_none_held(self) -> None:
        if self._held:
            await self._none_held.wait()

    def abort_all(self) -> int:
        """Drop the TCP connection of every device socket still held; how many.

        The drain's last resort for peers that never finish the close handshake
        (or cannot even take the close frame): their handlers then end, and run
        their cleanup, at once.
        """
        aborted = 0
        for request in list(self._held.values()):
            transport = request.transport
            if transport is not None:
                transport.abort()
                aborted += 1
        return aborted


DEVICE_SOCKETS = web.AppKey("device_sockets", DeviceSockets)
