"""Session continuity (PROTOCOL.md §1.8) with the real process: runs survive a dropped
connection, kill -9 of the gateway and a drain, and expire when the device never returns.

What was stored is read from the database itself. The device is either a test device
(``harness.Device``) or the simulator process (``python run_gateway.py device``), which
reconnects on its own; its JSON log lines say what it resent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from harness import Device

from e2e.proc import (
    ENTRY_POINT,
    REPO_ROOT,
    GatewayProcess,
    call_api,
    child_env,
    database_env,
    free_ports,
    mint_token,
    start_gateway,
)

pytestmark = pytest.mark.e2e

FINAL = ("completed", "error", "cancelled")
# Bounds on waiting for what the gateway does on its own (not assertions on speed).
SETTLE_S = 60.0
POLL_S = 0.05


# ---------------------------------------------------------------- helpers


async def run_row(database_url: str, run_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT status, errors::text AS errors, event_count, detached_at, detach_reason,"
            " finished_at, gateway_instance FROM agent_run_logs WHERE id = $1",
            uuid.UUID(run_id))
    finally:
        await conn.close()
    assert row is not None
    return row


async def stored_events(database_url: str, run_id: str) -> list[tuple[int, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT seq, data::text AS data FROM agent_run_events "
                                "WHERE run_id = $1 ORDER BY seq", uuid.UUID(run_id))
    finally:
        await conn.close()
    return [(r["seq"], orjson.loads(r["data"])) for r in rows]


async def event_counts(database_url: str, run_id: str) -> dict[str, int]:
    """Rows, distinct seqs and distinct event numbers the device gave (``data.i``)."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS rows, count(DISTINCT seq) AS seqs,"
            " count(DISTINCT data->>'i') AS distinct_i, min(seq) AS first, max(seq) AS last,"
            " count(*) FILTER (WHERE (data->>'i')::int <> seq) AS misplaced"
            " FROM agent_run_events WHERE run_id = $1", uuid.UUID(run_id))
    finally:
        await conn.close()
    assert row is not None
    return dict(row)


async def wait_until(check: Any, what: str, timeout: float = SETTLE_S) -> Any:
    """Poll the async ``check()`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(POLL_S)


async def wait_final(database_url: str, run_id: str, timeout: float = SETTLE_S
                     ) -> asyncpg.Record:
    async def final() -> asyncpg.Record | None:
        row = await run_row(database_url, run_id)
        return row if row["status"] in FINAL else None
    row: asyncpg.Record = await wait_until(final, f"run {run_id} finished", timeout)
    return row


async def wait_stored(database_url: str, run_id: str, count: int) -> None:
    async def enough() -> bool:
        return (await event_counts(database_url, run_id))["rows"] >= count
    await wait_until(enough, f"{count} events of run {run_id} stored")


async def create_run(session: aiohttp.ClientSession, proc: GatewayProcess, user_id: str,
                     agent_id: str, device_id: str, input_value: Any = None) -> dict[str, Any]:
    status, run = await call_api(session, "POST", f"{proc.internal_url}/runs", {
        "user_id": user_id, "agent_id": agent_id, "device_id": device_id,
        "input": input_value or {}})
    assert status == 201, run
    return dict(run)


async def runner(session: aiohttp.ClientSession, proc: GatewayProcess, user_id: str,
                 device_id: str, *, hello_extra: dict[str, Any] | None = None
                 ) -> tuple[Device, str]:
    """A test device with a run just dispatched to it; the run id."""
    device = await hello(session, proc, user_id, device_id, hello_extra=hello_extra)
    run = await create_run(session, proc, user_id, "agent-a", device_id)
    assert run["status"] == "running", run
    dispatched = await device.recv_type("agent_run")
    assert dispatched["run_id"] == run["run_id"]
    return device, str(run["run_id"])


async def hello(session: aiohttp.ClientSession, proc: GatewayProcess, user_id: str,
                device_id: str, *, hello_extra: dict[str, Any] | None = None) -> Device:
    ws = await session.ws_connect(proc.ws_url, params={"token": mint_token(user_id)})
    device = Device(ws, user_id, device_id)
    await device.send({"type": "device_hello", "device_id": device_id,
                       "agent_ids": ["agent-a"], **(hello_extra or {})})
    device.hello_ack = await device.recv_type("hello_ack")
    return device


async def send_events(device: Device, run_id: str, numbers: Sequence[int], *,
                      with_seq: bool = False) -> None:
    for i in numbers:
        frame: dict[str, Any] = {"type": "agent_data", "run_id": run_id, "data": {"i": i}}
        if with_seq:
            frame["seq"] = i
        await device.send(frame)


async def sync(device: Device) -> None:
    """Frames are handled in order: the pong proves every earlier one was accepted."""
    await device.send({"type": "ping"})
    while (await device.recv())["type"] != "pong":
        pass


async def metric(session: aiohttp.ClientSession, proc: GatewayProcess, name: str) -> float:
    """One unlabelled sample of the gateway's /metrics."""
    async with session.get(f"{proc.public_url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text[:2000]}")


def log_time(line: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(line["timestamp"])).timestamp()


def restart(proc: GatewayProcess, env: dict[str, str], log_dir: Path) -> GatewayProcess:
    """The same gateway again: same ports, same GATEWAY_INSTANCE_ID, its own log files."""
    log_dir.mkdir(exist_ok=True)
    again = start_gateway(env, log_dir=log_dir, public_port=proc.public_port,
                          internal_port=proc.internal_port)
    again.wait_ready()
    return again


def gateway_env(database_url: str, resume_s: str) -> dict[str, str]:
    """Fixed ports and instance id, so that a restart is the same gateway again."""
    env = database_env(database_url, GATEWAY_RUN_RESUME_S=resume_s,
                       GATEWAY_SHUTDOWN_TIMEOUT_S="5")
    pick_ports(env)
    return env


def pick_ports(env: dict[str, str]) -> None:
    public_port, internal_port = free_ports(2)
    env.update(GATEWAY_INSTANCE_ID=f"e2e-continuity-{public_port}",
               GATEWAY_PUBLIC_PORT=str(public_port), GATEWAY_INTERNAL_PORT=str(internal_port))


# A port free a moment ago can be taken before the gateway binds it (other tests on the
# machine, outgoing connections): the first start then tries other ports.
START_ATTEMPTS = 3


@contextlib.contextmanager
def gateways(env: dict[str, str], log_dir: Path) -> Iterator[list[GatewayProcess]]:
    """The first gateway, ready; the test appends restarts. Every one killed at the end.

    ``env`` gets the ports (and instance id) the first one could bind."""
    procs: list[GatewayProcess] = []
    try:
        for attempt in range(START_ATTEMPTS):
            first_dir = log_dir / f"first-{attempt}"
            first_dir.mkdir()
            procs.append(start_gateway(env, log_dir=first_dir))
            try:
                procs[-1].wait_ready()
                break
            except AssertionError:
                if ("address already in use" not in procs[-1].stdout()
                        or attempt + 1 == START_ATTEMPTS):
                    raise
                pick_ports(env)
        procs[:] = procs[-1:]
        yield procs
    finally:
        for proc in procs:
            proc.kill()


@contextlib.contextmanager
def simulator(proc: GatewayProcess, user_id: str, device_id: str, log_path: Path,
              *options: str) -> Iterator[Path]:
    """``python run_gateway.py device ...`` (the simulator process), stopped afterwards;
    yields the file its JSON log lines go to."""
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, str(ENTRY_POINT), "device", "--device-id", device_id,
             "--agent-id", "stream", "--token", mint_token(user_id), "--url", proc.ws_url,
             "--quiet", "--reconnect-max-s", "0.5", *options],
            cwd=REPO_ROOT, env=child_env({"GATEWAY_LOG_FORMAT": "json"}),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield log_path
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            value = orjson.loads(text)
            if isinstance(value, dict):
                lines.append(value)
    return lines


def events_named(lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("event") == name]


async def assert_stored_exactly_once(database_url: str, run_id: str, count: int) -> None:
    """Every event 1..count once, in order, its own number at its seq."""
    counts = await event_counts(database_url, run_id)
    assert counts == {"rows": count, "seqs": count, "distinct_i": count, "first": 1,
                      "last": count, "misplaced": 0}, counts
    row = await run_row(database_url, run_id)
    assert row["event_count"] == count, dict(row)


# ---------------------------------------------------------------- a dropped connection


async def test_a_dropped_connection_resumes_2_s_later_and_the_run_completes(
    database_url: str, tmp_path: Path
) -> None:
    """The device's TCP connection is aborted mid-stream (no close frame); it connects again
    2 s later, its hello_ack lists the run with last_seq, it goes on from there (no second
    agent_run) and completes: every event stored once, in order."""
    env = gateway_env(database_url, "30")
    with gateways(env, tmp_path) as procs:
        proc = procs[0]
        async with aiohttp.ClientSession() as session:
            device, run_id = await runner(session, proc, "u-drop", "laptop")
            await send_events(device, run_id, range(1, 21))
            await sync(device)
            # These may or may not reach the gateway before the drop: last_seq says.
            await send_events(device, run_id, range(21, 41))
            device.drop()
            detached = await wait_until(
                lambda: _detached(database_url, run_id), "the run detached")
            await asyncio.sleep(2.0)

            again = await hello(session, proc, "u-drop", "laptop")
            assert again.hello_ack is not None
            listed = again.hello_ack["runs"]
            assert [(r["run_id"], r["agent_id"]) for r in listed] == [(run_id, "agent-a")]
            last_seq = listed[0]["last_seq"]
            assert 20 <= last_seq <= 40, listed
            await send_events(again, run_id, range(last_seq + 1, 101))
            await again.send({"type": "agent_complete", "run_id": run_id})
            await again.expect_silence(0.3)  # no agent_run again, no error
            row = await wait_final(database_url, run_id)
            await again.close()
        code, _ = proc.stop()
    assert code == 0, proc.describe()
    assert row["status"] == "completed", dict(row)
    assert row["detached_at"] is None and row["detach_reason"] is None, dict(row)
    assert detached["detach_reason"] == "device disconnected", dict(detached)
    await assert_stored_exactly_once(database_url, run_id, 100)
    assert [e[1] for e in await stored_events(database_url, run_id)] == [
        {"i": i} for i in range(1, 101)]
    lines = proc.log_lines()
    assert [line["run_id"] for line in events_named(lines, "run_detached")] == [run_id]
    resumed = events_named(lines, "run_resumed")
    assert [(line["run_id"], line["last_seq"]) for line in resumed] == [(run_id, last_seq)]
    print(f"dropped connection: {40 - last_seq} events resent, detached for "
          f"{resumed[0]['detached_for_s']} s")


async def _detached(database_url: str, run_id: str) -> asyncpg.Record | None:
    row = await run_row(database_url, run_id)
    return row if row["detached_at"] is not None else None


# ---------------------------------------------------------------- kill -9 and drain


async def test_kill_9_and_restart_lose_and_duplicate_no_event_with_event_acks(
    database_url: str, tmp_path: Path
) -> None:
    """The simulator process (--event-acks) streams a run; the gateway is killed with
    SIGKILL mid-stream and started again with the same instance id and ports. The
    simulator reconnects by itself, resends what was not acked, and the run completes with
    each of its events stored exactly once, counted in the database."""
    events = 600
    env = gateway_env(database_url, "30")
    with gateways(env, tmp_path) as procs, \
            simulator(procs[0], "u-kill", "sim-kill", tmp_path / "simulator.log",
                      "--event-acks") as sim_log:
        async with aiohttp.ClientSession() as session:
            # Pending until the simulator's hello claims it (it may still be starting).
            run = await create_run(session, procs[0], "u-kill", "stream", "sim-kill",
                                   {"events": events, "delay_s": 0.01})
            run_id = str(run["run_id"])
            await wait_stored(database_url, run_id, 100)
            killed_at = time.time()
            stored_at_kill = (await event_counts(database_url, run_id))["rows"]
            procs[0].kill()  # SIGKILL: no drain, no flush, no close frame
            procs.append(restart(procs[0], env, tmp_path / "second"))
            row = await wait_final(database_url, run_id)
            duplicates = await metric(session, procs[1], "gateway_events_duplicate_total")
        code, _ = procs[1].stop()
    assert code == 0, procs[1].describe()
    assert row["status"] == "completed", (dict(row), procs[1].describe())
    await assert_stored_exactly_once(database_url, run_id, events)

    second = procs[1].log_lines()
    swept = events_named(second, "runs_detached_by_sweep")
    assert swept and run_id in swept[0]["runs"] and swept[0]["reason"] == "gateway restarted"
    resumed = events_named(second, "run_resumed")
    assert [line["run_id"] for line in resumed] == [run_id], second
    sim = json_lines(sim_log)
    continued = events_named(sim, "run_continued")
    assert [line["run_id"] for line in continued] == [run_id], sim
    assert continued[0]["last_seq"] == resumed[0]["last_seq"]
    assert not events_named(sim, "run_events_lost")
    # Stored before the kill but not yet acked: sent again, acked, not stored again.
    assert duplicates == continued[0]["already_there"], (duplicates, continued)
    detached_s = log_time(resumed[0]) - killed_at
    print(f"kill -9: {stored_at_kill} of {events} events stored at the kill; the run was "
          f"detached {detached_s:.2f} s (kill -9 to resume; {resumed[0]['detached_for_s']} s "
          f"of it after the restart's sweep); the simulator resent "
          f"{continued[0]['resending']} events past its last ack {continued[0]['acked']} "
          f"(last_seq {continued[0]['last_seq']}: {duplicates:g} duplicates, acked and not "
          f"stored again); 0 lost, 0 duplicated")


async def test_a_drain_and_restart_lose_and_duplicate_no_event(
    database_url: str, tmp_path: Path
) -> None:
    """SIGTERM drains the gateway mid-stream (devices closed with 1001, the run detached
    "gateway shutdown"); it is started again and the simulator (without event_acks: the
    drain stored everything it accepted, so hello_ack.runs' last_seq is exact) goes on
    from last_seq; the run completes with each event stored once."""
    events = 600
    env = gateway_env(database_url, "30")
    with gateways(env, tmp_path) as procs, \
            simulator(procs[0], "u-drain", "sim-drain", tmp_path / "simulator.log") as sim_log:
        async with aiohttp.ClientSession() as session:
            run = await create_run(session, procs[0], "u-drain", "stream", "sim-drain",
                                   {"events": events, "delay_s": 0.01})
            run_id = str(run["run_id"])
            await wait_stored(database_url, run_id, 100)
            code, _ = await asyncio.to_thread(procs[0].stop)
            assert code == 0, procs[0].describe()
            detached = await run_row(database_url, run_id)
            procs.append(restart(procs[0], env, tmp_path / "second"))
            row = await wait_final(database_url, run_id)
        code, _ = procs[1].stop()
    assert code == 0, procs[1].describe()
    assert (detached["status"], detached["detach_reason"]) == ("running", "gateway shutdown")
    assert row["status"] == "completed", (dict(row), procs[1].describe())
    await assert_stored_exactly_once(database_url, run_id, events)
    # The restart's sweep left the drain's detach alone; the hello resumed it.
    assert "runs_detached_by_sweep" not in procs[1].events(), procs[1].describe()
    resumed = events_named(procs[1].log_lines(), "run_resumed")
    assert [line["run_id"] for line in resumed] == [run_id]
    sim = json_lines(sim_log)
    assert events_named(sim, "device_closed")[0]["close_code"] == 1001
    assert [line["last_seq"] for line in events_named(sim, "run_continued")] == [
        resumed[0]["last_seq"]]
    print(f"drain: detached {resumed[0]['detached_for_s']} s, last_seq "
          f"{resumed[0]['last_seq']}, 0 lost, 0 duplicated")


# ---------------------------------------------------------------- the device never returns


@pytest.mark.parametrize(("how", "reason"), [
    ("drop", "device disconnected"), ("drain", "gateway shutdown"),
    ("kill", "gateway restarted")])
async def test_a_device_that_never_returns_leaves_the_run_error_after_the_window(
    database_url: str, tmp_path: Path, how: str, reason: str
) -> None:
    """GATEWAY_RUN_RESUME_S=2: the run's connection ends (dropped; or the gateway drained,
    or was killed, and restarted) and the device never comes back: the run is `error` with
    the detach reason, within 1 s of the window's end (§1.8), its events kept. (A drain's
    detach keeps its time through the restart, so when the restart takes longer than the
    window the bound is counted from the moment the new process is ready.)"""
    window_s = 2.0
    env = gateway_env(database_url, str(window_s))
    with gateways(env, tmp_path) as procs:
        async with aiohttp.ClientSession() as session:
            device, run_id = await runner(session, procs[0], "u-gone", "laptop")
            await send_events(device, run_id, range(1, 4))
            await sync(device)
            if how == "drop":
                device.drop()
            elif how == "drain":
                code, _ = await asyncio.to_thread(procs[0].stop)
                assert code == 0, procs[0].describe()
            else:
                # Without event_acks only stored events survive a crash: wait for them.
                await wait_stored(database_url, run_id, 3)
                procs[0].kill()
            ready_at = None
            if how != "drop":
                procs.append(restart(procs[0], env, tmp_path / "second"))
                ready_at = dt.datetime.now(dt.UTC)
            row = await wait_final(database_url, run_id, timeout=window_s + 30)
        expired_by = procs[-1]
        code, _ = expired_by.stop()
    assert code == 0, expired_by.describe()
    assert row["status"] == "error", dict(row)
    assert orjson.loads(row["errors"]) == [reason], dict(row)
    assert row["detach_reason"] == reason
    window_end = row["detached_at"] + dt.timedelta(seconds=window_s)
    late_s = (row["finished_at"] - window_end).total_seconds()
    print(f"never returned ({how}): error {late_s:.3f} s after the window's end")
    assert late_s >= 0, dict(row)
    if ready_at is not None:  # nobody could look before the restart was up
        window_end = max(window_end, ready_at)
    assert (row["finished_at"] - window_end).total_seconds() <= 1.0, (dict(row), ready_at)
    await assert_stored_exactly_once(database_url, run_id, 3)
    expired = events_named(expired_by.log_lines(), "run_expired")
    assert [(line["run_id"], line["reason"]) for line in expired] == [(run_id, reason)]


# ---------------------------------------------------------------- resume 0 is revision .4


async def test_resume_0_fails_the_run_at_once_as_revision_4(
    database_url: str, tmp_path: Path
) -> None:
    """GATEWAY_RUN_RESUME_S=0: a dropped connection's run is `error` "device disconnected"
    at once (never detached); the device's next hello lists no run, and its frames for the
    run are refused run_finished."""
    env = gateway_env(database_url, "0")
    with gateways(env, tmp_path) as procs:
        proc = procs[0]
        async with aiohttp.ClientSession() as session:
            device, run_id = await runner(session, proc, "u-rev4", "laptop",
                                          hello_extra={"capabilities": ["event_acks"]})
            await send_events(device, run_id, range(1, 4), with_seq=True)
            await sync(device)
            device.drop()
            row = await wait_final(database_url, run_id, timeout=5.0)
            again = await hello(session, proc, "u-rev4", "laptop",
                                hello_extra={"capabilities": ["event_acks"]})
            assert again.hello_ack is not None and again.hello_ack["runs"] == []
            await again.send({"type": "agent_data", "run_id": run_id, "data": {"i": 4},
                              "seq": 4})
            refused = await again.recv_type("error")
            await again.close()
        code, _ = proc.stop()
    assert code == 0, proc.describe()
    assert row["status"] == "error", dict(row)
    assert orjson.loads(row["errors"]) == ["device disconnected"]
    assert row["detached_at"] is None and row["detach_reason"] is None, dict(row)
    assert refused["code"] == "run_finished", refused
    await assert_stored_exactly_once(database_url, run_id, 3)
    events = proc.events()
    assert "run_detached" not in events and "run_resumed" not in events, proc.describe()
