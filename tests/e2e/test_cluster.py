"""Several real gateway processes on one PostgreSQL (PROTOCOL.md §5).

Each process is ``python run_gateway.py`` with its own GATEWAY_INSTANCE_ID and
ports (``start_gateway``); a device on one, the service calling another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from e2e.proc import (
    E2E_SERVICE_TOKEN,
    GatewayProcess,
    call_api,
    connect_device,
    database_env,
    free_ports,
    mint_token,
    start_gateway,
)

WITHIN_S = 10.0


@contextlib.contextmanager
def processes(database_url: str, tmp_path: Path, *names: str,
              **extra: str) -> Iterator[list[GatewayProcess]]:
    procs = []
    # Every port picked at once (all distinct): one picked while an earlier process
    # has not bound its own yet could be that very port.
    ports = free_ports(2 * len(names))
    try:
        for n, name in enumerate(names):
            procs.append(start_gateway(database_env(database_url, GATEWAY_INSTANCE_ID=name,
                                                    **extra), log_dir=tmp_path,
                                       public_port=ports[2 * n],
                                       internal_port=ports[2 * n + 1]))
        for proc in procs:
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs:
            proc.kill()


def tool_call(session: aiohttp.ClientSession, proc: GatewayProcess,
              **body: Any) -> asyncio.Task[tuple[int, Any]]:
    return asyncio.create_task(call_api(session, "POST", f"{proc.internal_url}/tool-calls",
                                        {"tool": "t", **body}))


async def test_device_on_a_call_via_b(database_url: str, tmp_path: Path) -> None:
    """Success, tool error, timeout with tool_cancel, caller gone, device dropped."""
    with processes(database_url, tmp_path, "e2e-a", "e2e-b") as (a, b):
        async with aiohttp.ClientSession() as session:
            device = await connect_device(session, a.ws_url, token=mint_token("u1"),
                                          user_id="u1", device_id="d1")
            task = tool_call(session, b, user_id="u1", device_id="d1", args={"x": 1})
            call = await device.recv_type("tool_call")
            assert call["args"] == {"x": 1}
            await device.send({"type": "tool_result", "id": call["id"], "result": [1]})
            assert await task == (200, {"call_id": call["id"], "device_id": "d1", "ok": True,
                                        "result": [1]})

            task = tool_call(session, b, user_id="u1")
            call = await device.recv_type("tool_call")
            await device.send({"type": "tool_result", "id": call["id"],
                               "error": {"code": "nope", "message": "no"}})
            status, body = await task
            assert status == 200 and body["error"] == {"code": "nope", "message": "no"}, body

            task = tool_call(session, b, user_id="u1", timeout_s=0.3)
            call = await device.recv_type("tool_call")
            status, body = await task
            assert status == 504 and body["error"] == "timeout", body
            cancel = await device.recv_type("tool_cancel")
            assert cancel == {"type": "tool_cancel", "id": call["id"], "reason": "timeout"}

            async with aiohttp.ClientSession() as caller:  # goes away mid-call
                task = tool_call(caller, b, user_id="u1", timeout_s=30)
                call = await device.recv_type("tool_call")
                task.cancel()
            cancel = await device.recv_type("tool_cancel")
            assert cancel == {"type": "tool_cancel", "id": call["id"], "reason": "caller_gone"}

            task = tool_call(session, b, user_id="u1", timeout_s=30)
            await device.recv_type("tool_call")
            await device.close()
            status, body = await task
            assert status == 503 and body["error"] == "device_disconnected", body
        assert a.stop()[0] == 0 and b.stop()[0] == 0


async def test_run_created_on_b_dispatched_on_a_streamed_from_c(
        database_url: str, tmp_path: Path) -> None:
    with processes(database_url, tmp_path, "e2e-a", "e2e-b", "e2e-c") as (a, b, c):
        async with aiohttp.ClientSession() as session:
            device = await connect_device(session, a.ws_url, token=mint_token("u1"),
                                          user_id="u1", device_id="d1", agent_ids=["ag"])
            status, run = await call_api(session, "POST", f"{b.internal_url}/runs",
                                         {"user_id": "u1", "agent_id": "ag"})
            assert status == 201 and run["status"] == "running", run
            assert run["gateway_instance"] == "e2e-a", run
            await device.recv_type("agent_run")
            seqs: list[int] = []
            first = asyncio.Event()

            async def read() -> None:
                async with session.get(
                        f"{c.internal_url}/runs/{run['run_id']}/events",
                        headers={"Authorization": f"Bearer {E2E_SERVICE_TOKEN}"}) as resp:
                    async for line in resp.content:
                        seqs.append(orjson.loads(line)["seq"])
                        first.set()

            reader = asyncio.create_task(read())
            await device.send({"type": "agent_data", "run_id": run["run_id"], "data": 0})
            await asyncio.wait_for(first.wait(), WITHIN_S)
            for n in range(1, 300):
                await device.send({"type": "agent_data", "run_id": run["run_id"], "data": n})
                if n % 50 == 0:
                    await asyncio.sleep(0.05)
            await device.send({"type": "agent_complete", "run_id": run["run_id"]})
            await asyncio.wait_for(reader, WITHIN_S)
            assert seqs == list(range(1, 301))


async def test_device_moves_from_a_to_b_mid_run_and_resumes(
        database_url: str, tmp_path: Path) -> None:
    with processes(database_url, tmp_path, "e2e-a", "e2e-b") as (a, b):
        async with aiohttp.ClientSession() as session:
            token = mint_token("u1")
            old = await connect_device(session, a.ws_url, token=token, user_id="u1",
                                       device_id="d1", agent_ids=["ag"])
            _, run = await call_api(session, "POST", f"{a.internal_url}/runs",
                                         {"user_id": "u1", "agent_id": "ag"})
            await old.recv_type("agent_run")
            await old.send({"type": "agent_data", "run_id": run["run_id"], "data": 1})
            new = await connect_device(session, b.ws_url, token=token, user_id="u1",
                                       device_id="d1", agent_ids=["ag"])
            assert await old.expect_close() == 4000
            assert new.hello_ack is not None
            assert new.hello_ack["runs"] == [{"run_id": run["run_id"], "agent_id": "ag",
                                              "last_seq": 1}], new.hello_ack
            await new.send({"type": "agent_data", "run_id": run["run_id"], "data": 2})
            await new.send({"type": "agent_complete", "run_id": run["run_id"]})
            deadline = time.monotonic() + WITHIN_S
            while True:
                _status, record = await call_api(session, "GET",
                                                f"{a.internal_url}/runs/{run['run_id']}")
                if record["status"] == "completed":
                    break
                assert time.monotonic() < deadline, record
                await asyncio.sleep(0.05)
            assert record["event_count"] == 2 and record["gateway_instance"] == "e2e-b"


async def test_kill_9_of_a_b_reaps_it_and_the_device_resumes_on_b(
        database_url: str, tmp_path: Path) -> None:
    with processes(database_url, tmp_path, "e2e-a", "e2e-b",
                   GATEWAY_INSTANCE_TTL_S="1") as (a, b):
        async with aiohttp.ClientSession() as session:
            token = mint_token("u1")
            device = await connect_device(session, a.ws_url, token=token, user_id="u1",
                                          device_id="d1", agent_ids=["ag"])
            _status, run = await call_api(session, "POST", f"{b.internal_url}/runs",
                                         {"user_id": "u1", "agent_id": "ag"})
            assert run["status"] == "running", run
            await device.recv_type("agent_run")
            await device.send({"type": "agent_data", "run_id": run["run_id"], "data": 1})
            await asyncio.sleep(0.2)
            a.signal(signal.SIGKILL)
            a.wait_exit()
            deadline = time.monotonic() + WITHIN_S
            while True:  # within 2 x TTL, b reaps a
                _, devices = await call_api(session, "GET",
                                            f"{b.internal_url}/devices?user_id=u1")
                _, record = await call_api(session, "GET", f"{b.internal_url}/runs/{run['run_id']}")
                if not devices["devices"] and record["detached_at"] is not None:
                    break
                assert time.monotonic() < deadline, (devices, record)
                await asyncio.sleep(0.1)
            assert record["detach_reason"] == "gateway restarted", record
            assert "instances_reaped" in b.events()
            back = await connect_device(session, b.ws_url, token=token, user_id="u1",
                                        device_id="d1", agent_ids=["ag"])
            assert back.hello_ack is not None
            assert [r["run_id"] for r in back.hello_ack["runs"]] == [run["run_id"]]
            await back.send({"type": "agent_complete", "run_id": run["run_id"]})
        assert b.stop()[0] == 0


async def test_two_processes_racing_to_claim_pending_runs(
        database_url: str, tmp_path: Path) -> None:
    with processes(database_url, tmp_path, "e2e-a", "e2e-b") as (a, b):
        async with aiohttp.ClientSession() as session:
            ids = set()
            for _ in range(30):
                _, run = await call_api(session, "POST", f"{a.internal_url}/runs",
                                        {"user_id": "u1", "agent_id": "ag"})
                ids.add(run["run_id"])
            token = mint_token("u1")
            devices = await asyncio.gather(*(
                connect_device(session, proc.ws_url, token=token, user_id="u1",
                               device_id=f"d{n}", agent_ids=["ag"])
                for n, proc in enumerate((a, b, a, b))))
            got: list[str] = []
            for device in devices:
                with contextlib.suppress(TimeoutError):
                    while True:
                        got.append((await device.recv_type("agent_run", timeout=1.0))["run_id"])
            assert sorted(got) == sorted(ids)


async def test_workers_2_one_command_one_port_both_serve(database_url: str,
                                                          tmp_path: Path) -> None:
    """One command, two workers on one pair of ports: READY=1 once both are ready, both
    serve, a killed worker is restarted, SIGTERM drains both and exits 0."""
    public_port, internal_port = free_ports(2)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(WITHIN_S * 3)
    env = database_env(database_url, GATEWAY_INSTANCE_ID="wk",
                       NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    proc = start_gateway(env, args=["serve", "--workers", "2"], log_dir=tmp_path,
                         public_port=public_port, internal_port=internal_port)
    sessions: list[aiohttp.ClientSession] = []
    try:
        message = notify.recv(4096).decode()
        assert "READY=1" in message.split("\n"), message
        ready = [line for line in proc.log_lines() if line.get("event") == "worker_ready"]
        assert len(ready) == 2, ready  # both, before the parent's READY=1
        proc.wait_ready()
        token = mint_token("u1")
        async with aiohttp.ClientSession() as session:
            devices = []
            for n in range(16):  # new TCP connections: the kernel spreads them
                sessions.append(aiohttp.ClientSession())
                devices.append(await connect_device(sessions[-1], proc.ws_url, token=token,
                                                    user_id="u1", device_id=f"d{n}"))
            conn = await asyncpg.connect(database_url)
            try:
                held = {row["instance_id"] for row in await conn.fetch(
                    "SELECT instance_id FROM device_presence WHERE user_id = 'u1'")}
            finally:
                await conn.close()
            assert held == {"wk/1", "wk/2"}, held
            for n, device in enumerate(devices):  # the shared internal port reaches each
                task = tool_call(session, proc, user_id="u1", device_id=f"d{n}")
                call = await device.recv_type("tool_call")
                await device.send({"type": "tool_result", "id": call["id"], "result": n})
                status, body = await task
                assert status == 200 and body["result"] == n, body
            for device in devices:
                await device.close()

        started = [line for line in proc.log_lines() if line.get("event") == "worker_started"]
        os.kill(started[0]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + WITHIN_S * 2
        while not any(line.get("event") == "worker_ready" and line["pid"] != started[0]["pid"]
                      and line["worker"] == started[0]["worker"]
                      for line in proc.log_lines()):
            assert proc.popen.poll() is None, proc.describe()
            assert time.monotonic() < deadline, proc.describe()
            await asyncio.sleep(0.1)
        code, _ = proc.stop()
        assert code == 0, proc.describe()
        assert "workers_stopped" in proc.events()
    finally:
        for extra in sessions:
            await extra.close()
        notify.close()
        proc.kill()


async def test_dev_mode_workers_share_one_embedded_database(tmp_path: Path) -> None:
    """No database configured, --workers 2: one command, one embedded PostgreSQL, the
    dev secrets work against both workers, and a call reaches a device on either."""
    data_dir = tmp_path / "data"
    public_port, internal_port = free_ports(2)
    proc = start_gateway({"GATEWAY_DATA_DIR": str(data_dir), "GATEWAY_WORKERS": "2"},
                         log_dir=tmp_path, public_port=public_port,
                         internal_port=internal_port)
    sessions: list[aiohttp.ClientSession] = []
    try:
        proc.wait_ready(60)
        secrets = orjson.loads((data_dir / "dev-secrets.json").read_bytes())
        token = mint_token("dev-user", secret=secrets["jwt_secret"])
        devices = []
        for n in range(8):
            sessions.append(aiohttp.ClientSession())
            devices.append(await connect_device(sessions[-1], proc.ws_url, token=token,
                                                user_id="dev-user", device_id=f"d{n}"))
        async with aiohttp.ClientSession() as session:
            status, body = await call_api(session, "GET",
                                          f"{proc.internal_url}/devices?user_id=dev-user",
                                          token=secrets["internal_token"])
            assert status == 200, body
            assert sorted(d["device_id"] for d in body["devices"]) == [f"d{n}" for n in range(8)]
            for n, device in enumerate(devices):
                task = asyncio.create_task(call_api(
                    session, "POST", f"{proc.internal_url}/tool-calls",
                    {"user_id": "dev-user", "device_id": f"d{n}", "tool": "t"},
                    token=secrets["internal_token"]))
                call = await device.recv_type("tool_call")
                await device.send({"type": "tool_result", "id": call["id"], "result": n})
                assert (await task)[0] == 200
            for device in devices:
                await device.close()
        code, _ = proc.stop()
        assert code == 0, proc.describe()
        instances = {line.get("instance_id") for line in proc.log_lines()
                     if line.get("event") == "worker_ready" or line.get("event") ==
                     "worker_started"}
        assert len(instances - {None}) == 2, instances
    finally:
        for extra in sessions:
            await extra.close()
        proc.kill()


async def test_workers_of_a_killed_parent_drain_and_exit(database_url: str,
                                                         tmp_path: Path) -> None:
    """SIGKILL to the parent (nothing forwarded): each worker notices and leaves."""
    public_port, internal_port = free_ports(2)
    proc = start_gateway(database_env(database_url, GATEWAY_INSTANCE_ID="orphan"),
                         args=["serve", "--workers", "2"], log_dir=tmp_path,
                         public_port=public_port, internal_port=internal_port)
    try:
        proc.wait_ready()
        deadline = time.monotonic() + WITHIN_S
        while len(pids := [line["pid"] for line in proc.log_lines()
                           if line.get("event") == "worker_ready"]) < 2:
            assert time.monotonic() < deadline, proc.describe()
            await asyncio.sleep(0.1)
        proc.kill()
        deadline = time.monotonic() + WITHIN_S * 2
        while any(_running(pid) for pid in pids):
            assert time.monotonic() < deadline, proc.describe()
            await asyncio.sleep(0.1)
        assert proc.events().count("gateway_stopped") == 2, proc.describe()
    finally:
        for pid in pids if "pids" in locals() else []:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has left
    except FileNotFoundError:
        return False


async def test_a_wedged_worker_is_killed_and_restarted_by_its_parent(
        database_url: str, tmp_path: Path) -> None:
    """Under a systemd watchdog each worker pings the parent; one that stops (SIGSTOP)
    is killed and started again while the parent goes on pinging systemd."""
    public_port, internal_port = free_ports(2)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    env = database_env(database_url, GATEWAY_INSTANCE_ID="wedge",
                       NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="2000000")
    proc = start_gateway(env, args=["serve", "--workers", "2"], log_dir=tmp_path,
                         public_port=public_port, internal_port=internal_port)
    stopped = None
    try:
        proc.wait_ready()
        deadline = time.monotonic() + WITHIN_S
        while len(ready := [line for line in proc.log_lines()
                            if line.get("event") == "worker_ready"]) < 2:
            assert time.monotonic() < deadline, proc.describe()
            await asyncio.sleep(0.1)
        stopped = ready[0]["pid"]
        os.kill(stopped, signal.SIGSTOP)
        deadline = time.monotonic() + WITHIN_S * 2
        while not any(line.get("event") == "worker_ready" and line["pid"] != stopped
                      and line["worker"] == ready[0]["worker"] for line in proc.log_lines()):
            assert time.monotonic() < deadline, proc.describe()
            await asyncio.sleep(0.1)
        timeout = next(line for line in proc.log_lines()
                       if line.get("event") == "worker_watchdog_timeout")
        assert timeout["pid"] == stopped, timeout
        notify.setblocking(False)
        pings = []
        with contextlib.suppress(BlockingIOError):
            while True:
                pings.append(notify.recv(4096))
        assert any(b"WATCHDOG=1" in ping for ping in pings), pings
        code, _ = proc.stop()
        assert code == 0, proc.describe()
    finally:
        if stopped is not None and _running(stopped):
            os.kill(stopped, signal.SIGKILL)
        notify.close()
        proc.kill()
