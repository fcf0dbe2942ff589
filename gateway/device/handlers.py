"""The device protocol at a glance: one small function per frame type, one dict.

``dispatch`` validates the envelope, looks the type up in ``HANDLERS`` and
maps every refusal to exactly one ``error`` frame; a new frame type is one
function plus one line in ``HANDLERS``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import structlog
from aiohttp import web

from gateway.auth import AuthError, DeviceAuthenticator
from gateway.device.allowance import Allowance
from gateway.device.connection import Connection, ConnectionGone
from gateway.device.expiry import Expiries
from gateway.metrics import Metrics
from gateway.runs.lifecycle import RunRefused, Runs
from gateway.runs.tracking import parse_run_id
from gateway.wire import codes, frames, messages
from gateway.wire.codes import CloseCode
from gateway.wire.frames import Frame, FrameError

log = structlog.get_logger(__name__)

# Costly frames (gateway/device/allowance.py) a connection may send: this many
# at once, then this many a minute.
COSTLY_BURST = 10
COSTLY_PER_MINUTE = 12


@attrs.frozen
class DeviceContext:
    """What a handler may touch besides its own connection: the shared services.

    One per process, not per connection (memory per idle device); the
    connection is the handler's second argument.
    """

    runs: Runs
    authenticator: DeviceAuthenticator
    metrics: Metrics
    heartbeat_s: float
    bad_frames_per_minute: int
    expiries: Expiries = attrs.Factory(Expiries)


DEVICE_CONTEXT = web.AppKey("device_context", DeviceContext)

# A handler that never waits is a plain function (no coroutine to create and
# await per frame: tool_result is on every tool call's path).
Handler = Callable[[DeviceContext, Connection, Frame], Awaitable[None] | None]


def handle_tool_result(ctx: DeviceContext, conn: Connection, frame: Frame) -> None:
    result = frames.parse_tool_result(frame)
    if not conn.resolve_call(result):
        raise FrameError("no such pending call on this connection", ref=frame.type,
                         code=codes.UNKNOWN_CALL)


def handle_tool_progress(ctx: DeviceContext, conn: Connection, frame: Frame) -> None:
    progress = frames.parse_tool_progress(frame)
    if not conn.progress_call(progress.id):
        raise FrameError("no such pending call on this connection", ref=frame.type,
                         code=codes.UNKNOWN_CALL)


def _costly(conn: Connection) -> Allowance:
    """The connection's allowance of costly frames, made on its first one: most
    devices never send one (memory per idle device)."""
    if conn.costly is None:
        conn.costly = Allowance(COSTLY_PER_MINUTE, COSTLY_BURST)
    return conn.costly


def _spend_costly(conn: Connection, frame: Frame) -> None:
    if not _costly(conn).take():
        raise FrameError(f"too many auth_refresh, device_hello or unknown-run frames: at most "
                         f"{COSTLY_PER_MINUTE} a minute", ref=frame.type)


def _refuse_without_query(ctx: DeviceContext, conn: Connection, run_id_text: str) -> None:
    """Past its allowance, a frame for a run this connection does not own is
    answered from memory: ``run_finished`` for a run it just finished, else
    ``unknown_run`` (no query to find out whether the run ended long ago)."""
    # Ownership first: a dict look-up, where the allowance reads the clock (per event).
    if ctx.runs.tracking.owned(conn, run_id_text) is not None or not _costly(conn).exhausted:
        return
    run_id = parse_run_id(run_id_text)
    if run_id is not None and ctx.runs.tracking.recently_finished(conn, run_id):
        raise RunRefused(codes.RUN_FINISHED, "the run has already ended")
    raise RunRefused(codes.UNKNOWN_RUN, "no such run on this connection")


def handle_agent_data(ctx: DeviceContext, conn: Connection,
                      frame: Frame) -> Awaitable[None] | None:
    # Not a coroutine: the event is usually queued before this returns (the hot path).
    event = frames.parse_agent_data(frame)
    _refuse_without_query(ctx, conn, event.run_id)
    return ctx.runs.accept_event(conn, event.run_id, event.data, event.seq)


async def handle_agent_complete(ctx: DeviceContext, conn: Connection, frame: Frame) -> None:
    done = frames.parse_agent_complete(frame)
    _refuse_without_query(ctx, conn, done.run_id)
    await ctx.runs.complete(conn, done.run_id, status=done.status, errors=done.errors,
                            result=done.result, has_result=done.has_result)


def handle_ping(ctx: DeviceContext, conn: Connection, frame: Frame) -> None:
    conn.send(messages.PONG)


def handle_pong(ctx: DeviceContext, conn: Connection, frame: Frame) -> None:
    """Legacy heartbeat acknowledgement: liveness is the WebSocket's own ping/pong."""


async def handle_auth_refresh(ctx: DeviceContext, conn: Connection, frame: Frame) -> None:
    refresh = frames.parse_auth_refresh(frame)
    _spend_costly(conn, frame)
    try:
        claims = ctx.authenticator.verify(refresh.token)
    except AuthError as exc:
        raise FrameError(f"token refused: {exc}", ref=frame.type,
                         code=codes.AUTH_REFRESH_REJECTED) from None
    if claims.user_id != conn.user_id:
        raise FrameError("token is for another user", ref=frame.type,
                         code=codes.AUTH_REFRESH_REJECTED)
    current = conn.expires_at
    # A refresh only ever extends: a token expiring sooner than the one in force
    # does not shorten the connection (None means no expiry at all).
    if current is None or claims.expires_at is None:
        conn.arm_expiry(None)
    else:
        conn.arm_expiry(max(current, claims.expires_at))
    log.info("device_token_refreshed", expires_at=claims.expires_at)


async def handle_device_hello(ctx: DeviceContext, conn: Connection, frame: Frame) -> None:
    """A later hello: same device, new agent list, pending runs for it, a new ack.

    Its ``capabilities`` are those of the first hello: event_acks cannot be
    switched on or off mid-connection (the seq of runs in flight depends on it).
    ``hello_ack.runs`` is empty: this hello attached no running run.
    """
    hello = frames.parse_hello(frame)
    _spend_costly(conn, frame)
    if hello.device_id != conn.device_id:
        raise FrameError("device_id cannot change on a connection", ref=frame.type)
    conn.agent_ids = hello.agent_ids
    claimed = await ctx.runs.claim_for(conn, hello.agent_ids)
    conn.send(messages.hello_ack(
        connection_id=conn.connection_id, heartbeat_s=ctx.heartbeat_s))
    ctx.runs.send_claimed(conn, claimed)


HANDLERS: Final[dict[str, Handler]] = {
    "tool_result": handle_tool_result,
    "tool_progress": handle_tool_progress,
    "agent_data": handle_agent_data,
    "agent_complete": handle_agent_complete,
    "ping": handle_ping,
    "pong": handle_pong,
    "auth_refresh": handle_auth_refresh,
    "device_hello": handle_device_hello,
}


async def dispatch(ctx: DeviceContext, conn: Connection, raw: bytes | str) -> None:
    """Handle one text frame; refusals and failures become one ``error`` frame each."""
    waiting = dispatch_now(ctx, conn, raw)
    if waiting is not None:
        await waiting


def dispatch_now(ctx: DeviceContext, conn: Connection, raw: bytes | str) -> Awaitable[None] | None:
    """``dispatch`` without a coroutine of its own: what is left to wait for, if anything.

    The receive loop calls this: most frames (a tool_result on every call) are
    done when it returns, and a coroutine per frame to await was a measurable
    share of a tool call. Only a handler that waits (a query, a queue) leaves
    an awaitable, whose failures are answered the same way.
    """
    conn.frames_in += 1
    frame_type: str | None = None  # known once the frame decoded
    try:
        frame = frames.decode(raw)
        handler = HANDLERS.get(frame.type)
        if handler is None:
            ctx.metrics.frame_in("unknown")
            log.debug("unknown_frame_type", frame_type=frame.type[:64])
            return None
        frame_type = frame.type
        ctx.metrics.frame_in(frame_type)
        waiting = handler(ctx, conn, frame)
    except Exception as exc:
        _answer_failure(ctx, conn, exc, frame_type)
        return None
    return None if waiting is None else _finish(ctx, conn, waiting, frame_type)


async def _finish(ctx: DeviceContext, conn: Connection, waiting: Awaitable[None],
                  frame_type: str) -> None:
    try:
        await waiting
    except Exception as exc:
        _answer_failure(ctx, conn, exc, frame_type)


def _answer_failure(ctx: DeviceContext, conn: Connection, exc: Exception,
                    frame_type: str | None) -> None:
    """The one ``error`` frame for a frame its handler refused or failed on."""
    if isinstance(exc, FrameError):
        refuse(ctx, conn, exc.code, exc.message, exc.ref)
    elif isinstance(exc, RunRefused):
        if exc.code != codes.BAD_FRAME:  # an unknown_run/run_finished answer may have cost a query
            _costly(conn).take()
        refuse(ctx, conn, exc.code, exc.message, frame_type)
    elif isinstance(exc, ConnectionGone):
        raise exc  # the connection is ending anyway; its handler knows
    else:
        # A bug or a database fault in one handler: this frame is answered and
        # the connection, with its other runs and calls, carries on.
        ctx.metrics.frame_handler_failures.labels(frame_type or "undecoded").inc()
        log.error("frame_handler_failed", frame_type=frame_type, error=repr(exc),
                  exc_info=exc)
        refuse(ctx, conn, codes.INTERNAL, "the gateway failed to handle this frame", frame_type)


def refuse(ctx: DeviceContext, conn: Connection, code: str, message: str,
           ref: str | None) -> None:
    """Answer a refused frame; a device that keeps sending bad frames is closed."""
    ctx.metrics.bad_frames.labels(code).inc()
    log.debug("frame_refused", code=code, ref=ref, detail=message)
    try:
        conn.send(messages.error(code=code, message=message, ref=ref))
    except ConnectionGone:
        return
    # Only malformed frames count as abuse: a device streaming into a run that
    # was just cancelled gets run_finished answers, not a 1008.
    if code == codes.BAD_FRAME and conn.note_bad_frame(ctx.bad_frames_per_minute):
        log.warning("device_abusive", bad_frames_per_minute=ctx.bad_frames_per_minute)
        conn.request_close(CloseCode.POLICY, "too many bad frames")
