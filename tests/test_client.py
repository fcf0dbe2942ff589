"""gateway.client against the gateway: the real apps on real sockets, devices over WebSockets.

Each typed exception is produced by the situation it names, never by a mock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
from e2e.proc import free_port
from harness import SERVICE_TOKEN, Device, Harness

from gateway.client import (
    BadRequest,
    DeviceDisconnected,
    DeviceOffline,
    GatewayClient,
    GatewayShuttingDown,
    GatewayUnavailable,
    RunEvent,
    RunFinished,
    RunNotFound,
    ToolFailed,
    ToolTimeout,
    TooManyCalls,
    Unauthorized,
)

MakeGateway = Callable[..., Awaitable[Harness]]
AGENT = "agent-1"


def url_of(gw: Harness) -> str:
    return str(gw.internal.make_url("/"))


@contextlib.asynccontextmanager
async def client_of(gw: Harness, token: str = SERVICE_TOKEN, **options: Any
                    ) -> AsyncIterator[GatewayClient]:
    async with GatewayClient(url_of(gw), token, **options) as client:
        yield client


async def answer_one_call(device: Device, reply: dict[str, Any]) -> dict[str, Any]:
    """Wait for a tool_call, answer it with ``reply`` (plus its id); the call frame."""
    call = await device.recv_type("tool_call")
    await device.send({"type": "tool_result", "id": call["id"], **reply})
    return call


# ---------------------------------------------------------------- tool calls


async def test_call_tool_returns_the_devices_result(gateway: Harness) -> None:
    device = await gateway.device()
    async with client_of(gateway) as gw:
        answering = asyncio.create_task(answer_one_call(device, {"result": {"hi": [1, 2]}}))
        result = await gw.call_tool("user-1", "echo", {"hi": 1}, timeout=7.5)
        call = await answering
    assert result == {"hi": [1, 2]}
    assert call["tool"] == "echo"
    assert call["args"] == {"hi": 1}
    assert call["timeout_ms"] == 7500


async def test_call_tool_accepts_the_internal_v1_url_and_picks_the_named_device(
    gateway: Harness,
) -> None:
    await gateway.device(device_id="laptop")
    phone = await gateway.device(device_id="phone")  # the most recent, but not asked for
    laptop = await gateway.device(device_id="laptop-2")
    async with GatewayClient(url_of(gateway) + "internal/v1/", SERVICE_TOKEN) as gw:
        answering = asyncio.create_task(answer_one_call(phone, {"result": "from phone"}))
        assert await gw.call_tool("user-1", "t", device_id="phone") == "from phone"
        await answering
    await laptop.expect_silence(0.05)


async def test_a_failing_tool_raises_tool_failed_with_its_code_and_message(
    gateway: Harness,
) -> None:
    device = await gateway.device()
    async with client_of(gateway) as gw:
        answering = asyncio.create_task(answer_one_call(
            device, {"error": {"code": "no_such_file", "message": "gone"}}))
        with pytest.raises(ToolFailed) as caught:
            await gw.call_tool("user-1", "read", {"path": "/x"})
        call = await answering
    assert (caught.value.code, caught.value.detail) == ("no_such_file", "gone")
    assert caught.value.device_id == "device-1"
    assert caught.value.call_id == call["id"]


async def test_no_device_raises_device_offline(gateway: Harness) -> None:
    async with client_of(gateway) as gw:
        with pytest.raises(DeviceOffline) as caught:
            await gw.call_tool("nobody", "echo")
    assert (caught.value.status, caught.value.code) == (404, "device_offline")


async def test_a_silent_device_raises_tool_timeout_and_is_told_to_cancel(
    gateway: Harness,
) -> None:
    device = await gateway.device()
    async with client_of(gateway) as gw:
        with pytest.raises(ToolTimeout) as caught:
            await gw.call_tool("user-1", "slow", timeout=0.05)
    assert caught.value.status == 504
    call = await device.recv_type("tool_call")
    cancel = await device.recv_type("tool_cancel")
    assert (cancel["id"], cancel["reason"]) == (call["id"], "timeout")


async def test_a_device_dropping_mid_call_raises_device_disconnected(gateway: Harness) -> None:
    device = await gateway.device()

    async def drop() -> None:
        await device.recv_type("tool_call")
        await device.close()

    async with client_of(gateway) as gw:
        dropping = asyncio.create_task(drop())
        with pytest.raises(DeviceDisconnected) as caught:
            await gw.call_tool("user-1", "echo")
        await dropping
    assert caught.value.device_id == "device-1"


async def test_a_busy_device_raises_too_many_calls(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(max_inflight_calls_per_device=1)
    device = await gateway.device()
    async with client_of(gateway) as gw:
        first = asyncio.create_task(gw.call_tool("user-1", "slow"))
        call = await device.recv_type("tool_call")
        with pytest.raises(TooManyCalls):
            await gw.call_tool("user-1", "echo")
        await device.send({"type": "tool_result", "id": call["id"], "result": 1})
        assert await first == 1


@pytest.mark.parametrize(("user_id", "tool", "field"), [
    ("", "echo", "user_id"),
    ("user-1", "", "tool"),
    ("user-1\n", "echo", "user_id"),
])
async def test_bad_input_raises_bad_request_naming_the_field(
    gateway: Harness, user_id: str, tool: str, field: str,
) -> None:
    async with client_of(gateway) as gw:
        with pytest.raises(BadRequest) as caught:
            await gw.call_tool(user_id, tool)
    assert caught.value.status == 400
    assert field in caught.value.detail


async def test_a_timeout_above_the_gateways_limit_is_a_bad_request(gateway: Harness) -> None:
    async with client_of(gateway) as gw:
        with pytest.raises(BadRequest, match="timeout_s"):
            await gw.call_tool("user-1", "echo", timeout=3601)
        with pytest.raises(BadRequest, match="max_timeout_s"):
            await gw.call_tool("user-1", "echo", timeout=5, max_timeout=1)


async def test_a_wrong_token_raises_unauthorized(gateway: Harness) -> None:
    async with client_of(gateway, token="not-the-service-token") as gw:
        with pytest.raises(Unauthorized):
            await gw.devices("user-1")


async def test_nothing_listening_raises_gateway_unavailable() -> None:
    async with GatewayClient(f"http://127.0.0.1:{free_port()}", SERVICE_TOKEN) as gw:
        with pytest.raises(GatewayUnavailable):
            await gw.call_tool("user-1", "echo")


async def test_a_draining_gateway_raises_gateway_shutting_down(gateway: Harness) -> None:
    await gateway.device()
    gateway.svc.draining = True
    async with client_of(gateway) as gw:
        with pytest.raises(GatewayShuttingDown) as caught:
            await gw.call_tool("user-1", "echo")
    assert isinstance(caught.value, GatewayUnavailable)
    assert caught.value.status == 503


async def test_the_client_needs_its_context_manager(gateway: Harness) -> None:
    gw = GatewayClient(url_of(gateway), SERVICE_TOKEN)
    with pytest.raises(RuntimeError, match="async with"):
        await gw.devices("user-1")


# ---------------------------------------------------------------- presence


async def test_devices_lists_the_users_connected_devices(gateway: Harness) -> None:
    await gateway.device(device_id="laptop", agent_ids=[AGENT])
    await gateway.device(user_id="user-2", device_id="other")
    async with client_of(gateway) as gw:
        devices = await gw.devices("user-1")
        assert await gw.devices("user-3") == []
    assert [(d.user_id, d.device_id, d.agent_ids) for d in devices] == [
        ("user-1", "laptop", (AGENT,))]
    assert devices[0].connected_at.tzinfo is not None


# ---------------------------------------------------------------- runs


async def stream_run(device: Device, events: list[Any], result: Any) -> str:
    """Act as the agent: take the agent_run, send ``events``, complete with ``result``."""
    frame = await device.recv_type("agent_run")
    for data in events:
        await device.send({"type": "agent_data", "run_id": frame["run_id"], "data": data})
    await device.send({"type": "agent_complete", "run_id": frame["run_id"],
                       "status": "completed", "result": result})
    run_id: str = frame["run_id"]
    return run_id


async def collect(events: AsyncIterator[RunEvent]) -> list[RunEvent]:
    return [event async for event in events]


async def test_start_run_follow_it_to_the_end_and_read_the_record(gateway: Harness) -> None:
    device = await gateway.device(agent_ids=[AGENT])
    async with client_of(gateway) as gw:
        run = await gw.start_run("user-1", AGENT, {"q": "x"})
        assert (run.status, run.input, run.device_id) == ("running", {"q": "x"}, "device-1")
        await stream_run(device, [{"i": 1}, {"i": 2}, "three"], {"done": True})
        events = await collect(gw.follow_run(run.run_id))
        final = await gw.get_run(run.run_id)
        later = await collect(gw.follow_run(run.run_id, after=2))
        listed = await gw.list_runs("user-1")
        completed = await gw.list_runs("user-1", status="completed", limit=1)
    assert [(e.seq, e.data) for e in events] == [(1, {"i": 1}), (2, {"i": 2}), (3, "three")]
    assert (final.status, final.result, final.event_count) == ("completed", {"done": True}, 3)
    assert final.finished and final.finished_at is not None
    assert [e.seq for e in later] == [3]
    assert [r.run_id for r in listed] == [run.run_id] == [r.run_id for r in completed]


async def test_follow_run_streams_events_as_they_arrive(gateway: Harness) -> None:
    device = await gateway.device(agent_ids=[AGENT])
    async with client_of(gateway) as gw:
        run = await gw.start_run("user-1", AGENT)
        frame = await device.recv_type("agent_run")
        events = gw.follow_run(run.run_id)
        for i in (1, 2):
            await device.send({"type": "agent_data", "run_id": frame["run_id"], "data": i})
            event = await anext(events)
            assert (event.seq, event.data) == (i, i)
        await device.send({"type": "agent_complete", "run_id": frame["run_id"],
                           "status": "completed"})
        assert await collect(events) == []


async def test_cancel_run_then_run_finished_then_run_not_found(gateway: Harness) -> None:
    async with client_of(gateway) as gw:
        run = await gw.start_run("user-1", AGENT)  # no device: stays pending
        assert run.status == "pending"
        cancelled = await gw.cancel_run(run.run_id)
        assert cancelled.status == "cancelled"
        with pytest.raises(RunFinished) as caught:
            await gw.cancel_run(run.run_id)
        assert caught.value.run.status == "cancelled"
        assert await collect(gw.follow_run(run.run_id)) == []
        unknown = str(uuid.uuid4())
        for attempt in (gw.get_run(unknown), gw.cancel_run(unknown),
                        collect(gw.follow_run(unknown)), gw.get_run("not-a-uuid")):
            with pytest.raises(RunNotFound):
                await attempt


async def test_scheduled_runs_need_an_aware_time(gateway: Harness) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    await gateway.device(agent_ids=[AGENT])
    async with client_of(gateway) as gw:
        run = await gw.start_run("user-1", AGENT, scheduled_at=later)
        with pytest.raises(ValueError, match="time zone"):
            await gw.start_run("user-1", AGENT, scheduled_at=later.replace(tzinfo=None))
    assert run.status == "pending"
    assert run.scheduled_at == later


async def test_bad_run_input_raises_bad_request(gateway: Harness) -> None:
    async with client_of(gateway) as gw:
        with pytest.raises(BadRequest, match="input"):
            await gw.start_run("user-1", AGENT, {"k": "nul \x00 inside"})
        with pytest.raises(BadRequest, match="limit"):
            await gw.list_runs("user-1", limit=0)


# ---------------------------------------------------------------- a dropped connection


@attrs.define(eq=False)
class Proxy:
    """A TCP relay to the gateway whose connections the test can cut, as a network would."""

    target_port: int
    server: asyncio.Server | None = None
    pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = attrs.Factory(list)
    connections: int = 0
    tasks: set[asyncio.Task[None]] = attrs.Factory(set)

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.pairs.append((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()
        dst.close()

    def cut(self) -> None:
        """Abort every relayed connection, both sides, with no clean end."""
        for down, up in self.pairs:
            down.transport.abort()
            up.transport.abort()
        self.pairs.clear()

    async def close(self) -> None:
        self.cut()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_follow_run_resumes_after_a_dropped_connection_without_loss_or_repeats(
    gateway: Harness,
) -> None:
    device = await gateway.device(agent_ids=[AGENT])
    proxy = Proxy(gateway.internal.port or 0)
    await proxy.start()
    try:
        async with GatewayClient(f"http://127.0.0.1:{proxy.port}", SERVICE_TOKEN) as gw:
            run = await gw.start_run("user-1", AGENT)
            frame = await device.recv_type("agent_run")
            for i in (1, 2):
                await device.send({"type": "agent_data", "run_id": frame["run_id"], "data": i})
            events = gw.follow_run(run.run_id)
            seen = [await anext(events), await anext(events)]
            proxy.cut()
            for i in (3, 4):
                await device.send({"type": "agent_data", "run_id": frame["run_id"], "data": i})
            await device.send({"type": "agent_complete", "run_id": frame["run_id"],
                               "status": "completed"})
            seen += await collect(events)
    finally:
        await proxy.close()
    assert [(e.seq, e.data) for e in seen] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert proxy.connections >= 2  # the first (kept alive from start_run), the resumed one


async def test_follow_run_gives_up_when_the_gateway_stays_away() -> None:
    async with GatewayClient(f"http://127.0.0.1:{free_port()}", SERVICE_TOKEN,
                             reconnect_for_s=0.3) as gw:
        with pytest.raises(GatewayUnavailable, match="gave up"):
            await collect(gw.follow_run(str(uuid.uuid4())))
