"""One device connection: sending, tool calls with their futures, expiry, closing.

A ``Connection`` owns only what is its own: its pending calls, its close task
and its entry in the process's expiry schedule. The WebSocket is reached
through a ``DeviceSocket`` (send and close), so dispatch can be unit-tested
without a socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import time
import types
import uuid
from collections.abc import Awaitable, Coroutine, Mapping
from typing import Any, Protocol

import attrs
import structlog

from gateway.device.allowance import Allowance
from gateway.device.expiry import Expiries
from gateway.device.outbox import MIN_QUEUED_BYTES, Outbox, OutboxBroken, OutboxFull
from gateway.wire import codes, messages
from gateway.wire.codes import CloseCode
from gateway.wire.frames import ToolResult


class DeviceSocket(Protocol):
    """How a connection reaches its WebSocket: the endpoint's, or a test's."""

    def send(self, frame: bytes) -> Awaitable[None]:
        """Write one text frame (awaited by the connection's outbox only)."""

    def close(self, code: int, reason: str) -> Coroutine[Any, Any, None]:
        """Close with ``code`` and ``reason`` (bounded: it may drop the socket)."""


class FrameTally(Protocol):
    """Counts frames by type (the frames-sent metric)."""

    def inc(self, label: str) -> None: ...

log = structlog.get_logger(__name__)

NO_CALLS: Mapping[str, PendingCall] = types.MappingProxyType({})

# A close waits this long for the frames queued before it (an agent_cancel,
# the tool_cancel of a drain) to be written first.
CLOSE_AFTER_QUEUE_S = 1.0


class ConnectionGone(Exception):
    """The device can no longer be written to."""


class CallFailed(Exception):
    """A tool call ended without a result from the device; ``code`` is a §2.2 code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.define(eq=False)
class PendingCall:
    """A tool call waiting for its tool_result.

    Its timeout is a timer that fails the future, not ``asyncio.timeout``
    around the await: a plain ``call_at`` is cheaper per call and needs no
    task cancellation to turn into a timeout.
    """

    call_id: str
    tool: str
    future: asyncio.Future[ToolResult]
    timeout_s: float
    hard_deadline: float  # loop time: the call's max_timeout_s
    timer: asyncio.TimerHandle | None = None
    deadline: float = 0.0  # loop time the timer is armed for

    def arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """(Re)start the timeout: the future fails with TimeoutError at ``deadline``."""
        if self.timer is not None:
            self.timer.cancel()
        self.deadline = deadline
        self.timer = loop.call_at(deadline, self._time_out)

    def _time_out(self) -> None:
        if not self.future.done():
            self.future.set_exception(TimeoutError())

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def restart_timeout(self, loop: asyncio.AbstractEventLoop) -> None:
        """tool_progress: the call is alive; its timeout restarts, never past the hard bound."""
        if self.timer is not None and not self.future.done():
            self.arm(loop, min(loop.time() + self.timeout_s, self.hard_deadline))


@attrs.define(eq=False)
class Connection:
    """A registered device connection, keyed by (user_id, device_id)."""

    user_id: str
    device_id: str
    agent_ids: tuple[str, ...]
    socket: DeviceSocket
    max_inflight_calls: int
    max_queued_bytes: int = MIN_QUEUED_BYTES
    # The device said hello with the "event_acks" capability (PROTOCOL.md §1.8).
    event_acks: bool = False
    # Told the type of every frame written (the frames-sent metric); shared by
    # every connection, as is everything here that is not the device's own.
    sent_tally: FrameTally | None = None
    # The process's token expiry schedule (gateway/device/expiry.py); needed
    # once a token with an exp is armed.
    expiries: Expiries | None = None
    connection_id: str = attrs.field(factory=lambda: str(uuid.uuid4()))
    connected_at: dt.datetime = attrs.field(factory=lambda: dt.datetime.now(dt.UTC))
    expires_at: float | None = None  # unix time incl. leeway
    # None while no call is in flight: an idle device holds no dict.
    _calls: dict[str, PendingCall] | None = None
    frames_in: int = 0
    frames_out: int = 0
    close_code: int | None = None
    close_reason: str = ""
    _outbox: Outbox = attrs.field(init=False)
    _closing: bool = False
    _close_task: asyncio.Task[Any] | None = None
    # Created on the first bad frame: most devices never send one (memory per idle device).
    _bad_frame_times: collections.deque[float] | None = None
    # The handlers' allowance of costly frames (gateway/device/handlers.py), made
    # on the first one.
    costly: Allowance | None = None
    _calls_made: int = 0  # numbers this connection's call ids

    @property
    def calls(self) -> Mapping[str, PendingCall]:
        """The tool calls in flight, by call id."""
        return self._calls if self._calls is not None else NO_CALLS

    @property
    def closing(self) -> bool:
        """True once the connection started to go; nothing new is given to it."""
        return self._closing

    def __attrs_post_init__(self) -> None:
        self._outbox = Outbox(self, max_bytes=self.max_queued_bytes)

    # ------------------------------------------------------------ sending

    def send(self, frame: bytes, *, at_once: bool = False) -> None:
        """Queue one frame for the device; never waits (frames before hello_ack wait for it).

        ``at_once``: written within this call when nothing else is queued (the
        app ping to every device; see ``Outbox.put_at_once``). Raises
        ConnectionGone when the connection is going, and closes a device that
        does not read what it is sent (its queue bound).
        """
        if self._closing:
            raise ConnectionGone("connection is closing")
        try:
            if at_once:
                self._outbox.put_at_once(frame)
            else:
                self._outbox.put(frame)
        except OutboxBroken as exc:
            raise ConnectionGone(str(exc)) from None
        except OutboxFull as exc:
            log.warning("device_send_queue_full", detail=str(exc))
            self.request_close(CloseCode.POLICY, "not reading its frames")
            raise ConnectionGone(str(exc)) from None

    def acknowledge(self, hello_ack: bytes) -> None:
        """hello_ack goes out first, then whatever was dispatched meanwhile (PROTOCOL.md §1.2)."""
        self._outbox.put(hello_ack, first=True)
        self._outbox.release()

    async def drained(self, within_s: float = 5.0) -> bool:
        """Every frame queued so far is written (at most ``within_s``); True if so."""
        written: bool = await self._outbox.drained(within_s)
        return written

    # The outbox's owner (gateway/device/outbox.py): its writes go through here.

    def write(self, frame: bytes) -> Awaitable[None]:
        """The outbox's write to the socket; everything else sends with ``send``."""
        return self.socket.send(frame)

    def frame_written(self, frame: bytes) -> None:
        self.frames_out += 1
        if self.sent_tally is not None:
            self.sent_tally.inc(messages.frame_type(frame))

    def write_failed(self, exc: BaseException) -> None:
        log.debug("device_send_failed", error=repr(exc))
        self.request_close(CloseCode.GOING_AWAY, "send failed")

    # ------------------------------------------------------------ tool calls

    async def call(
        self, *, tool: str, args: Any, timeout_s: float, max_timeout_s: float
    ) -> ToolResult:
        """Send a tool_call and wait for its tool_result; raises CallFailed."""
        if self._closing:
            raise CallFailed(codes.DEVICE_DISCONNECTED, "the device disconnected")
        if len(self.calls) >= self.max_inflight_calls:
            raise CallFailed(
                codes.TOO_MANY_CALLS,
                f"the device already runs {self.max_inflight_calls} tool calls",
            )
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._calls_made += 1
        call = PendingCall(
            # Unique per connection is all a call id needs (ownership, not secrecy,
            # keeps other devices out); a uuid4 per call cost measurably.
            call_id=f"{self.connection_id[:8]}-{self._calls_made}",
            tool=tool,
            future=loop.create_future(),
            timeout_s=timeout_s,
            hard_deadline=started + max_timeout_s,
        )
        if self._calls is None:
            self._calls = {}
        calls = self._calls
        calls[call.call_id] = call
        try:
            try:
                self.send(messages.tool_call(
                    call_id=call.call_id, tool=tool, args=args, timeout_s=timeout_s))
            except ConnectionGone:
                if call.future.done():  # failed by the cleanup meanwhile: seen, not needed
                    call.future.exception()
                raise CallFailed(codes.DEVICE_DISCONNECTED, "the device disconnected") from None
            call.arm(loop, min(started + timeout_s, call.hard_deadline))
            try:
                return await call.future
            except TimeoutError:
                if call.deadline >= call.hard_deadline:
                    detail = f"the call ran past its max_timeout_s of {max_timeout_s:g} s"
                else:
                    detail = f"no tool_result or tool_progress within {timeout_s:g} s"
                self._cancel_call(call, "timeout")
                raise CallFailed(codes.TIMEOUT, detail) from None
            except asyncio.CancelledError:
                # The HTTP caller went away: tell the device to stop working.
                self._cancel_call(call, "caller_gone")
                raise
        finally:
            call.disarm()
            calls.pop(call.call_id, None)
            if not calls and self._calls is calls:
                self._calls = None

    def _cancel_call(self, call: PendingCall, reason: str) -> None:
        if self._closing:
            return
        with contextlib.suppress(ConnectionGone):
            self.send(messages.tool_cancel(call_id=call.call_id, reason=reason))

    def resolve_call(self, result: ToolResult) -> bool:
        """Hand a tool_result to its waiting caller; False if no such call is pending."""
        call = self.calls.get(result.id)
        if call is None or call.future.done():
            return False
        call.future.set_result(result)
        return True

    def progress_call(self, call_id: str) -> bool:
        call = self.calls.get(call_id)
        if call is None or call.future.done():
            return False
        call.restart_timeout(asyncio.get_running_loop())
        return True

    def fail_pending(self, code: str, message: str) -> int:
        """Fail every pending call at once (callers do not wait for their timeout)."""
        failed = 0
        for call in list(self.calls.values()):
            if not call.future.done():
                call.future.set_exception(CallFailed(code, message))
                failed += 1
        return failed

    # ------------------------------------------------------------ abuse

    def note_bad_frame(self, limit_per_minute: int) -> bool:
        """Record a refused frame; True when the device exceeded its allowance."""
        now = time.monotonic()
        if self._bad_frame_times is None:
            self._bad_frame_times = collections.deque()
        times = self._bad_frame_times
        times.append(now)
        while times and now - times[0] > 60.0:
            times.popleft()
        return len(times) > limit_per_minute

    # ------------------------------------------------------------ expiry and closing

    def arm_expiry(self, expires_at: float | None) -> None:
        """Close with 4001 when the token's exp (plus leeway) passes; None: never."""
        self._disarm_expiry()
        self.expires_at = expires_at
        if expires_at is None or self._closing:
            return
        if self.expiries is None:
            raise RuntimeError("a connection without an expiry schedule cannot expire")
        self.expiries.add(self, expires_at)

    def _disarm_expiry(self) -> None:
        if self.expires_at is not None and self.expiries is not None:
            self.expiries.remove(self, self.expires_at)

    def token_expired(self) -> None:
        log.info("device_token_expired", user_id=self.user_id, device_id=self.device_id)
        self.request_close(CloseCode.TOKEN_EXPIRED, "token expired")

    def request_close(self, code: int, reason: str) -> None:
        """Start closing from outside the receive loop (replacement, expiry, drain)."""
        if self._closing:
            return
        self.mark_closing(code, reason)
        # What was queued before the close (an agent_cancel, a tool_cancel) goes first.
        closing = (self.socket.close(code, reason) if self._outbox.idle
                   else self._close_after_queue(code, reason))
        self._close_task = asyncio.get_running_loop().create_task(
            closing, name=f"close-{self.connection_id}")

    async def _close_after_queue(self, code: int, reason: str) -> None:
        await self._outbox.drained(CLOSE_AFTER_QUEUE_S)
        await self.socket.close(code, reason)

    def mark_closing(self, code: int, reason: str) -> None:
        """From now on nothing new is given to this connection."""
        if not self._closing:
            self._closing = True
            self.close_code = code
            self.close_reason = reason
        self._disarm_expiry()

    async def wait_closed(self, within_s: float) -> None:
        """Let a close started by request_close finish its handshake (bounded)."""
        task = self._close_task
        if task is None:
            return
        try:
            async with asyncio.timeout(within_s):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
        except Exception as exc:  # the socket may already be gone
            log.debug("device_close_failed", error=repr(exc))
