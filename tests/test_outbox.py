"""``gateway.device.outbox``: frames written in order by one task (or within
the put, for ``put_at_once``), hello_ack first, what was written reported to
the owner, a broken socket reported once.

The owner here is a fake whose writes finish at once or wait on an event, as
aiohttp's send does when the socket's buffer is full; the outbox behind real
sockets (slow readers, drains) is exercised by test_hostile_input and
test_device_ws.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import attrs
import pytest

from gateway.device.outbox import Outbox, OutboxBroken


@attrs.define
class Owner:
    """Writes finish at once unless ``gate`` is closed; ``fail_with`` breaks them."""

    written: list[bytes] = attrs.Factory(list)  # the frames the socket took
    reported: list[bytes] = attrs.Factory(list)  # frame_written calls
    failures: list[BaseException] = attrs.Factory(list)
    gate: asyncio.Event | None = None
    fail_with: Exception | None = None
    waits: int = 0  # writes that had to wait
    cancelled: int = 0  # writes cancelled while they waited
    on_written: Callable[[bytes], None] | None = None

    async def write(self, frame: bytes) -> None:
        if self.gate is not None and not self.gate.is_set():
            self.waits += 1
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.fail_with is not None:
            raise self.fail_with
        self.written.append(frame)

    def frame_written(self, frame: bytes) -> None:
        self.reported.append(frame)
        if self.on_written is not None:
            self.on_written(frame)

    def write_failed(self, exc: BaseException) -> None:
        self.failures.append(exc)


def released(owner: Owner) -> Outbox:
    outbox = Outbox(owner)
    outbox.release()
    return outbox


async def test_frames_are_written_in_order_and_reported_then_no_task_is_left() -> None:
    owner = Owner()
    outbox = released(owner)
    outbox.put(b"a")
    outbox.put(b"b")
    assert not outbox.idle and outbox.pending == 2
    assert await outbox.drained(1.0)
    assert owner.written == [b"a", b"b"] == owner.reported
    assert outbox.idle and outbox.pending == 0


@pytest.mark.parametrize("at_once", [False, True], ids=["queued", "at_once"])
async def test_frames_before_release_wait_and_the_first_goes_first(at_once: bool) -> None:
    owner = Owner()
    outbox = Outbox(owner)
    if at_once:
        outbox.put_at_once(b"ping")  # held all the same
    else:
        outbox.put(b"ping")
    assert owner.written == []
    outbox.put(b"hello_ack", first=True)
    outbox.release()
    assert await outbox.drained(1.0)
    assert owner.written == [b"hello_ack", b"ping"]


async def test_frames_put_while_a_write_waits_follow_it_in_order() -> None:
    owner = Owner(gate=asyncio.Event())
    outbox = released(owner)
    outbox.put(b"1")
    assert not await outbox.drained(0.05)  # the write waits: the socket's buffer is "full"
    outbox.put(b"2")
    outbox.put(b"3")
    assert owner.written == [] and outbox.pending == 3
    owner.gate.set()  # type: ignore[union-attr]
    assert await outbox.drained(1.0)
    assert owner.written == [b"1", b"2", b"3"] == owner.reported
    assert owner.waits == 1  # one task wrote them all, the first one waited
    assert outbox.idle and outbox.pending == 0


async def test_a_failed_write_is_reported_once_and_later_puts_refused() -> None:
    owner = Owner(fail_with=ConnectionResetError("gone"))
    outbox = released(owner)
    outbox.put(b"a")
    assert await outbox.drained(1.0)
    assert [type(e) for e in owner.failures] == [ConnectionResetError]
    assert owner.reported == [] and outbox.idle
    with pytest.raises(OutboxBroken):
        outbox.put(b"b")
    assert len(owner.failures) == 1


async def test_a_write_failing_after_waiting_drops_the_queue_and_is_reported_once() -> None:
    owner = Owner(gate=asyncio.Event())
    outbox = released(owner)
    outbox.put(b"a")
    outbox.put(b"b")
    owner.fail_with = ConnectionResetError("gone")
    owner.gate.set()  # type: ignore[union-attr]
    assert await outbox.drained(1.0)
    assert len(owner.failures) == 1 and owner.written == [] and outbox.pending == 0
    with pytest.raises(OutboxBroken):
        outbox.put(b"c")


@pytest.mark.parametrize("at_once", [False, True], ids=["queued", "begun_at_once"])
async def test_a_cancelled_writer_leaves_its_frame_unwritten_and_unreported(
        at_once: bool) -> None:
    """Cancelled (the loop's shutdown), the write under way sees the CancelledError
    where it waits, also when the write was begun at once and resumed by the task."""
    owner = Owner(gate=asyncio.Event())
    outbox = released(owner)
    if at_once:
        outbox.put_at_once(b"ping")
    else:
        outbox.put(b"ping")
    task = outbox._task
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outbox.pending == 1 and not outbox.idle  # the frame was never written
    assert owner.cancelled == 1 and owner.written == [] and owner.failures == []


async def test_a_put_from_the_owners_callback_is_written_once_after_the_frame() -> None:
    owner = Owner()
    outbox = released(owner)

    def after(frame: bytes) -> None:
        if frame == b"ping":
            outbox.put(b"after-ping")  # re-entering put while the outbox writes

    owner.on_written = after
    outbox.put(b"ping")
    assert await outbox.drained(1.0)
    assert owner.written == [b"ping", b"after-ping"] == owner.reported
    assert outbox.idle


# ------------------------------------------------------------ put_at_once (the app ping)


async def test_put_at_once_to_an_idle_outbox_writes_within_the_call_without_a_task() -> None:
    owner = Owner()
    outbox = released(owner)
    tasks_before = len(asyncio.all_tasks())
    outbox.put_at_once(b"ping")
    assert owner.written == [b"ping"] == owner.reported
    assert outbox.idle and len(asyncio.all_tasks()) == tasks_before


async def test_put_at_once_behind_a_waiting_write_is_queued_after_it() -> None:
    owner = Owner(gate=asyncio.Event())
    outbox = released(owner)
    outbox.put(b"tool_call")
    assert not await outbox.drained(0.05)
    outbox.put_at_once(b"ping")
    assert owner.written == [] and outbox.pending == 2
    owner.gate.set()  # type: ignore[union-attr]
    assert await outbox.drained(1.0)
    assert owner.written == [b"tool_call", b"ping"] == owner.reported


async def test_a_write_begun_at_once_that_waits_is_finished_by_the_task_in_order() -> None:
    owner = Owner(gate=asyncio.Event())
    outbox = released(owner)
    outbox.put_at_once(b"ping")  # begun here, then waits: the socket's buffer is "full"
    assert owner.waits == 1 and not outbox.idle and outbox.pending == 1
    outbox.put(b"after")
    assert not await outbox.drained(0.05)
    owner.gate.set()  # type: ignore[union-attr]
    assert await outbox.drained(1.0)
    # The begun write finished (not started again), then the frame put after it.
    assert owner.written == [b"ping", b"after"] == owner.reported
    assert owner.waits == 1 and outbox.idle


async def test_a_write_begun_at_once_that_fails_later_is_reported_once() -> None:
    owner = Owner(gate=asyncio.Event())
    outbox = released(owner)
    outbox.put_at_once(b"ping")
    owner.fail_with = ConnectionResetError("gone")
    owner.gate.set()  # type: ignore[union-attr]
    assert await outbox.drained(1.0)
    assert [type(e) for e in owner.failures] == [ConnectionResetError]
    assert owner.reported == [] and outbox.pending == 0
    with pytest.raises(OutboxBroken):
        outbox.put_at_once(b"ping")


async def test_a_write_failing_at_once_is_reported_within_the_call() -> None:
    owner = Owner(fail_with=ConnectionResetError("gone"))
    outbox = released(owner)
    outbox.put_at_once(b"ping")
    assert [type(e) for e in owner.failures] == [ConnectionResetError]
    assert outbox.idle
    with pytest.raises(OutboxBroken):
        outbox.put(b"after")
