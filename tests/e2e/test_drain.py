"""SIGTERM on the real process: the drain of PROTOCOL.md §4 as devices and services see it.

Stop accepting (/readyz 503 or refused), close every device with 1001, fail
pending tool calls with 503 gateway_shutdown, mark running runs error
("gateway shutdown") with every accepted event stored, exit 0 within
GATEWAY_SHUTDOWN_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from harness import Device

from e2e.proc import (
    GatewayProcess,
    call_api,
    connect_device,
    database_env,
    mint_token,
    running_gateway,
)

pytestmark = pytest.mark.e2e

SHUTDOWN_TIMEOUT_S = 5.0
# After SIGTERM the process must stop looking ready at once; this bounds "at once"
# generously for a loaded CI machine (the drain itself is a few milliseconds).
NOT_READY_WITHIN_S = 1.0


async def readyz_until_not_ready(session: aiohttp.ClientSession, proc: GatewayProcess,
                                 within_s: float) -> tuple[str, float]:
    """Poll /readyz until it is not 200: ("503"|"refused", seconds it took)."""
    began = time.monotonic()
    while True:
        try:
            async with session.get(f"{proc.public_url}/readyz",
                                   timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                if resp.status != 200:
                    assert resp.status == 503, await resp.text()
                    return "503", time.monotonic() - began
        except (aiohttp.ClientConnectionError, TimeoutError):
            return "refused", time.monotonic() - began
        assert time.monotonic() - began < within_s, "/readyz still 200 after SIGTERM"
        await asyncio.sleep(0.01)


async def runner_with_a_run(session: aiohttp.ClientSession,
                            proc: GatewayProcess) -> tuple[Device, str]:
    """Device u1/runner, advertising agent-a, with a run just dispatched to it; the run id."""
    runner = await connect_device(session, proc.ws_url, token=mint_token("u1"),
                                  user_id="u1", device_id="runner", agent_ids=["agent-a"])
    status, run = await call_api(session, "POST", f"{proc.internal_url}/runs",
                                 {"user_id": "u1", "agent_id": "agent-a"})
    assert status == 201 and run["status"] == "running", run
    dispatched = await runner.recv_type("agent_run")
    assert dispatched["run_id"] == run["run_id"]
    return runner, run["run_id"]


async def send_three_events(runner: Device, run_id: str) -> None:
    for n in (1, 2, 3):
        await runner.send({"type": "agent_data", "run_id": run_id, "data": {"n": n}})
    # Frames are handled in order: the pong proves all three were accepted.
    await runner.send({"type": "ping"})
    await runner.recv_type("pong")


async def assert_ended_by_shutdown_with_three_events(
    database_url: str, run_id: str, resume_s: str,
) -> None:
    """The run waits for its device, detached "gateway shutdown" (§1.8), or with
    GATEWAY_RUN_RESUME_S=0 is `error` ("gateway shutdown"), finished; either way with its
    three events stored."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT status, errors::text AS errors, event_count, finished_at, detached_at,"
            " detach_reason FROM agent_run_logs WHERE id = $1", uuid.UUID(run_id))
        events = await conn.fetch(
            "SELECT seq, data::text AS data FROM agent_run_events WHERE run_id = $1 "
            "ORDER BY seq", uuid.UUID(run_id))
    finally:
        await conn.close()
    if resume_s == "0":
        assert row["status"] == "error", row
        assert "gateway shutdown" in orjson.loads(row["errors"]), row
        assert row["finished_at"] is not None, row
    else:
        assert (row["status"], row["detach_reason"]) == ("running", "gateway shutdown"), row
        assert row["detached_at"] is not None and row["finished_at"] is None, row
    assert [(e["seq"], orjson.loads(e["data"])) for e in events] == [
        (1, {"n": 1}), (2, {"n": 2}), (3, {"n": 3})]
    assert row["event_count"] == 3


@pytest.mark.parametrize("resume_s", ["0", "30"])
async def test_sigterm_drains_devices_calls_and_runs(
    database_url: str, tmp_path: Path, resume_s: str,
) -> None:
    """Two devices, a tool call in flight, a run streaming: SIGTERM closes both devices with
    1001, answers the call 503 gateway_shutdown, detaches the run for its device to resume
    after the restart (or ends it as error "gateway shutdown" with resume 0) with all its
    accepted events stored, and exits 0 within the shutdown timeout."""
    env = database_env(database_url, GATEWAY_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S),
                       GATEWAY_RUN_RESUME_S=resume_s)
    with running_gateway(env, log_dir=tmp_path) as proc:
        async with aiohttp.ClientSession() as session:
            runner, run_id = await runner_with_a_run(session, proc)
            silent = await connect_device(session, proc.ws_url, token=mint_token("u2"),
                                          user_id="u2", device_id="silent")
            await send_three_events(runner, run_id)

            in_flight = asyncio.create_task(call_api(
                session, "POST", f"{proc.internal_url}/tool-calls",
                {"user_id": "u2", "device_id": "silent", "tool": "slow", "timeout_s": 30}))
            await silent.recv_type("tool_call")  # and never answered

            closes = [asyncio.create_task(d.expect_close(timeout=SHUTDOWN_TIMEOUT_S + 2))
                      for d in (runner, silent)]
            proc.signal(signal.SIGTERM)
            how, after_s = await readyz_until_not_ready(session, proc, NOT_READY_WITHIN_S)
            assert [await c for c in closes] == [1001, 1001]
            status, body = await in_flight
            assert status == 503, body
            assert body["error"] == "gateway_shutdown", body
            code, took_s = await asyncio.to_thread(proc.wait_exit, SHUTDOWN_TIMEOUT_S * 3)
    print(f"drain: /readyz not ready ({how}) after {after_s:.3f} s, exit after {took_s:.2f} s")
    assert code == 0, proc.describe()
    assert took_s < SHUTDOWN_TIMEOUT_S, proc.describe()
    await assert_ended_by_shutdown_with_three_events(database_url, run_id, resume_s)


@pytest.mark.parametrize("resume_s", ["0", "30"])
async def test_a_slow_database_at_shutdown_loses_no_accepted_event(
    database_url: str, tmp_path: Path, resume_s: str,
) -> None:
    """The database stalls the event writer when SIGTERM arrives (another session holds the
    run's row past the 2 s budget): the gateway waits for it instead of dropping the
    accepted events (it gives the last batch at least 5 s), then exits 0 with them stored."""
    timeout_s = 2.0
    env = database_env(database_url, GATEWAY_SHUTDOWN_TIMEOUT_S=str(timeout_s),
                       GATEWAY_RUN_RESUME_S=resume_s)
    with running_gateway(env, log_dir=tmp_path) as proc:
        async with aiohttp.ClientSession() as session:
            runner, run_id = await runner_with_a_run(session, proc)
            blocker = await asyncpg.connect(database_url)
            try:
                lock = blocker.transaction()
                await lock.start()
                # Storing events updates their run's row (event_count): it now waits.
                await blocker.execute(
                    "SELECT 1 FROM agent_run_logs WHERE id = $1 FOR UPDATE", uuid.UUID(run_id))
                await send_three_events(runner, run_id)
                proc.signal(signal.SIGTERM)
                await asyncio.sleep(timeout_s + 1.0)
                still_running = proc.popen.poll() is None
                released_at = time.monotonic()
                await lock.rollback()
            finally:
                await blocker.close()
            code, _ = await asyncio.to_thread(proc.wait_exit, 30)
            exit_after_release_s = time.monotonic() - released_at
    print(f"slow database at shutdown: exit {exit_after_release_s:.2f} s after its release")
    assert still_running, proc.describe()  # waiting for the database, not dropping events
    assert code == 0, proc.describe()
    assert exit_after_release_s < 3.0, proc.describe()
    assert "event_writer_stop_timeout" not in proc.events(), proc.describe()
    await assert_ended_by_shutdown_with_three_events(database_url, run_id, resume_s)


async def test_socket_still_in_its_hello_is_closed_with_1001(
    database_url: str, tmp_path: Path
) -> None:
    """A device that connected but has not said hello yet is closed with 1001 too, and the
    drain does not wait for its hello timeout."""
    env = database_env(database_url, GATEWAY_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S))
    with running_gateway(env, log_dir=tmp_path) as proc:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(proc.ws_url, params={"token": mint_token("u1")})
            device = Device(ws, "u1", "not-yet")
            close = asyncio.create_task(device.expect_close(timeout=SHUTDOWN_TIMEOUT_S + 5))
            proc.signal(signal.SIGTERM)
            code, took_s = await asyncio.to_thread(proc.wait_exit, SHUTDOWN_TIMEOUT_S * 3)
            close_code = await close
    assert close_code == 1001
    assert code == 0, proc.describe()
    assert "drain_timeout" not in proc.events(), proc.describe()
    assert took_s < SHUTDOWN_TIMEOUT_S, proc.describe()


def _small_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket with a fixed 64 KiB receive buffer (no autotuning up to tcp_rmem)."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    return sock


def _kernel_send_buffer_max() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 1024 * 1024


@contextlib.asynccontextmanager
async def stalled_device(proc: GatewayProcess) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """A device that said hello and then stopped reading, with the gateway's socket to it
    full: tool calls with large arguments, more than its window and the kernel's send
    buffer hold, are sent to it and never answered. Yields the in-flight calls."""
    chunk = 3 * 1024 * 1024
    calls_needed = _kernel_send_buffer_max() // chunk + 2
    connector = aiohttp.TCPConnector(socket_factory=_small_receive_buffer)
    async with aiohttp.ClientSession(connector=connector) as device_session, \
            aiohttp.ClientSession() as service:
        # Bound to a name, so it lives as long as this generator: a dropped
        # ClientWebSocketResponse is collected and its connection closed.
        device = await connect_device(device_session, proc.ws_url, token=mint_token("u1"),
                                      user_id="u1", device_id="stalled")
        calls = [asyncio.create_task(call_api(
            service, "POST", f"{proc.internal_url}/tool-calls",
            {"user_id": "u1", "tool": "big", "args": {"blob": "x" * chunk}, "timeout_s": 60}))
            for _ in range(calls_needed)]
        # Nothing the device could observe says the gateway's buffers are full (it reads
        # nothing); the gateway needs a few milliseconds to take the requests.
        await asyncio.sleep(0.5)
        try:
            yield calls
        finally:
            del device
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)


# 10 s, the default: the close frame gets its full handshake budget (5 s). 2 s: less
# than that budget, so the drain itself has to drop the device when its time is up.
@pytest.mark.parametrize("timeout_s", [10.0, 2.0])
async def test_device_that_stopped_reading_does_not_hold_up_the_exit(
    database_url: str, tmp_path: Path, timeout_s: float
) -> None:
    """A device whose TCP window is full cannot even take the close frame: the gateway
    drops it, answers its callers 503 and still exits 0 within GATEWAY_SHUTDOWN_TIMEOUT_S."""
    env = database_env(database_url, GATEWAY_SHUTDOWN_TIMEOUT_S=str(timeout_s))
    with running_gateway(env, log_dir=tmp_path) as proc:
        async with stalled_device(proc) as calls:
            code, took_s = await asyncio.to_thread(proc.stop, timeout_s * 3)
            answers = await asyncio.gather(*calls, return_exceptions=True)
    print(f"drain with a stalled device: exit after {took_s:.2f} s")
    assert code == 0, proc.describe()
    assert took_s < timeout_s, proc.describe()
    for answer in answers:
        assert not isinstance(answer, BaseException), answers
        status, body = answer
        assert status == 503, body
        assert body["error"] == "gateway_shutdown", body


async def test_second_sigterm_during_a_drain_exits_at_once(
    database_url: str, tmp_path: Path
) -> None:
    """While the drain waits on a device that cannot take its close frame, a second SIGTERM
    ends the process at once."""
    env = database_env(database_url, GATEWAY_SHUTDOWN_TIMEOUT_S="10")
    with running_gateway(env, log_dir=tmp_path) as proc:
        async with stalled_device(proc):
            proc.signal(signal.SIGTERM)
            # The first signal was handled; the drain now waits seconds on the device.
            await asyncio.to_thread(proc.wait_for_event, "gateway_draining")
            assert proc.popen.poll() is None, proc.describe()
            second_at = time.monotonic()
            proc.popen.send_signal(signal.SIGTERM)
            code, _ = await asyncio.to_thread(proc.wait_exit, 30)
            took_s = time.monotonic() - second_at
    print(f"second SIGTERM: exit after {took_s:.3f} s with code {code}")
    assert "second_signal_exiting_now" in proc.events(), proc.describe()
    assert took_s < 1.0, proc.describe()
    assert code != 0, proc.describe()  # a forced exit is not a clean one
