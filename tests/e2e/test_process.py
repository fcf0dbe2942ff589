"""The real ``python run_gateway.py`` process, driven as an operator, a device and a service.

Covers PROTOCOL.md §4 (dev mode, the ``token`` and ``migrate`` commands,
configuration errors, logs) and §3.1 (orphaned runs marked at start-up).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import shlex
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import jwt
import orjson
import psutil
import pytest
from pg import (
    create_database,
    drop_database,
    dsn_with_database,
    memory_backed_temp_root,
    run_blocking,
)

from e2e.proc import (
    E2E_JWT_SECRET,
    E2E_SERVICE_TOKEN,
    call_api,
    connect_device,
    database_env,
    free_ports,
    mint_token,
    run_command,
    running_gateway,
    start_gateway,
    wait_for_text,
)
from gateway.dev.embedded_db import stop_server_immediately
from gateway.migrate import default_migrations_dir

pytestmark = pytest.mark.e2e

BANNER_TOKEN = r"device token \(user dev-user, 24 h\): (\S+)"
BANNER_WS_URL = r"WebSocket: (ws://\S+)"
BANNER_CURL = r"^\s*(curl .+)$"


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A GATEWAY_DATA_DIR that does not exist yet (in memory where possible: initdb is slow).

    Not pytest's tmp_path: as root the embedded server runs as another user and
    needs to traverse the parents, and the unix socket path must stay short.
    """
    scratch = Path(tempfile.mkdtemp(prefix="gw-e2e-", dir=memory_backed_temp_root()))
    data = scratch / "data"
    yield data
    # A failed test must not leave a server behind.
    stop_server_immediately(data.resolve() / "pgdata")
    shutil.rmtree(scratch, ignore_errors=True)


def server_processes(pgdata: Path) -> list[psutil.Process]:
    """The live postmaster of ``pgdata`` and its children (backends rename themselves)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(pgdata) in " ".join(proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    return list(found.values())


def still_alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


async def replay_curl(session: aiohttp.ClientSession, line: str) -> tuple[int, object]:
    """Send the request a shell would make of the printed ``curl`` line."""
    words = shlex.split(line)
    assert words[0] == "curl", words
    headers: dict[str, str] = {}
    data: str | None = None
    url: str | None = None
    rest = iter(words[1:])
    for word in rest:
        if word == "-H":
            name, _, value = next(rest).partition(":")
            headers[name.strip()] = value.strip()
        elif word == "-d":
            data = next(rest)
        elif word.startswith("http"):
            url = word
    assert url is not None and data is not None, words
    async with session.post(url, data=data, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


async def test_dev_mode_zero_config_start_serve_stop_and_restart(
    data_dir: Path, tmp_path: Path
) -> None:
    """An empty data dir and two ports are enough: the banner's credentials work, SIGTERM
    stops the embedded PostgreSQL too, and a second start finds the first one's data."""
    env = {"GATEWAY_DATA_DIR": str(data_dir)}
    proc = start_gateway(env, log_dir=tmp_path)
    try:
        cold_start_s = proc.wait_ready()
        token = wait_for_text(proc.stderr, BANNER_TOKEN).group(1)
        ws_url = wait_for_text(proc.stderr, BANNER_WS_URL).group(1)
        curl_line = wait_for_text(proc.stderr, BANNER_CURL).group(1)
        print(f"dev-mode cold start: {cold_start_s:.2f} s to /readyz 200")

        secrets_file = data_dir / "dev-secrets.json"
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        secrets = orjson.loads(secrets_file.read_bytes())
        claims = jwt.decode(token, secrets["jwt_secret"], algorithms=["HS256"])
        assert claims["sub"] == "dev-user"
        service_token = re.search(r"Authorization: Bearer ([^']+)'", curl_line)
        assert service_token is not None, curl_line
        assert service_token.group(1) == secrets["internal_token"]
        internal = re.search(r"(http://[^/\s]+/internal/v1)/tool-calls", curl_line)
        assert internal is not None, curl_line

        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(ws_url)  # the printed URL, token and all
            device = await _hello(ws, "laptop-1")
            assert device["type"] == "hello_ack"

            status, body = await call_api(session, "GET",
                                          f"{internal.group(1)}/devices?user_id=dev-user",
                                          token=service_token.group(1))
            assert status == 200, body
            assert [d["device_id"] for d in body["devices"]] == ["laptop-1"]

            # The curl line itself, as a shell would send it, reaches the device.
            reply = asyncio.create_task(replay_curl(session, curl_line))
            call = await _next_of(ws, "tool_call")
            assert (call["tool"], call["args"]) == ("echo", {"hi": 1})
            await ws.send_str(orjson.dumps(
                {"type": "tool_result", "id": call["id"], "result": {"echo": 1}}).decode())
            status, answer = await reply
            assert status == 200, answer
            assert answer == {"call_id": call["id"], "device_id": "laptop-1", "ok": True,
                              "result": {"echo": 1}}

            # A run no device can take yet: it must survive the restart.
            status, run = await call_api(session, "POST", f"{internal.group(1)}/runs",
                                         {"user_id": "dev-user", "agent_id": "later"},
                                         token=service_token.group(1))
            assert status == 201, run
            await ws.close()

        pgdata = (data_dir / "pgdata").resolve()
        server = server_processes(pgdata)
        assert server, "no embedded PostgreSQL process found while serving"
        code, stop_s = proc.stop()
        assert code == 0, proc.describe()
        assert still_alive(server) == [], "embedded PostgreSQL outlived the gateway"
        assert server_processes(pgdata) == []
        print(f"dev-mode stop: {stop_s:.2f} s")
    finally:
        proc.kill()

    second = start_gateway(env, log_dir=tmp_path)
    try:
        warm_start_s = second.wait_ready()
        print(f"dev-mode warm start: {warm_start_s:.2f} s to /readyz 200")
        curl_again = wait_for_text(second.stderr, BANNER_CURL).group(1)
        assert f"Bearer {secrets['internal_token']}'" in curl_again  # secrets reused
        async with aiohttp.ClientSession() as session:
            status, record = await call_api(session, "GET",
                                            f"{second.internal_url}/runs/{run['run_id']}",
                                            token=secrets["internal_token"])
        assert status == 200, record
        assert (record["run_id"], record["status"]) == (run["run_id"], "pending")
        code, _ = second.stop()
        assert code == 0, second.describe()
        assert server_processes(pgdata) == []
    finally:
        second.kill()


async def _hello(ws: aiohttp.ClientWebSocketResponse, device_id: str) -> dict[str, object]:
    await ws.send_str(orjson.dumps({"type": "device_hello", "device_id": device_id}).decode())
    return await _next_of(ws, "hello_ack")


async def _next_of(ws: aiohttp.ClientWebSocketResponse, frame_type: str) -> dict[str, object]:
    """The next frame of ``frame_type``, skipping legacy pings."""
    while True:
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        frame = orjson.loads(msg.data)
        if frame["type"] == frame_type:
            return dict(frame)
        assert frame["type"] == "ping", frame


def test_token_command_prints_a_jwt_for_the_configured_secret(tmp_path: Path) -> None:
    """``run_gateway.py token --sub alice --ttl 60`` prints one line: a JWT sub=alice, 60 s."""
    before = int(time.time())
    result = run_command(["token", "--sub", "alice", "--ttl", "60"], {
        "GATEWAY_JWT_SECRET": E2E_JWT_SECRET, "GATEWAY_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # usable as $(python run_gateway.py token ...)
    claims = jwt.decode(lines[0], E2E_JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert before + 60 <= claims["exp"] <= int(time.time()) + 60


def test_bad_configuration_exits_2_with_one_line_on_stderr(tmp_path: Path) -> None:
    """GATEWAY_PUBLIC_PORT=99999: exit code 2, one line naming the variable, nothing started."""
    data = tmp_path / "data"
    result = run_command([], {"GATEWAY_PUBLIC_PORT": "99999", "GATEWAY_DATA_DIR": str(data)})
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "GATEWAY_PUBLIC_PORT" in lines[0] and "99999" in lines[0]
    assert result.stdout == ""
    assert not (data / "pgdata").exists()


@pytest.mark.parametrize(("missing", "present"), [
    ("GATEWAY_JWT_SECRET", {"GATEWAY_INTERNAL_TOKENS": E2E_SERVICE_TOKEN}),
    ("GATEWAY_INTERNAL_TOKENS", {"GATEWAY_JWT_SECRET": E2E_JWT_SECRET}),
])
def test_database_url_without_secrets_is_a_clear_startup_error(
    database_url: str, missing: str, present: dict[str, str]
) -> None:
    """With GATEWAY_DATABASE_URL set, a missing secret is exit 2 and one line naming it."""
    result = run_command([], {"GATEWAY_DATABASE_URL": database_url, **present})
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert missing in lines[0] and "required" in lines[0], lines[0]


def _migrate_outcome(stdout: str) -> list[str]:
    """The migrations ``migrate`` applied, from its one ``migrate_finished`` log line."""
    finished = [json.loads(line) for line in stdout.splitlines()
                if '"migrate_finished"' in line]
    assert len(finished) == 1, stdout
    applied: list[str] = finished[0]["applied"]
    return applied


def test_migrate_command_is_repeatable(database_url: str) -> None:
    """``migrate`` succeeds twice: on a migrated database and on an empty one."""
    env = database_env(database_url)
    for _ in range(2):
        result = run_command(["migrate"], env)
        assert result.returncode == 0, result.stderr
        assert _migrate_outcome(result.stdout) == [], result.stdout

    empty = f"gw_e2e_empty_{uuid.uuid4().hex[:12]}"
    run_blocking(create_database(database_url, empty))
    try:
        env = database_env(dsn_with_database(database_url, empty))
        first = run_command(["migrate"], env)
        assert first.returncode == 0, first.stderr
        every_file = sorted(p.name for p in default_migrations_dir().glob("*.sql"))
        assert _migrate_outcome(first.stdout) == every_file, first.stdout
        second = run_command(["migrate"], env)
        assert second.returncode == 0, second.stderr
        assert _migrate_outcome(second.stdout) == [], second.stdout
    finally:
        run_blocking(drop_database(database_url, empty))


async def test_logs_are_json_lines_without_secrets(database_url: str, tmp_path: Path) -> None:
    """After devices and services used the gateway (debug level), stdout is one JSON object
    per line and no output contains a device token, the JWT secret or a service token."""
    token = mint_token("user-logs")
    forged = mint_token("user-logs", secret="another-secret-that-is-long-enough")
    env = database_env(database_url, GATEWAY_LOG_LEVEL="debug")
    with running_gateway(env, log_dir=tmp_path) as proc:
        async with aiohttp.ClientSession() as session:
            device = await connect_device(session, proc.ws_url, token=token,
                                          user_id="user-logs", device_id="laptop")
            # Refused handshakes and refused service calls get logged too.
            refused = await session.get(proc.ws_url, params={"token": forged})
            assert refused.status == 401
            status, _ = await call_api(session, "GET", f"{proc.internal_url}/devices?user_id=x",
                                       token="wrong-service-token-0000000000")
            assert status == 401

            reply = asyncio.create_task(call_api(
                session, "POST", f"{proc.internal_url}/tool-calls",
                {"user_id": "user-logs", "tool": "read_file", "args": {"path": "/etc/hosts"}}))
            call = await device.recv_type("tool_call")
            await device.send({"type": "tool_result", "id": call["id"], "result": "ok"})
            status, body = await reply
            assert status == 200, body
            await device.send("not json")  # a refused frame, logged at debug
            assert (await device.recv_type("error"))["code"] == "bad_frame"
            await device.close()
        code, _ = proc.stop()
        assert code == 0, proc.describe()

    lines = proc.log_lines()  # raises on any line that is not one JSON object
    events = {line.get("event") for line in lines}
    assert {"device_connected", "tool_call", "device_disconnected", "http_request",
            "gateway_stopped"} <= events, events
    for line in lines:  # every line carries its level and a UTC time, whoever logged it
        assert line.get("level") in {"debug", "info", "warning", "error", "critical"}, line
        assert dt.datetime.fromisoformat(line["timestamp"]).utcoffset() == dt.timedelta(0), line
    tool_call = next(line for line in lines if line.get("event") == "tool_call")
    assert tool_call["outcome"] == "ok" and tool_call["request_id"], tool_call
    output = proc.stdout() + proc.stderr()
    for secret in (token, forged, E2E_JWT_SECRET, E2E_SERVICE_TOKEN,
                   "wrong-service-token-0000000000"):
        assert secret not in output, f"a secret leaked into the output: {secret[:12]}..."
    # The WebSocket's access log line is there, with its token blanked.
    ws_paths = [line["path"] for line in lines
                if line.get("event") == "http_request" and "/ws/device" in line["path"]]
    assert ws_paths and all("token=REDACTED" in path for path in ws_paths), ws_paths


async def test_orphaned_runs_are_marked_before_ready(database_url: str, tmp_path: Path) -> None:
    """A run left `running` by this instance's previous life (same <hostname>:<port>) is an
    error ("gateway restarted") by the time /readyz first says 200; others' runs are not."""
    public_port, internal_port = free_ports(2)
    ours, theirs = uuid.uuid4(), uuid.uuid4()
    conn = await asyncpg.connect(database_url)
    try:
        insert = """INSERT INTO agent_run_logs (id, user_id, agent_id, device_id, status,
                                                started_at, gateway_instance)
                    VALUES ($1, 'u1', 'a1', 'd1', 'running', now(), $2)"""
        await conn.execute(insert, ours, f"{socket.gethostname()}:{public_port}")
        await conn.execute(insert, theirs, "another-host:8080")

        proc = start_gateway(database_env(database_url), log_dir=tmp_path,
                             public_port=public_port, internal_port=internal_port)
        try:
            proc.wait_ready()
            rows = {r["id"]: r for r in await conn.fetch(
                "SELECT id, status, errors::text AS errors, finished_at FROM agent_run_logs")}
            code, _ = proc.stop()
            assert code == 0, proc.describe()
        finally:
            proc.kill()
    finally:
        await conn.close()
    assert rows[ours]["status"] == "error"
    assert "gateway restarted" in orjson.loads(rows[ours]["errors"])
    assert rows[ours]["finished_at"] is not None
    assert rows[theirs]["status"] == "running"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # our own encode
async def test_a_short_hmac_secret_is_one_warning_line_at_start(
    database_url: str, tmp_path: Path
) -> None:
    """A 35-byte secret is fine for HS256 but short for HS512 (RFC 7518 asks 64): the
    gateway still starts (devices hold tokens signed with it), says so once at start-up as
    a JSON line, and PyJWT's own warning at the first check is a JSON line too, not text
    on stderr."""
    env = database_env(database_url, GATEWAY_JWT_ALGORITHMS="HS256,HS512")
    with running_gateway(env, log_dir=tmp_path) as proc:
        warning = proc.wait_for_event("jwt_secret_short")
        token = jwt.encode({"sub": "u-hs512", "exp": int(time.time()) + 600},
                           E2E_JWT_SECRET, algorithm="HS512")
        async with aiohttp.ClientSession() as session:
            device = await connect_device(session, proc.ws_url, token=token,
                                          user_id="u-hs512", device_id="d1")
            await device.close()
        code, _ = proc.stop()
        assert code == 0, proc.describe()
    assert warning["level"] == "warning" and warning["recommended_bytes"] == 64, warning
    assert E2E_JWT_SECRET not in proc.stdout() + proc.stderr()
    assert "InsecureKeyLengthWarning" not in proc.stderr(), proc.describe()
    py_warnings = [line for line in proc.log_lines() if line.get("logger") == "py.warnings"]
    assert any("64 bytes" in line["event"] for line in py_warnings), py_warnings
    assert all(line["level"] == "warning" for line in py_warnings), py_warnings
