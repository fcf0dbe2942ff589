"""Tool calls through the internal API (PROTOCOL.md §2.2), as a sibling service sees them.

Every test plays both sides over real sockets: the sibling service posts to
``/internal/v1/tool-calls`` and a device (a real WebSocket client) answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
from harness import SERVICE_TOKEN, Device, Harness

from gateway.app import drain

# Upper bound on how long a test waits for an HTTP answer that should come
# promptly; a hang fails the test instead of stalling the run.
ANSWER_WITHIN_S = 5.0

CallTask = asyncio.Task[tuple[int, Any]]


def start_call(gateway: Harness, **body: Any) -> CallTask:
    """POST /tool-calls in the background (defaults: user-1, tool "echo")."""
    body.setdefault("user_id", "user-1")
    body.setdefault("tool", "echo")
    return asyncio.create_task(gateway.api("POST", "/tool-calls", body))


async def answer_of(task: CallTask) -> tuple[int, Any]:
    return await asyncio.wait_for(task, ANSWER_WITHIN_S)


async def call_now(gateway: Harness, **body: Any) -> tuple[int, Any]:
    """A call that is expected to be answered without any device involvement."""
    return await answer_of(start_call(gateway, **body))


async def reply(device: Device, call: dict[str, Any], **fields: Any) -> None:
    await device.send({"type": "tool_result", "id": call["id"], **fields})


def pending_calls(gateway: Harness, user_id: str, device_id: str) -> int:
    conn = gateway.svc.registry.get(user_id, device_id)
    return 0 if conn is None else len(conn.calls)


# ---------------------------------------------------------------- results


async def test_device_result_is_returned_with_ok_true(gateway: Harness) -> None:
    """The device's result comes back as 200 {call_id, device_id, ok: true, result}."""
    device = await gateway.device("user-1", "d1")
    task = start_call(gateway, tool="read_file", args={"path": "/tmp/x"})
    call = await device.recv_type("tool_call")
    assert call["tool"] == "read_file"
    assert call["args"] == {"path": "/tmp/x"}
    assert isinstance(call["id"], str) and call["id"]
    await reply(device, call, result={"content": "hello"})
    status, body = await answer_of(task)
    assert status == 200, body
    assert body == {"call_id": call["id"], "device_id": "d1", "ok": True,
                    "result": {"content": "hello"}}


async def test_any_json_result_is_passed_through_unchanged(gateway: Harness) -> None:
    """Results that are not objects (null, numbers, strings, lists) arrive as sent."""
    device = await gateway.device("user-1", "d1")
    for value in [None, 0, 3.5, "text", [1, "two", None], {"deep": {"list": [True, {}]}}]:
        task = start_call(gateway)
        call = await device.recv_type("tool_call")
        await reply(device, call, result=value)
        status, body = await answer_of(task)
        assert status == 200, body
        assert body["ok"] is True, body
        assert body["result"] == value, body


async def test_result_without_result_or_error_is_ok_with_null(gateway: Harness) -> None:
    """A tool_result carrying neither field is a success with result null (README decision)."""
    device = await gateway.device("user-1", "d1")
    task = start_call(gateway)
    call = await device.recv_type("tool_call")
    await reply(device, call)
    status, body = await answer_of(task)
    assert status == 200, body
    assert body["ok"] is True and body["result"] is None, body


async def test_string_tool_error_becomes_tool_error_code(gateway: Harness) -> None:
    """A plain-string error from the device is 200 ok:false {code: tool_error, message}."""
    device = await gateway.device("user-1", "d1")
    task = start_call(gateway)
    call = await device.recv_type("tool_call")
    await reply(device, call, error="disk full")
    status, body = await answer_of(task)
    assert status == 200, body
    assert body == {"call_id": call["id"], "device_id": "d1", "ok": False,
                    "error": {"code": "tool_error", "message": "disk full"}}


async def test_error_object_from_device_is_kept(gateway: Harness) -> None:
    """An {code, message} error from the device reaches the caller unchanged."""
    device = await gateway.device("user-1", "d1")
    task = start_call(gateway)
    call = await device.recv_type("tool_call")
    await reply(device, call, error={"code": "ENOENT", "message": "no such file"})
    status, body = await answer_of(task)
    assert status == 200, body
    assert body["ok"] is False, body
    assert body["error"] == {"code": "ENOENT", "message": "no such file"}, body
    assert "result" not in body, body


# ---------------------------------------------------------------- which device


async def test_without_device_id_the_most_recently_connected_device_is_called(
    gateway: Harness,
) -> None:
    """No device_id: the user's newest connection gets the call, the older one nothing."""
    older = await gateway.device("user-1", "d-old")
    newer = await gateway.device("user-1", "d-new")
    task = start_call(gateway)
    call = await newer.recv_type("tool_call")
    await reply(newer, call, result="from new")
    status, body = await answer_of(task)
    assert status == 200, body
    assert body["device_id"] == "d-new", body
    await older.expect_silence()


async def test_reconnected_device_becomes_the_most_recent(gateway: Harness) -> None:
    """A device that reconnects (replacing its old socket) is the newest again."""
    await gateway.device("user-1", "d1")
    await gateway.device("user-1", "d2")
    d1_again = await gateway.device("user-1", "d1")
    task = start_call(gateway)
    call = await d1_again.recv_type("tool_call")
    await reply(d1_again, call, result=1)
    status, body = await answer_of(task)
    assert status == 200, body
    assert body["device_id"] == "d1", body


async def test_without_device_id_falls_back_when_the_newest_device_leaves(
    gateway: Harness,
) -> None:
    """When the newest device disconnects, the user's remaining device is called."""
    older = await gateway.device("user-1", "d-old")
    newer = await gateway.device("user-1", "d-new")
    await newer.close()
    await gateway.wait_for(lambda: gateway.svc.registry.get("user-1", "d-new") is None)
    task = start_call(gateway)
    call = await older.recv_type("tool_call")
    await reply(older, call, result="from old")
    status, body = await answer_of(task)
    assert status == 200, body
    assert body["device_id"] == "d-old", body


async def test_explicit_device_id_calls_that_device(gateway: Harness) -> None:
    """device_id picks that device even when it is not the newest."""
    d1 = await gateway.device("user-1", "d1")
    d2 = await gateway.device("user-1", "d2")
    task = start_call(gateway, device_id="d1")
    call = await d1.recv_type("tool_call")
    await reply(d1, call, result="d1 here")
    status, body = await answer_of(task)
    assert status == 200, body
    assert body["device_id"] == "d1" and body["result"] == "d1 here", body
    await d2.expect_silence()


# ---------------------------------------------------------------- device_offline


async def test_user_without_devices_gets_404_device_offline(gateway: Harness) -> None:
    """No connected device for the user: 404 device_offline, answered at once."""
    status, body = await call_now(gateway, user_id="nobody")
    assert status == 404, body
    assert body["error"] == "device_offline", body
    assert body["detail"], body


async def test_unknown_device_id_gets_404_device_offline(gateway: Harness) -> None:
    """A device_id the user has not connected: 404, and the user's other device is not used."""
    other = await gateway.device("user-1", "d1")
    status, body = await call_now(gateway, device_id="d-missing")
    assert status == 404, body
    assert body["error"] == "device_offline", body
    await other.expect_silence()


async def test_another_users_device_is_never_called(gateway: Harness) -> None:
    """Neither by default nor by naming its device_id can a call reach another user's device."""
    foreign = await gateway.device("user-2", "shared-name")
    status, body = await call_now(gateway, user_id="user-1")
    assert status == 404, body
    assert body["error"] == "device_offline", body
    status, body = await call_now(gateway, user_id="user-1", device_id="shared-name")
    assert status == 404, body
    assert body["error"] == "device_offline", body
    await foreign.expect_silence()


async def test_device_that_is_closing_is_not_called(gateway: Harness) -> None:
    """A device whose socket is already on its way out is offline for new calls."""
    device = await gateway.device("user-1", "d1")
    conn = gateway.svc.registry.get("user-1", "d1")
    assert conn is not None
    conn.mark_closing(1000, "test: closing")
    status, body = await call_now(gateway)
    assert status == 404, body
    assert body["error"] == "device_offline", body
    await device.close()


# ---------------------------------------------------------------- timeouts


async def test_timeout_answers_504_and_sends_tool_cancel(gateway: Harness) -> None:
    """No answer within timeout_s: 504 timeout, and the device is told tool_cancel {id, reason}."""
    device = await gateway.device("user-1", "d1")
    task = start_call(gateway, timeout_s=0.3)
    call = await device.recv_type("tool_call")
    cancel = await device.recv_type("tool_cancel")
    assert cancel == {"type": "tool_cancel", "id": call["id"], "reason": "timeout"}
    status, body = await answer_of(task)
    assert status == 504, body
    assert body["error"] == "timeout", body
    assert body["device_id"] == "d1", body
    assert pending_calls(gateway, "user-1", "d1") == 0


async def test_late_result_after_timeout_gets_unknown_call(gateway: Harness) -> None:
    """A tool_result arriving after the 504 is refused with unknown_call; the socket stays."""
    device = await gateway.device("user-1", "d1")
    task = start_call(gateway, timeout_s=0.3)
    call = await device.recv_type("tool_call")
    await device.recv_type("tool_cancel")
    status, body = await answer_of(task)
    assert status == 504, body
    assert "within 0.3 s" in body["detail"], body
    await reply(device, call, result="too late")
    error = await device.recv_type("error")
    assert error["code"] == "unknown_call", error
    assert error["ref"] == "tool_result", error
    # The connection is still usable.
    task = start_call(gateway)
    call = await device.recv_type("tool_call")
    await reply(device, call, result="on time")
    status, body = await answer_of(task)
    assert status == 200, body


async def test_tool_progress_restarts_the_timeout(gateway: Harness) -> None:
    """Each tool_progress gives the call another timeout_s, so a slow but alive tool succeeds."""
    device = await gateway.device("user-1", "d1")
    task = start_call(gateway, timeout_s=0.6, max_timeout_s=10)
    call = await device.recv_type("tool_call")
    for step in range(3):  # 0.9 s in all: past the 0.6 s timeout without the progress frames
        await asyncio.sleep(0.3)
        await device.send({"type": "tool_progress", "id": call["id"],
                           "progress": step / 3, "message": f"step {step}"})
    assert not task.done()
    await reply(device, call, result="slow but done")
    status, body = await answer_of(task)
    assert status == 200, body
    assert body["result"] == "slow but done", body
    await device.expect_silence(0.1)  # no error frame for the progress frames


async def call_kept_alive(gateway: Harness, device: Device, *, every_s: float,
                          **body: Any) -> tuple[dict[str, Any], tuple[int, Any], float]:
    """A call the device keeps alive with tool_progress every ``every_s`` and never
    answers: its tool_call frame, the HTTP answer, and the seconds until it came."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = start_call(gateway, **body)
    call = await device.recv_type("tool_call")

    async def keep_alive() -> None:
        while not task.done():
            await device.send({"type": "tool_progress", "id": call["id"]})
            await asyncio.sleep(every_s)

    feeder = asyncio.create_task(keep_alive())
    try:
        answer = await answer_of(task)
        return call, answer, loop.time() - started
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await feeder


async def test_max_timeout_s_bounds_a_call_kept_alive_by_progress(gateway: Harness) -> None:
    """Progress cannot keep a call alive past max_timeout_s: 504 at the hard bound."""
    device = await gateway.device("user-1", "d1")
    call, (status, body), elapsed = await call_kept_alive(
        gateway, device, every_s=0.1, timeout_s=0.4, max_timeout_s=1.0)
    assert status == 504, body
    assert body["error"] == "timeout", body
    assert "max_timeout_s" in body["detail"], body  # it says which bound ended it
    assert elapsed >= 0.95, f"ended after {elapsed:.2f} s, before the 1.0 s hard bound"
    assert elapsed < 3.0, f"ended after {elapsed:.2f} s, long past the 1.0 s hard bound"
    cancel = await device.recv_type("tool_cancel")
    assert cancel["id"] == call["id"] and cancel["reason"] == "timeout", cancel


async def test_max_timeout_s_defaults_to_ten_times_timeout_s(gateway: Harness) -> None:
    """Without max_timeout_s, progress keeps a call alive for at most 10 x timeout_s."""
    device = await gateway.device("user-1", "d1")
    _call, (status, body), elapsed = await call_kept_alive(
        gateway, device, every_s=0.05, timeout_s=0.2)
    assert status == 504, body
    assert 1.95 <= elapsed < 4.0, f"ended after {elapsed:.2f} s, expected about 2.0 s"


async def test_timeout_ms_in_the_tool_call_is_timeout_s_times_1000(gateway: Harness) -> None:
    """The device is told the caller's budget: timeout_ms = timeout_s * 1000 (default 30 s)."""
    device = await gateway.device("user-1", "d1")
    for timeout_s, expected_ms in [(None, 30_000), (2.5, 2500), (7, 7000), (1.005, 1005)]:
        body: dict[str, Any] = {} if timeout_s is None else {"timeout_s": timeout_s}
        task = start_call(gateway, **body)
        call = await device.recv_type("tool_call")
        assert call["timeout_ms"] == expected_ms, (timeout_s, call)
        assert isinstance(call["timeout_ms"], int), call
        await reply(device, call, result=None)
        status, answer = await answer_of(task)
        assert status == 200, answer


async def test_args_default_to_an_empty_object(gateway: Harness) -> None:
    """A call without args (or with args null) reaches the device with args {}."""
    device = await gateway.device("user-1", "d1")
    for extra in ({}, {"args": None}):
        task = start_call(gateway, **extra)
        call = await device.recv_type("tool_call")
        assert call["args"] == {}, call
        await reply(device, call, result=None)
        status, body = await answer_of(task)
        assert status == 200, body


# ---------------------------------------------------------------- failures mid-call


async def test_device_dropping_mid_call_answers_503_at_once(gateway: Harness) -> None:
    """The device disconnects during the call: 503 device_disconnected, not a 30 s wait."""
    device = await gateway.device("user-1", "d1")
    task = start_call(gateway, timeout_s=30)
    await device.recv_type("tool_call")
    await device.close()
    status, body = await answer_of(task)
    assert status == 503, body
    assert body["error"] == "device_disconnected", body


async def test_device_replaced_mid_call_fails_the_old_call_only(gateway: Harness) -> None:
    """A reconnect of the same device fails the call pending on the old socket (503);
    the new socket is not sent that call and stays usable."""
    old = await gateway.device("user-1", "d1")
    task = start_call(gateway, timeout_s=30)
    await old.recv_type("tool_call")
    new = await gateway.device("user-1", "d1")
    assert await old.expect_close() == 4000
    status, body = await answer_of(task)
    assert status == 503, body
    assert body["error"] == "device_disconnected", body
    await new.expect_silence()
    task = start_call(gateway)
    call = await new.recv_type("tool_call")
    await reply(new, call, result="new socket")
    status, body = await answer_of(task)
    assert status == 200, body


async def test_draining_gateway_refuses_new_calls_with_503(gateway: Harness) -> None:
    """While draining, a new call is 503 gateway_shutdown and the device is not called."""
    device = await gateway.device("user-1", "d1")
    gateway.svc.draining = True
    status, body = await call_now(gateway)
    assert status == 503, body
    assert body["error"] == "gateway_shutdown", body
    await device.expect_silence()


async def test_call_pending_when_drain_starts_answers_503_gateway_shutdown(
    gateway: Harness,
) -> None:
    """Draining closes devices with 1001; their pending calls fail with gateway_shutdown."""
    device = await gateway.device("user-1", "d1")
    task = start_call(gateway, timeout_s=30)
    await device.recv_type("tool_call")
    gateway.svc.draining = True
    draining = asyncio.create_task(drain(gateway.svc))
    assert await device.expect_close() == 1001
    status, body = await answer_of(task)
    assert status == 503, body
    assert body["error"] == "gateway_shutdown", body
    await asyncio.wait_for(draining, ANSWER_WITHIN_S)


async def test_in_flight_limit_answers_429(make_gateway: Any) -> None:
    """With max_inflight_calls_per_device=2 and two calls pending, a third is 429 too_many_calls;
    once they are answered the device takes calls again."""
    gateway = await make_gateway(max_inflight_calls_per_device=2)
    device = await gateway.device("user-1", "d1")
    first = start_call(gateway, args={"n": 1})
    second = start_call(gateway, args={"n": 2})
    calls = [await device.recv_type("tool_call"), await device.recv_type("tool_call")]
    status, body = await call_now(gateway, args={"n": 3})
    assert status == 429, body
    assert body["error"] == "too_many_calls", body
    await device.expect_silence()
    for call in calls:
        await reply(device, call, result=call["args"]["n"])
    for task in (first, second):
        status, body = await answer_of(task)
        assert status == 200, body
    task = start_call(gateway)
    call = await device.recv_type("tool_call")
    await reply(device, call, result="again")
    status, body = await answer_of(task)
    assert status == 200, body


async def test_in_flight_limit_is_per_device(make_gateway: Any) -> None:
    """One busy device does not block calls to the same user's other device."""
    gateway = await make_gateway(max_inflight_calls_per_device=1)
    busy = await gateway.device("user-1", "busy")
    free = await gateway.device("user-1", "free")
    pending = start_call(gateway, device_id="busy")
    busy_call = await busy.recv_type("tool_call")
    task = start_call(gateway, device_id="free")
    call = await free.recv_type("tool_call")
    await reply(free, call, result="free")
    status, body = await answer_of(task)
    assert status == 200, body
    await reply(busy, busy_call, result="busy")
    status, body = await answer_of(pending)
    assert status == 200, body


async def test_other_device_cannot_answer_a_call(gateway: Harness) -> None:
    """A tool_result naming a call sent to another device is unknown_call; the call still waits
    for its own device."""
    d1 = await gateway.device("user-1", "d1")
    d2 = await gateway.device("user-1", "d2")
    task = start_call(gateway, device_id="d1")
    call = await d1.recv_type("tool_call")
    await reply(d2, call, result="hijacked")
    error = await d2.recv_type("error")
    assert error["code"] == "unknown_call", error
    assert not task.done()
    await reply(d1, call, result="genuine")
    status, body = await answer_of(task)
    assert status == 200, body
    assert body["result"] == "genuine", body


# ---------------------------------------------------------------- the caller goes away


async def test_cancelled_caller_request_sends_tool_cancel(gateway: Harness) -> None:
    """The HTTP caller gives up (its request is cancelled): the device gets tool_cancel."""
    device = await gateway.device("user-1", "d1")
    task = start_call(gateway, timeout_s=30)
    call = await device.recv_type("tool_call")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    cancel = await device.recv_type("tool_cancel")
    assert cancel == {"type": "tool_cancel", "id": call["id"], "reason": "caller_gone"}
    await gateway.wait_for(lambda: pending_calls(gateway, "user-1", "d1") == 0)
    await reply(device, call, result="nobody listens")
    error = await device.recv_type("error")
    assert error["code"] == "unknown_call", error


async def test_closed_caller_session_sends_tool_cancel(gateway: Harness) -> None:
    """The caller's HTTP client closes its connection mid-call: the device gets tool_cancel."""
    device = await gateway.device("user-1", "d1")
    url = gateway.internal.make_url("/internal/v1/tool-calls")
    session = aiohttp.ClientSession()
    try:
        request = asyncio.create_task(session.post(
            url, json={"user_id": "user-1", "tool": "echo", "timeout_s": 30},
            headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}))
        call = await device.recv_type("tool_call")
    finally:
        await session.close()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(request, ANSWER_WITHIN_S)
    cancel = await device.recv_type("tool_cancel")
    assert cancel["id"] == call["id"], cancel
    assert cancel["reason"] == "caller_gone", cancel
    await gateway.wait_for(lambda: pending_calls(gateway, "user-1", "d1") == 0)


# ---------------------------------------------------------------- concurrency


async def test_concurrent_calls_answered_out_of_order_get_their_own_results(
    gateway: Harness,
) -> None:
    """50 calls in flight on one device, answered in reverse order: each caller gets its own."""
    device = await gateway.device("user-1", "d1")
    tasks = [start_call(gateway, args={"n": n}) for n in range(50)]
    calls = [await device.recv_type("tool_call") for _ in tasks]
    assert len({call["id"] for call in calls}) == 50
    assert sorted(call["args"]["n"] for call in calls) == list(range(50))
    for call in reversed(calls):
        await reply(device, call, result={"n": call["args"]["n"]})
    id_of = {call["args"]["n"]: call["id"] for call in calls}
    results = await asyncio.wait_for(asyncio.gather(*tasks), ANSWER_WITHIN_S)
    for n, (status, body) in enumerate(results):
        assert status == 200, body
        assert body["result"] == {"n": n}, body
        assert body["call_id"] == id_of[n], body
    assert pending_calls(gateway, "user-1", "d1") == 0
