"""One device's outbound frames: a bounded queue and the one task that writes them.

Nothing but this task ever awaits the device's socket (DESIGN.md, principle
11). aiohttp makes every writer to one socket wait on one shared drain
future, so a timeout or cancel around one send (a tool call whose caller hung
up, the app-ping loop) used to cancel every other send to that device, and
shared loops (the scheduler, the cancel listener, the event writer's acks)
stalled on one device with a full TCP window. Here a send is a non-blocking
put; a device whose queue outgrows its bound is closed instead of buffered
without end. The task exists only while there is something to write, so an
idle device costs no task.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Generator
from typing import Any, Protocol

import attrs
import structlog

log = structlog.get_logger(__name__)


class OutboxOwner(Protocol):
    """The connection an outbox writes for: its socket, and what it is told."""

    def write(self, frame: bytes) -> Awaitable[None]:
        """Write one frame to the socket (aiohttp's own send, awaited by the outbox)."""

    def frame_written(self, frame: bytes) -> None:
        """One frame was written (counting, metrics)."""

    def write_failed(self, exc: BaseException) -> None:
        """A write failed: the socket is gone. Called once."""


MAX_QUEUED_FRAMES = 10_000
MIN_QUEUED_BYTES = 16 * 1024 * 1024


class OutboxFull(Exception):
    """The device does not read fast enough: its queue reached its bound."""


class OutboxBroken(Exception):
    """A write to the socket failed: nothing more can be sent."""


@attrs.define(eq=False)
class Outbox:
    # One reference to its owner, not three callables: a bound method is an
    # object per connection (memory per idle device).
    owner: OutboxOwner
    max_bytes: int = MIN_QUEUED_BYTES
    # None while empty: an idle device holds no deque.
    _frames: collections.deque[bytes] | None = None
    _bytes: int = 0
    _task: asyncio.Task[None] | None = None
    _held: bool = True  # nothing is written before release() (hello_ack first)
    _broken: BaseException | None = None

    @property
    def pending(self) -> int:
        return len(self._frames) if self._frames is not None else 0

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being written."""
        return self._task is None and not self._frames

    def put(self, frame: bytes, *, first: bool = False) -> None:
        """Queue one frame (at the front with ``first``); raises OutboxFull or OutboxBroken."""
        if self._broken is not None:
            raise OutboxBroken(repr(self._broken))
        frames = self._frames
        if frames is None:
            frames = self._frames = collections.deque()
        if len(frames) >= MAX_QUEUED_FRAMES or self._bytes + len(frame) > self.max_bytes:
            raise OutboxFull(f"{len(frames)} frames, {self._bytes} bytes waiting")
        if first:
            frames.appendleft(frame)
        else:
            frames.append(frame)
        self._bytes += len(frame)
        self._start()

    def put_at_once(self, frame: bytes) -> None:
        """``put``, but an idle outbox writes the frame within this call.

        For a frame sent to every device at once (the app ping): a task per
        device to write one small frame is most of its cost, and aiohttp's
        send only waits when the socket's buffer is full. A write that does
        wait is finished by the outbox's task, ahead of anything put after.
        Not for a busy device's frames (tool calls): one task per burst
        batches them for the device, and calls/s fell by 7-20 % when every
        frame was written at once (benchmarks/RESULTS.md, round seven).
        """
        if self._broken is not None:
            raise OutboxBroken(repr(self._broken))
        if self._held or not self.idle:
            self.put(frame)
            return
        steps = self.owner.write(frame).__await__()
        try:
            waiting_on = steps.send(None)
        except StopIteration:
            self.owner.frame_written(frame)
            return
        except Exception as exc:  # the socket is gone (reset, closed, closing)
            self._fail(exc)
            return
        self._frames = collections.deque((frame,))
        self._bytes = len(frame)
        self._task = asyncio.get_running_loop().create_task(
            self._write_all(_Resumed(steps, waiting_on)))

    def release(self) -> None:
        """Start writing (after hello_ack was put ``first``)."""
        self._held = False
        self._start()

    def _start(self) -> None:
        if self._held or self._task is not None or not self._frames:
            return
        self._task = asyncio.get_running_loop().create_task(self._write_all(None))

    async def _write_all(self, front: Awaitable[None] | None) -> None:
        """The task: writes the queue in order; ``front``, when given, is the front
        frame's write, already begun by ``put_at_once``."""
        frames = self._frames
        try:
            while frames:
                frame = frames[0]
                try:
                    await (front if front is not None else self.owner.write(frame))
                except Exception as exc:  # the socket is gone (reset, closed, closing)
                    self._fail(exc)
                    return
                front = None
                frames.popleft()
                self._bytes -= len(frame)
                self.owner.frame_written(frame)
        finally:
            self._task = None
            if not frames:
                self._frames = None

    def _fail(self, exc: BaseException) -> None:
        self._broken = exc
        if self._frames is not None:
            self._frames.clear()
        self._bytes = 0
        self.owner.write_failed(exc)

    async def drained(self, within_s: float) -> bool:
        """Wait (at most ``within_s``) until every queued frame is written; True if so.

        Waited for, never cancelled: cancelling a write stuck in aiohttp's drain
        would cancel every other waiter on that socket.
        """
        task = self._task
        if task is None:
            return True
        await asyncio.wait([task], timeout=within_s)
        return task.done()


@attrs.define(eq=False)
class _Resumed:
    """The rest of an awaitable whose first step already ran and is waiting on
    ``waiting_on``: awaiting this finishes it in the awaiting task exactly as
    ``yield from`` would have (PEP 380), so a write begun within a call can go
    on in a task when the socket makes it wait."""

    steps: Generator[Any, Any, None]
    waiting_on: Any

    def __await__(self) -> Generator[Any, Any, None]:
        steps, value = self.steps, self.waiting_on
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as exc:  # the task's cancel, or the future's error
                try:
                    value = steps.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = steps.send(sent)
                except StopIteration:
                    return
