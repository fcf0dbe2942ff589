"""The device WebSocket route: handshake checks, hello, receive loop, the one cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import Awaitable
from typing import Literal

import attrs
import structlog
from aiohttp import WSMsgType, web

from gateway.auth import AUTHENTICATOR, AuthError, bearer_token
from gateway.cluster.presence import PRESENCE
from gateway.config import SETTINGS, Settings
from gateway.device.connection import Connection, ConnectionGone
from gateway.device.handlers import DEVICE_CONTEXT, dispatch_now, refuse
from gateway.device.outbox import MIN_QUEUED_BYTES
from gateway.device.registry import REGISTRY
from gateway.device.sockets import DEVICE_SOCKETS
from gateway.metrics import METRICS, Metrics
from gateway.proxies import client_address
from gateway.runs.lifecycle import RUNS, Gone
from gateway.shutdown import SHUTDOWN
from gateway.store import PresenceRow
from gateway.wire import codes, frames, messages
from gateway.wire.codes import CloseCode
from gateway.wire.frames import FrameError, Hello

log = structlog.get_logger(__name__)

# Close-handshake budget: how long we wait for a peer to answer our close frame.
CLOSE_TIMEOUT_S = 5.0
# A WebSocket close reason is at most 123 bytes.
MAX_CLOSE_REASON = 120
# Of 1.5 x GATEWAY_HEARTBEAT_S, the share aiohttp's own timers may use; the rest
# is for a busy event loop.
HEARTBEAT_BUDGET = 0.9
# aiohttp rounds a timer longer than this up to the next whole second.
AIOHTTP_CEIL_THRESHOLD_S = 5.0
# Close codes a metric label may carry: ours, and those RFC 6455 gives a
# meaning; anything else a device picks is "other" (one label value each
# would make the metric unbounded).
CLOSE_CODE_LABELS = frozenset({*(int(c) for c in CloseCode), 1002, 1003, 1005, 1006, 1007,
                               1010, 1012, 1013, 1014, 1015})


def close_label(code: int | None) -> str:
    """The metric label of a close code: from a fixed set."""
    if code is None:
        return "none"
    return str(int(code)) if int(code) in CLOSE_CODE_LABELS else "other"


def aiohttp_heartbeat(heartbeat_s: float) -> float:
    """The value for aiohttp so that a silent peer is gone within 1.5 x ``heartbeat_s``.

    aiohttp pings ``h`` after the last frame received and drops the peer if no
    pong came ``h / 2`` later; each of those timers, when longer than 5 s, is
    rounded up to a whole second of the loop clock. So a peer is dropped within
    1.5 h + (up to) 2 s: 47 s for h = 30, more on a busy loop. We hand aiohttp
    a shorter ``h`` so that 1.5 h + rounding fits 90 % of the promise.
    """
    target = 1.5 * heartbeat_s * HEARTBEAT_BUDGET
    for rounding in (0, 1, 2):
        h = (target - rounding) / 1.5
        rounded = (h > AIOHTTP_CEIL_THRESHOLD_S) + (h / 2 > AIOHTTP_CEIL_THRESHOLD_S)
        if rounded <= rounding:
            return h
    raise AssertionError("unreachable: two roundings at most")


@attrs.frozen
class DeviceOptions:
    """What every device socket of the process is built with, computed once.

    Shared by all connections: a float or a large int computed per connection
    is memory per idle device, for ever the same value.
    """

    aiohttp_heartbeat_s: float
    # aiohttp refuses a message of exactly max_msg_size; the contract closes only
    # larger ones (the receive loop checks the exact bound, compressed frames too).
    max_msg_size: int
    max_queued_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> DeviceOptions:
        return cls(aiohttp_heartbeat_s=aiohttp_heartbeat(settings.heartbeat_s),
                   max_msg_size=settings.max_frame_bytes + 1,
                   max_queued_bytes=max(MIN_QUEUED_BYTES, 4 * settings.max_frame_bytes))


DEVICE_OPTIONS = web.AppKey("device_options", DeviceOptions)


def _handshake_failed(request: web.Request, exc: Exception) -> web.Response:
    """What ``json_errors`` answers on the other public routes, for the upgrade."""
    if request.writer is not None and request.writer.output_size > 0:
        raise exc  # the 101 is out: nothing else can be answered
    metrics = request.app[METRICS]
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return _refuse_handshake(metrics, exc.status, codes.BAD_REQUEST, exc.reason)
    log.error("device_handshake_failed", error=repr(exc), exc_info=exc)
    return _refuse_handshake(metrics, 500, codes.INTERNAL, "internal error")


def _refuse_handshake(metrics: Metrics, status: int, error: str, detail: str) -> web.Response:
    metrics.handshakes_refused.labels(error).inc()
    return web.json_response({"error": error, "detail": detail}, status=status)


def _close_reason(text: str) -> bytes:
    return text.encode()[:MAX_CLOSE_REASON]


async def device_ws(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/ws/device — PROTOCOL.md §1: handshake, hello, the connection's life.

    This frame is held for the whole connection, so it is the only one: the
    handshake's checks (``_admit``), the hello (``_hello``) and the welcome
    (``_welcome``) are frames of their own that end before the receive loop;
    the loop and the cleanup are here. Not wrapped in ``json_errors`` like the
    other public routes, for the same reason (memory per idle device); errors
    before the upgrade still leave as JSON.
    """
    try:
        admitted = _admit(request)
    except Exception as exc:
        return _handshake_failed(request, exc)
    if isinstance(admitted, web.Response):
        return admitted
    ws, user_id, expires_at, remote = admitted
    del admitted  # this frame lives as long as the connection: hold no more than it needs
    app = request.app
    sockets = app[DEVICE_SOCKETS]
    sockets.opened(ws, request, user_id)
    try:
        try:
            await ws.prepare(request)
        except Exception as exc:
            return _handshake_failed(request, exc)
        # The 101's headers are written; kept, they would be ~0.5 KB per idle
        # device for the connection's whole life (nothing reads them again).
        ws.headers.clear()
        app[METRICS].connections_opened.inc()
        # This handler is its connection's own task, so the binding ends with it
        # (and a plain bind holds less per connection than nested contexts).
        structlog.contextvars.bind_contextvars(user_id=user_id, remote=remote)
        del remote
        said_hello = await _hello(app, ws, user_id, request.transport)
        if said_hello is None:
            return ws
        conn, holder = said_hello
        del said_hello
        ctx = app[DEVICE_CONTEXT]
        started = time.monotonic()
        try:
            await _welcome(app, conn, expires_at, holder)
            del holder
            max_frame_bytes = app[SETTINGS].max_frame_bytes
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.TEXT:
                    if len(msg.data) > max_frame_bytes:  # one byte over aiohttp's own bound
                        conn.request_close(CloseCode.TOO_BIG, "frame too big")
                        break
                    waiting = dispatch_now(ctx, conn, msg.data)
                    if waiting is not None:
                        await waiting
                elif msg.type is WSMsgType.BINARY:
                    conn.frames_in += 1
                    refuse(ctx, conn, codes.BAD_FRAME, "binary frames are not accepted", None)
                else:  # CLOSE, CLOSING, CLOSED, ERROR: the socket is done
                    break
        except ConnectionGone:
            pass
        except Exception as exc:
            log.exception("device_connection_failed", error=repr(exc))
            conn.mark_closing(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            # aiohttp cancels the handler of a peer that went away (handler_cancellation,
            # always on in its test server) and at shutdown; the cleanup must still
            # finish, or the device's runs stay `running` until the next restart (§1.7).
            # So it runs as its own task, which the handler still awaits when cancelled.
            cleanup = asyncio.ensure_future(_cleanup(app, ws, conn, started))
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                await cleanup
                raise
    finally:
        sockets.closed(ws)
    return ws


def _admit(
    request: web.Request,
) -> tuple[web.WebSocketResponse, str, float | None, str | None] | web.Response:
    """The handshake's checks (§1.1): the socket to prepare with the token's user and
    expiry and the device's address, or the refusal to answer."""
    app = request.app
    settings = app[SETTINGS]
    metrics = app[METRICS]
    sockets = app[DEVICE_SOCKETS]
    if app[SHUTDOWN].draining:
        return _refuse_handshake(metrics, 503, codes.SHUTTING_DOWN,
                                 "the gateway is shutting down")
    if len(sockets) >= settings.max_connections:
        return _refuse_handshake(metrics, 503, codes.OVER_CAPACITY,
                                 "the gateway holds its maximum of connections")
    remote = client_address(request, settings.trusted_proxies)  # the device's, not a proxy's
    token = _query_token(request) or bearer_token(request.headers.get("Authorization"))
    try:
        claims = app[AUTHENTICATOR].verify(token or "")
    except AuthError as exc:
        log.info("device_auth_refused", reason=str(exc), remote=remote)
        return _refuse_handshake(metrics, 401, codes.UNAUTHORIZED, str(exc))

    if sockets.pending_of(claims.user_id) >= settings.max_hello_pending_per_user:
        log.info("device_refused_too_many_handshakes", user_id=claims.user_id,
                 limit=settings.max_hello_pending_per_user, remote=remote)
        return _refuse_handshake(metrics, 429, codes.TOO_MANY_HANDSHAKES,
                                 "this user holds its maximum of sockets awaiting device_hello")

    options = app[DEVICE_OPTIONS]
    ws = web.WebSocketResponse(
        heartbeat=options.aiohttp_heartbeat_s, autoping=True,
        max_msg_size=options.max_msg_size, timeout=CLOSE_TIMEOUT_S,
        decode_text=False,
        # Off by default (PROTOCOL §4): a deflate context costs ~100 KB per device.
        # When on, aiohttp checks max_msg_size against the inflated message.
        compress=settings.ws_compress,
    )
    if not ws.can_prepare(request).ok:
        return _refuse_handshake(metrics, 400, codes.BAD_REQUEST,
                                 "a WebSocket upgrade is required")
    return ws, claims.user_id, claims.expires_at, remote


def _query_token(request: web.Request) -> str | None:
    """The first ``token`` query parameter (§1.1), read without ``request.query``:
    that parse stays cached on the request for the socket's whole life (a second
    copy of the token and a multidict per idle device). Through ``rel_url``, which
    aiohttp's router has already cached, not ``raw_path``: one more cached
    property would grow the request's cache past its first table."""
    query = request.rel_url.raw_query_string
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name == "token":
            return value
    return None


async def _receive_hello(ws: web.WebSocketResponse, timeout_s: float) -> Hello | None:
    """The first frame must be a valid device_hello; anything else closes with 1008."""
    try:
        # One deadline for the whole wait: receive(timeout=) restarts after every
        # ping or pong it handles, so a live peer that never says hello would stay.
        async with asyncio.timeout(timeout_s):
            msg = await ws.receive()
    except TimeoutError:
        await _close(ws, CloseCode.POLICY, "device_hello timeout")
        return None
    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
        return None
    if msg.type is not WSMsgType.TEXT:
        await _close(ws, CloseCode.POLICY, "expected a device_hello text frame")
        return None
    try:
        return frames.parse_hello(frames.decode(msg.data))
    except FrameError as exc:
        log.info("device_hello_refused", reason=exc.message)
        await _close(ws, CloseCode.POLICY, f"bad device_hello: {exc.message}")
        return None


async def _close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.close(code=code, message=_close_reason(reason))


@attrs.define(eq=False)
class _Socket:
    """A connection's way to its WebSocket: what ``Connection`` calls to send and close."""

    ws: web.WebSocketResponse
    transport: asyncio.Transport | None

    def send(self, frame: bytes) -> Awaitable[None]:
        # aiohttp's own coroutine, no wrapper of ours per frame; the connection
        # counts what was written (frame_written).
        return self.ws.send_frame(frame, WSMsgType.TEXT)

    async def close(self, code: int, reason: str) -> None:
        closing = asyncio.ensure_future(self.ws.close(code=code, message=_close_reason(reason)))
        # Waited for, never cancelled: a close stuck in aiohttp's drain shares one
        # future with every send stuck there, and cancelling it cancels them all.
        await asyncio.wait([closing], timeout=CLOSE_TIMEOUT_S)
        if not closing.done() and self.transport is not None:
            # Not even the close frame could be written: the peer stopped reading and
            # its TCP window is full. Drop it, or this handler (its cleanup, the drain)
            # would wait for as long as the kernel keeps probing the window.
            self.transport.abort()
        await closing


async def _hello(
    app: web.Application, ws: web.WebSocketResponse, user_id: str,
    transport: asyncio.Transport | None,
) -> tuple[Connection, PresenceRow | None] | None:
    """The device_hello and the per-user limit: the new connection (not registered
    yet) with the other process holding the device now, if one does; None when
    the socket was closed instead."""
    settings = app[SETTINGS]
    metrics = app[METRICS]
    sockets = app[DEVICE_SOCKETS]
    with sockets.awaiting_hello(ws):
        hello = await _receive_hello(ws, settings.hello_timeout_s)
    sockets.hello_done(ws)
    if hello is None:
        metrics.connections_closed.labels(close_label(ws.close_code)).inc()
        return None
    structlog.contextvars.bind_contextvars(device_id=hello.device_id)
    holder = await _within_limit(app, ws, user_id, hello.device_id)
    if holder is False:
        return None
    conn = Connection(
        user_id=user_id, device_id=hello.device_id, agent_ids=hello.agent_ids,
        socket=_Socket(ws, transport), sent_tally=metrics.frames_out,
        expiries=app[DEVICE_CONTEXT].expiries,
        max_inflight_calls=settings.max_inflight_calls_per_device,
        max_queued_bytes=app[DEVICE_OPTIONS].max_queued_bytes,
        event_acks=hello.event_acks,
    )
    return conn, holder


async def _within_limit(app: web.Application, ws: web.WebSocketResponse, user_id: str,
                        device_id: str) -> PresenceRow | Literal[False] | None:
    """The per-user device limit, counted on every live process (PROTOCOL.md §5).

    False: refused (closed 4005). Otherwise the other live process that holds
    this device now, if one does (the same look says both).
    """
    settings = app[SETTINGS]
    at_hello = None
    if app[REGISTRY].other_device_count(user_id, device_id) < settings.max_devices_per_user:
        at_hello = await app[PRESENCE].at_hello(user_id, device_id)
    if at_hello is None or at_hello.other_devices >= settings.max_devices_per_user:
        log.info("device_refused_too_many", limit=settings.max_devices_per_user)
        await _close(ws, CloseCode.TOO_MANY_DEVICES, "too_many_devices")
        app[METRICS].connections_closed.labels(close_label(CloseCode.TOO_MANY_DEVICES)).inc()
        return False
    return at_hello.holder


async def _welcome(app: web.Application, conn: Connection, expires_at: float | None,
                   holder: PresenceRow | None) -> None:
    """Registered, its runs taken over, resumed and claimed, then ``hello_ack`` and
    the claimed runs' ``agent_run``."""
    settings = app[SETTINGS]
    registry = app[REGISTRY]
    metrics = app[METRICS]
    runs = app[RUNS]
    presence = app[PRESENCE]
    # The device's turn, from registration to the ack: an earlier connection's
    # cleanup cannot detach runs this hello is taking over, nor a second hello
    # resume them twice (gateway/runs/continuity.py).
    async with runs.continuity.turn(conn.user_id, conn.device_id):
        previous = registry.register(conn)
        metrics.devices_connected.set(len(registry))
        if previous is not None:
            log.info("device_replaced", old_connection_id=previous.connection_id)
            previous.request_close(CloseCode.REPLACED, "replaced")
        conn.arm_expiry(expires_at)
        log.info("device_connected", connection_id=conn.connection_id,
                 agent_ids=list(conn.agent_ids), replaced=previous is not None,
                 event_acks=conn.event_acks)
        if holder is not None:
            # Another process holds the device: it closes it with 4000 and
            # detaches its runs, which the resume below then takes over.
            log.info("device_replaced_elsewhere", holder=holder.instance_id,
                     old_connection_id=holder.connection_id)
            await presence.take_over(holder, conn.connection_id)
        attached = runs.continuity.hand_over(conn) + await runs.continuity.resume(conn)
        claimed = await runs.claim_for(conn, conn.agent_ids)
        await presence.device_up(conn)
        conn.acknowledge(messages.hello_ack(
            connection_id=conn.connection_id, heartbeat_s=settings.heartbeat_s,
            runs=[messages.AttachedRun(str(a.run_id), a.agent_id, a.last_seq)
                  for a in attached]))
    runs.send_claimed(conn, claimed)


async def _cleanup(app: web.Application, ws: web.WebSocketResponse, conn: Connection,
                   started: float) -> None:
    """Exactly this connection's things: its registration, its calls, its runs."""
    draining = app[SHUTDOWN].draining
    registry = app[REGISTRY]
    metrics = app[METRICS]
    if not conn.closing:  # the peer (or the network) ended it, not us
        conn.mark_closing(ws.close_code or CloseCode.NORMAL, "")
    removed = registry.remove(conn)
    metrics.devices_connected.set(len(registry))
    if draining:
        failed_calls = conn.fail_pending(codes.GATEWAY_SHUTDOWN, "the gateway is shutting down")
    else:
        failed_calls = conn.fail_pending(codes.DEVICE_DISCONNECTED, "the device disconnected")
    runs = app[RUNS]
    gone = Gone()
    try:
        reason = (codes.RUN_ERROR_GATEWAY_SHUTDOWN if draining
                  else codes.RUN_ERROR_DEVICE_DISCONNECTED)
        async with runs.continuity.turn(conn.user_id, conn.device_id):
            gone = await runs.target_gone(conn, reason)
    except Exception as exc:  # the restart sweep finds them if the database is down
        metrics.db_errors.labels("device_gone").inc()
        log.error("device_cleanup_failed", error=repr(exc))
    if not ws.closed:
        await _close(ws, conn.close_code or CloseCode.NORMAL, conn.close_reason)
    await conn.wait_closed(CLOSE_TIMEOUT_S)
    code = conn.close_code
    metrics.connections_closed.labels(close_label(code)).inc()
    log.info(
        "device_disconnected", connection_id=conn.connection_id, close_code=code,
        reason=conn.close_reason or None, duration_s=round(time.monotonic() - started, 3),
        frames_in=conn.frames_in, frames_out=conn.frames_out, failed_calls=failed_calls,
        failed_runs=[str(r) for r in gone.failed],
        detached_runs=[str(r) for r in gone.detached], was_current=removed,
    )
    # Last, after its runs are detached: a process waiting to take the device over
    # (PROTOCOL.md §5) resumes them once this row is gone. (A takeover it was told
    # of has already let the device go, in gateway/device/moved.py.)
    await app[PRESENCE].device_down(conn)
