"""``gateway.device.handlers.dispatch`` without a socket (STYLE.md: the send-function seam).

A ``Connection`` whose socket appends what it is sent to a list and records
how it was closed; no database, no network. Frames that would touch
runs are not sent here (``runs`` is None).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import attrs
import jwt
import orjson
import pytest

from gateway.auth import DeviceAuthenticator
from gateway.device.connection import CallFailed, Connection
from gateway.device.handlers import HANDLERS, DeviceContext, dispatch
from gateway.metrics import Metrics

SECRET = "dispatch-test-secret-0123456789abcdef"
BAD_FRAMES_PER_MINUTE = 3


@attrs.define
class Wire:
    """What the gateway sent to the fake device, and how it asked to close it."""

    ctx: DeviceContext
    conn: Connection
    sent: list[bytes] = attrs.Factory(list)
    closes: list[tuple[int, str]] = attrs.Factory(list)

    def frames(self) -> list[dict[str, Any]]:
        return [orjson.loads(raw) for raw in self.sent]

    async def feed(self, frame: dict[str, Any] | str | bytes) -> list[dict[str, Any]]:
        """Dispatch one frame; the frames it caused to be sent."""
        before = len(self.sent)
        raw = orjson.dumps(frame) if isinstance(frame, dict) else frame
        await dispatch(self.ctx, self.conn, raw)
        await self.conn.drained()  # sends are queued; the connection's writer sends them
        return [orjson.loads(raw) for raw in self.sent[before:]]


def token(sub: str, *, ttl_s: float = 3600) -> str:
    now = time.time()
    return jwt.encode({"sub": sub, "iat": int(now), "exp": now + ttl_s}, SECRET,
                      algorithm="HS256")


@attrs.define
class RecordingSocket:
    """A device socket that keeps what the connection wrote and how it closed."""

    sent: list[bytes] = attrs.Factory(list)
    closes: list[tuple[int, str]] = attrs.Factory(list)

    async def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    async def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


@pytest.fixture
async def wire() -> Wire:
    socket = RecordingSocket()
    authenticator = DeviceAuthenticator(
        algorithms=("HS256",), secret=SECRET, public_key=None, audience=None, issuer=None,
        require_exp=True, leeway_s=0,
    )
    ctx = DeviceContext(runs=None,  # type: ignore[arg-type]
                        authenticator=authenticator, metrics=Metrics(), heartbeat_s=30,
                        bad_frames_per_minute=BAD_FRAMES_PER_MINUTE)
    conn = Connection(user_id="user-1", device_id="d1", agent_ids=("agent-a",),
                      socket=socket, max_inflight_calls=4, expiries=ctx.expiries)
    # The endpoint sends hello_ack first; until then frames are held back.
    conn.acknowledge(b'{"type":"hello_ack"}')
    await conn.drained()
    socket.sent.clear()
    return Wire(ctx, conn, socket.sent, socket.closes)


async def test_every_protocol_frame_type_has_a_handler() -> None:
    """The device-to-gateway table of PROTOCOL.md §1.4 (plus a repeated hello) is in HANDLERS."""
    assert set(HANDLERS) == {"tool_result", "tool_progress", "agent_data", "agent_complete",
                             "ping", "pong", "auth_refresh", "device_hello"}


async def test_ping_is_answered_with_exact_pong_bytes(wire: Wire) -> None:
    """ping → exactly the bytes {"type":"pong"}."""
    await dispatch(wire.ctx, wire.conn, b'{"type":"ping"}')
    await wire.conn.drained()
    assert wire.sent == [b'{"type":"pong"}']


async def test_str_frames_are_dispatched_too(wire: Wire) -> None:
    """dispatch accepts text as str as well as bytes."""
    await dispatch(wire.ctx, wire.conn, '{"type": "ping"}')
    await wire.conn.drained()
    assert wire.frames() == [{"type": "pong"}]


async def test_pong_gets_no_reply(wire: Wire) -> None:
    """pong is a silent acknowledgement."""
    assert await wire.feed({"type": "pong"}) == []


async def test_unknown_type_is_ignored(wire: Wire) -> None:
    """An unknown type gets no reply and does not count as a bad frame."""
    for _ in range(BAD_FRAMES_PER_MINUTE + 2):
        assert await wire.feed({"type": "from_the_future", "x": 1}) == []
    assert wire.closes == [] and not wire.conn.closing


@pytest.mark.parametrize(
    ("raw", "ref"),
    [
        (b"{nope", None),
        (b"[1]", None),
        (b'"text"', None),
        (b"{}", None),
        (b'{"type": 3}', None),
        (b'{"type": "tool_result"}', "tool_result"),
        (b'{"type": "tool_progress", "id": "c", "progress": "x"}', "tool_progress"),
        (b'{"type": "tool_progress", "id": "c", "message": []}', "tool_progress"),
        (b'{"type": "agent_data", "run_id": "r", "data": 1, "seq": "x"}', "agent_data"),
        (b'{"type": "auth_refresh", "token": ""}', "auth_refresh"),
    ],
)
async def test_bad_frame_is_answered_with_its_ref(wire: Wire, raw: bytes, ref: str | None) -> None:
    """Malformed frames get one error frame: code bad_frame, ref = the type or null."""
    replies = await wire.feed(raw)
    assert len(replies) == 1, replies
    assert replies[0]["type"] == "error", replies
    assert (replies[0]["code"], replies[0]["ref"]) == ("bad_frame", ref), replies
    assert replies[0]["message"], replies
    assert not wire.conn.closing


async def _pending_call(wire: Wire) -> tuple[asyncio.Task[Any], str]:
    task = asyncio.create_task(wire.conn.call(tool="echo", args={"a": 1}, timeout_s=5,
                                              max_timeout_s=5))
    for _ in range(100):
        if wire.sent:
            break
        await asyncio.sleep(0)
    tool_call = wire.frames()[-1]
    assert tool_call["type"] == "tool_call", tool_call
    assert (tool_call["tool"], tool_call["args"]) == ("echo", {"a": 1}), tool_call
    return task, tool_call["id"]


async def test_tool_result_resolves_the_pending_call(wire: Wire) -> None:
    """A tool_result with the call's id hands the result to the waiting caller."""
    task, call_id = await _pending_call(wire)
    assert await wire.feed({"type": "tool_result", "id": call_id, "result": {"b": 2}}) == []
    result = await asyncio.wait_for(task, 1)
    assert (result.id, result.ok, result.result) == (call_id, True, {"b": 2})
    assert wire.conn.calls == {}


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [("boom", "tool_error", "boom"), ({"code": "EPERM", "message": "no"}, "EPERM", "no")],
    ids=["string", "object"],
)
async def test_tool_result_error_resolves_as_failed(wire: Wire, error: Any, code: str,
                                                    message: str) -> None:
    """An error result resolves the call as not ok, with a code (tool_error for a string)."""
    task, call_id = await _pending_call(wire)
    await wire.feed({"type": "tool_result", "id": call_id, "error": error})
    result = await asyncio.wait_for(task, 1)
    assert (result.ok, result.error_code, result.error_message) == (False, code, message)


async def test_tool_progress_for_a_pending_call_is_silent(wire: Wire) -> None:
    """tool_progress for a live call is accepted without a reply."""
    task, call_id = await _pending_call(wire)
    replies = await wire.feed({"type": "tool_progress", "id": call_id, "progress": 0.5,
                               "message": "half"})
    assert replies == []
    await wire.feed({"type": "tool_result", "id": call_id, "result": None})
    await asyncio.wait_for(task, 1)


@pytest.mark.parametrize("frame_type", ["tool_result", "tool_progress"])
async def test_unknown_call_id_is_refused(wire: Wire, frame_type: str) -> None:
    """An id that is not pending on this connection gets unknown_call; nothing resolves."""
    task, call_id = await _pending_call(wire)
    replies = await wire.feed({"type": frame_type, "id": "someone-elses", "result": 1})
    assert [(r["type"], r["code"], r["ref"]) for r in replies] == [
        ("error", "unknown_call", frame_type)], replies
    assert not task.done()
    assert not wire.conn.calls[call_id].future.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_failed_pending_calls_raise_for_the_caller(wire: Wire) -> None:
    """fail_pending ends a waiting call at once with the given code."""
    task, _ = await _pending_call(wire)
    assert wire.conn.fail_pending("device_disconnected", "gone") == 1
    with pytest.raises(CallFailed) as failed:
        await asyncio.wait_for(task, 1)
    assert failed.value.code == "device_disconnected"


async def test_bad_frame_limit_closes_with_1008(wire: Wire) -> None:
    """More bad frames per minute than allowed: the socket is closed with 1008."""
    for _ in range(BAD_FRAMES_PER_MINUTE):
        await wire.feed(b"garbage")
    await asyncio.sleep(0)
    assert wire.closes == [] and not wire.conn.closing
    replies = await wire.feed(b"garbage")
    assert replies[0]["code"] == "bad_frame", replies  # the last one is still answered
    await wire.conn.wait_closed(1)
    assert wire.closes == [(1008, "too many bad frames")]
    assert wire.conn.close_code == 1008


async def test_unknown_call_does_not_count_toward_the_limit(wire: Wire) -> None:
    """Ownership refusals are not abuse: many unknown_call answers never close the device."""
    for _ in range(BAD_FRAMES_PER_MINUTE * 3):
        replies = await wire.feed({"type": "tool_result", "id": "late", "result": 1})
        assert replies[0]["code"] == "unknown_call", replies
    await asyncio.sleep(0)
    assert wire.closes == [] and not wire.conn.closing


async def test_auth_refresh_extends_expiry(wire: Wire) -> None:
    """A valid token for the same sub moves the connection's expiry to the new exp."""
    wire.conn.arm_expiry(time.time() + 60)
    assert await wire.feed({"type": "auth_refresh", "token": token("user-1")}) == []
    assert wire.conn.expires_at is not None and wire.conn.expires_at > time.time() + 3000
    # Moved, not added: one entry, under the new second only.
    assert (len(wire.ctx.expiries), wire.ctx.expiries.timers) == (1, 1)
    wire.conn.mark_closing(1000, "test over")  # leaves the schedule
    assert (len(wire.ctx.expiries), wire.ctx.expiries.timers) == (0, 0)


@pytest.mark.parametrize(
    "new_token",
    [lambda: token("user-2"), lambda: "garbage", lambda: token("user-1", ttl_s=-60)],
    ids=["other_sub", "garbage", "expired"],
)
async def test_auth_refresh_rejected_keeps_the_old_expiry(wire: Wire, new_token: Any) -> None:
    """A refused refresh answers auth_refresh_rejected and leaves the expiry as it was."""
    original = time.time() + 60
    wire.conn.arm_expiry(original)
    presented = new_token()
    replies = await wire.feed({"type": "auth_refresh", "token": presented})
    assert [(r["code"], r["ref"]) for r in replies] == [
        ("auth_refresh_rejected", "auth_refresh")], replies
    assert presented not in replies[0]["message"], replies
    assert wire.conn.expires_at == original
    wire.conn.mark_closing(1000, "test over")


async def test_repeated_hello_with_other_device_id_is_bad_frame(wire: Wire) -> None:
    """A connection cannot change its device_id by saying hello again."""
    replies = await wire.feed({"type": "device_hello", "device_id": "d2"})
    assert [(r["code"], r["ref"]) for r in replies] == [("bad_frame", "device_hello")], replies
    assert wire.conn.device_id == "d1"


async def test_nothing_is_sent_to_a_closing_connection(wire: Wire) -> None:
    """Once the connection is closing, frames are dropped quietly instead of written."""
    wire.conn.mark_closing(4000, "replaced")
    await dispatch(wire.ctx, wire.conn, b"garbage")
    await wire.conn.drained()
    assert wire.sent == []
