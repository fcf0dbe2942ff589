"""Property-based: every device frame and internal API body is kept as sent or refused.

For each generated input the gateway either accepts it, and what it stores
(or hands the caller) equals what was sent, or refuses it with ``bad_frame``
(devices) or 400 (the API): never 1011, never 5xx, never a traceback at
error level (issue 11). Hypothesis runs in a worker thread and hands each
example to the test's event loop, where the real gateway runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from harness import Device, Harness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MakeGateway = Callable[..., Awaitable[Harness]]
EXAMPLES = 150
EXAMPLE_TIMEOUT_S = 30.0
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                             derandomize=True, suppress_health_check=list(HealthCheck))
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1

# ---------------------------------------------------------------- JSON texts

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=INT64_MIN, max_value=UINT64_MAX),
    st.integers(min_value=-(2**80), max_value=2**80),  # some beyond 64 bits
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),  # NUL and lone surrogates included
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(st.text(max_size=10), children, max_size=5)),
    max_leaves=30,
)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    """A value nested 100-300 levels (the bound is 128)."""
    depth = draw(st.integers(min_value=100, max_value=300))
    value: Any = draw(scalars)
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


any_value = st.one_of(values, values, deep())


def encode(value: Any) -> str:
    """JSON text as a device or service writes it (surrogates escaped, ints exact)."""
    return json.dumps(value)


def storable(value: Any, *, nul: bool = False) -> bool:
    """What the contract says the gateway must keep (else: bad_frame/400).

    ``nul``: NUL in strings is fine (a value handed on, never stored in jsonb).
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, int):
            if not INT64_MIN <= item <= UINT64_MAX:
                return False
        elif isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, str):
            if (not nul and "\x00" in item) or any(0xD800 <= ord(c) <= 0xDFFF for c in item):
                return False
        elif isinstance(item, list | dict):
            if depth + 1 > 128:
                return False
            children = item.values() if isinstance(item, dict) else item
            if isinstance(item, dict) and not storable(list(item.keys()), nul=nul):
                return False
            stack.extend((child, depth + 1) for child in children)
    return True


def same(stored: Any, sent: Any) -> bool:
    """Equal as JSON values: jsonb keeps a number as the decimal written, so 1e19
    comes back as 10000000000000000000 (the same double once read as one) and -0.0
    as 0; everything else must match exactly."""
    if isinstance(sent, bool) or isinstance(stored, bool):
        return stored is sent
    if isinstance(sent, float) and isinstance(stored, int | float):
        return float(stored) == sent  # the decimal written, read back as a double
    if isinstance(sent, int) and isinstance(stored, int | float):
        return stored == sent
    if isinstance(sent, list) and isinstance(stored, list):
        return len(sent) == len(stored) and all(map(same, stored, sent))
    if isinstance(sent, dict) and isinstance(stored, dict):
        return stored.keys() == sent.keys() and all(same(stored[k], sent[k]) for k in sent)
    return bool(stored == sent) and type(stored) is type(sent)


# ---------------------------------------------------------------- running examples


def run_examples(strategy: st.SearchStrategy[Any],
                 check: Callable[[Any], Awaitable[None]]) -> Awaitable[None]:
    """Hypothesis in a thread, each example checked on the running event loop."""
    loop = asyncio.get_running_loop()

    @PROPERTY_SETTINGS
    @given(strategy)
    def property_holds(example: Any) -> None:
        asyncio.run_coroutine_threadsafe(check(example), loop).result(EXAMPLE_TIMEOUT_S)

    return asyncio.to_thread(property_holds)


@pytest.fixture
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Any:
    """Fails the test if anything (structlog or stdlib) logs at error level."""
    with structlog.testing.capture_logs() as captured:
        yield
    errors = [e for e in captured if e.get("log_level") in ("error", "critical")]
    errors += [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]


async def start_run(gateway: Harness, device: Device) -> str:
    status, answer = await gateway.api("POST", "/runs", {
        "user_id": device.user_id, "agent_id": "agent-1", "device_id": device.device_id})
    assert status == 201, answer
    return str((await device.recv_type("agent_run"))["run_id"])


async def outcome(device: Device, text: str) -> str | None:
    """Send ``text``; the error code it earned, or None when it was accepted."""
    await device.ws.send_str(text)
    await device.send({"type": "ping"})
    frame = await device.recv()
    if frame["type"] == "pong":
        return None
    assert frame["type"] == "error", frame
    assert (await device.recv())["type"] == "pong"
    return str(frame["code"])


# ---------------------------------------------------------------- devices


async def test_agent_data_is_stored_as_sent_or_refused_as_bad_frame(
        make_gateway: MakeGateway, no_errors_logged: None) -> None:
    gateway = await make_gateway(bad_frames_per_minute=100_000)
    device = await gateway.device("user-1", "d1", ["agent-1"])
    run_id = await start_run(gateway, device)
    accepted: list[Any] = []
    refused = [0]

    async def check(value: Any) -> None:
        text = encode({"type": "agent_data", "run_id": run_id, "data": "@"})
        code = await outcome(device, text.replace('"@"', encode(value)))
        if storable(value):
            assert code is None, (code, value)
            accepted.append(value)
        else:
            assert code == "bad_frame", (code, value)
            refused[0] += 1

    await run_examples(any_value, check)
    assert not device.ws.closed
    print(f"\nagent_data: {len(accepted)} stored, {refused[0]} refused")
    assert len(accepted) >= EXAMPLES // 4 and refused[0] >= EXAMPLES // 10  # both sides tried
    await gateway.svc.writer.flush()
    rows = await gateway.svc.pool.fetch(
        "SELECT data::text FROM agent_run_events WHERE run_id = $1 ORDER BY seq",
        uuid.UUID(run_id))
    stored = [orjson.loads(row[0]) for row in rows]
    assert len(stored) == len(accepted)
    for got, sent in zip(stored, accepted, strict=True):
        assert same(got, sent), (got, sent)


frame_types = st.sampled_from(["tool_result", "tool_progress", "agent_data", "agent_complete",
                               "ping", "pong", "auth_refresh", "device_hello", "nonsense"])
frames = st.one_of(
    st.builds(lambda t, f: {**f, "type": t}, frame_types,
              st.dictionaries(st.sampled_from(["id", "run_id", "data", "result", "error",
                                               "status", "errors", "progress", "message",
                                               "seq", "token", "device_id", "agent_ids",
                                               "capabilities"]), any_value, max_size=4)),
    any_value,
)


async def test_any_frame_is_answered_never_1011(
        make_gateway: MakeGateway, no_errors_logged: None) -> None:
    gateway = await make_gateway(bad_frames_per_minute=100_000)
    device = await gateway.device("user-1", "d1", ["agent-1"])
    allowed = {None, "bad_frame", "unknown_call", "unknown_run", "run_finished",
               "auth_refresh_rejected"}

    async def check(frame: Any) -> None:
        code = await outcome(device, encode(frame))
        assert code in allowed, (code, frame)

    await run_examples(frames, check)
    assert not device.ws.closed


async def test_tool_results_reach_the_caller_as_sent_or_are_refused(
        make_gateway: MakeGateway, no_errors_logged: None) -> None:
    gateway = await make_gateway(bad_frames_per_minute=100_000)
    device = await gateway.device("user-1", "d1")

    async def check(value: Any) -> None:
        call = asyncio.ensure_future(gateway.api("POST", "/tool-calls", {
            "user_id": "user-1", "tool": "echo", "timeout_s": 10}))
        call_id = (await device.recv_type("tool_call"))["id"]
        text = encode({"type": "tool_result", "id": call_id, "result": "@"})
        code = await outcome(device, text.replace('"@"', encode(value)))
        if storable(value, nul=True):
            assert code is None, (code, value)
        else:
            assert code == "bad_frame", (code, value)
            await device.send({"type": "tool_result", "id": call_id, "result": None})
            value = None
        status, answer = await call
        assert status == 200 and same(answer["result"], value), (status, answer, value)

    await run_examples(any_value, check)


# ---------------------------------------------------------------- the internal API


bodies = st.one_of(
    st.builds(lambda extra, value: {"user_id": "user-1", "agent_id": "agent-1",
                                    "input": value, **extra},
              st.dictionaries(st.sampled_from(["device_id", "scheduled_at", "user_id"]),
                              any_value, max_size=2),
              any_value),
    any_value,
)


async def test_run_bodies_are_stored_as_sent_or_refused_with_400(
        gateway: Harness, no_errors_logged: None) -> None:
    async def check(body: Any) -> None:
        status, answer = await gateway.api("POST", "/runs", raw=encode(body).encode())
        assert status in (201, 400), (status, answer, body)
        if status == 201:
            assert storable(body), body
            status, record = await gateway.api("GET", f"/runs/{answer['run_id']}")
            assert status == 200 and same(record["input"], body["input"]), (record, body)
        elif isinstance(body, dict) and body.keys() == {"user_id", "agent_id", "input"} and (
                body["user_id"], body["agent_id"]) == ("user-1", "agent-1"):
            assert not storable(body), (answer, body)

    await run_examples(bodies, check)


async def test_garbage_bytes_are_bad_frames_and_400s(
        make_gateway: MakeGateway, no_errors_logged: None) -> None:
    gateway = await make_gateway(bad_frames_per_minute=100_000)
    device = await gateway.device("user-1", "d1")
    session_closed: list[aiohttp.ClientWebSocketResponse] = []

    async def check(raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace")
        try:
            json.loads(text)
            return  # valid JSON: the other properties cover it
        except ValueError:
            pass
        assert await outcome(device, text) == "bad_frame"
        status, _ = await gateway.api("POST", "/runs", raw=raw)
        assert status == 400
        if device.ws.closed:
            session_closed.append(device.ws)

    await run_examples(st.binary(max_size=200), check)
    assert not session_closed
