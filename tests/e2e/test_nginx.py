"""The shipped nginx configuration in front of the real gateway (README "On the internet").

Debian's nginx runs deploy/nginx/device-gateway.conf with only its ports,
certificate paths, log path and timeouts changed (each change must match the
shipped file exactly once, so the copy cannot drift from it). A device
connects through it with wss:// from 127.0.0.5 while nginx reaches the
gateway from 127.0.0.1: the gateway must log 127.0.0.5. The device says hello,
answers a tool call, streams a run, stays connected with heartbeats alone for
longer than nginx's idle timeout, and sees 1001 when the gateway drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from certs import client_context, make_ca, make_server_cert
from harness import Device
from system_tools import require

from e2e.proc import (
    E2E_SERVICE_TOKEN,
    call_api,
    connect_device,
    database_env,
    free_ports,
    mint_token,
    running_gateway,
)
from gateway.config import Settings

pytestmark = pytest.mark.e2e

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "device-gateway.conf"
DEVICE_ADDRESS = "127.0.0.5"  # the client's own loopback address; nginx's is 127.0.0.1
HEARTBEAT_S = 1.0
NGINX_IDLE_TIMEOUT_S = 3  # the test copy's proxy_read_timeout / proxy_send_timeout
IDLE_FOR_S = 5.0  # longer than that: only heartbeats keep the device connected
NGINX_START_TIMEOUT_S = 10.0


def timeouts_of(text: str, directive: str) -> list[float]:
    """Every ``<directive> <n>s;`` (nginx time: seconds, or with an m/s suffix)."""
    values = []
    for number, unit in re.findall(rf"^\s*{directive}\s+(\d+)(m|s)?;", text, re.M):
        values.append(float(number) * (60 if unit == "m" else 1))
    return values


def test_shipped_timeouts_exceed_the_heartbeat_limit() -> None:
    """nginx must outlast the gateway's own dead-peer limit (1.5 x GATEWAY_HEARTBEAT_S),
    or it cuts quiet devices before a heartbeat could show they are alive."""
    text = SHIPPED.read_text()
    limit = Settings().heartbeat_s * 1.5
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        values = timeouts_of(text, directive)
        assert values, f"{directive} is not set: nginx's default is 60 s"
        assert all(value > limit for value in values), (directive, values, limit)


def test_shipped_config_proxies_only_the_public_paths() -> None:
    text = SHIPPED.read_text()
    proxied = re.findall(r"location\s+(\S+(?:\s+\S+)?)\s*\{[^}]*proxy_pass", text)
    assert proxied == ["= /api/v1/ws/device", "~ ^/(healthz|readyz)$"], proxied
    assert re.search(r"location\s+/\s*\{\s*return 404;", text)
    assert "8081" not in re.sub(r"#.*", "", text)  # the internal listener is never named


def render(text: str, replacements: list[tuple[str, str]]) -> str:
    """The shipped text with each pattern replaced; each must match at least once."""
    for pattern, new in replacements:
        text, count = re.subn(pattern, new, text, flags=re.M)
        assert count >= 1, f"{pattern!r} no longer in {SHIPPED.name}: update the test copy"
    return text


def nginx_conf(workdir: Path, *, https_port: int, http_port: int, gateway_port: int,
               cert_file: Path, key_file: Path) -> Path:
    """A whole nginx.conf around the rendered copy of the shipped file; all paths in workdir."""
    site = render(SHIPPED.read_text(), [
        (r"^\s*listen \[::\]:\d+( ssl)?;\n", ""),  # loopback IPv4 only in the test
        (r"listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        (r"listen 80;", f"listen 127.0.0.1:{http_port};"),
        (r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{gateway_port};"),
        (r"ssl_certificate\s+\S+;", f"ssl_certificate {cert_file};"),
        (r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key_file};"),
        (r"access_log /var/log/nginx/\S+ ", f"access_log {workdir}/access.log "),
        (r"proxy_read_timeout \d+s;", f"proxy_read_timeout {NGINX_IDLE_TIMEOUT_S}s;"),
        (r"proxy_send_timeout \d+s;", f"proxy_send_timeout {NGINX_IDLE_TIMEOUT_S}s;"),
    ])
    (workdir / "device-gateway.conf").write_text(site)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # As root, workers would otherwise run as nobody and could not reach workdir.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    conf.write_text(f"""{user}
worker_processes 1;
error_log {workdir}/error.log info;
pid {workdir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log {workdir}/access.log;
{temp_paths}
    include {workdir}/device-gateway.conf;
}}
""")
    return conf


async def close_frame_code(device: Device, timeout: float) -> int | None:
    """The code in the close frame the device receives (None: the socket ended without one).

    Not ``ws.close_code``: aiohttp's client overwrites it with 1006 when its own
    close reply cannot be written, and through nginx the gateway's side is often
    gone by then (the gateway closes its socket once its close frame is out,
    nginx then closes the device's).
    """
    async with asyncio.timeout(timeout):
        while True:
            msg = await device.ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return int(msg.data)
            if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                return None


def wait_for_port(port: int, proc: subprocess.Popen[bytes], error_log: Path) -> None:
    deadline = time.monotonic() + NGINX_START_TIMEOUT_S
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            log = error_log.read_text() if error_log.exists() else ""
            raise AssertionError(f"nginx not listening on {port} (exit {proc.poll()}):\n{log}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_nginx(workdir: Path, conf: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Our own nginx master (never the system's service), stopped and reaped afterwards."""
    nginx = shutil.which("nginx") or require("/usr/sbin/nginx", "apt-get install nginx")
    base = [nginx, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)]
    check = subprocess.run([*base, "-t"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([*base, "-g", "daemon off;"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, workdir / "error.log")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: the master stops its workers
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_a_device_through_nginx(database_url: str, tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    pair = make_server_cert(ca, tmp_path, "nginx")
    https_port, http_port, gateway_port, internal_port = free_ports(4)
    env = database_env(database_url, GATEWAY_PUBLIC_HOST="127.0.0.1",
                       GATEWAY_PUBLIC_PORT=str(gateway_port),
                       GATEWAY_INTERNAL_PORT=str(internal_port),
                       GATEWAY_TRUSTED_PROXIES="127.0.0.1",
                       GATEWAY_HEARTBEAT_S=str(HEARTBEAT_S), GATEWAY_APP_PING="false",
                       GATEWAY_SHUTDOWN_TIMEOUT_S="5")
    conf = nginx_conf(tmp_path, https_port=https_port, http_port=http_port,
                      gateway_port=gateway_port, cert_file=pair.cert_file,
                      key_file=pair.key_file)
    public = f"https://127.0.0.1:{https_port}"
    with running_gateway(env, log_dir=tmp_path) as proc, \
            running_nginx(tmp_path, conf, https_port):
        connector = aiohttp.TCPConnector(ssl=client_context(ca),
                                         local_addr=(DEVICE_ADDRESS, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            # Only the public paths answer through nginx.
            for path, status in (("/healthz", 200), ("/readyz", 200), ("/metrics", 404),
                                 ("/internal/v1/devices?user_id=u1", 404)):
                async with session.get(public + path) as resp:
                    assert resp.status == status, (path, resp.status)
            async with session.get(f"http://127.0.0.1:{http_port}/healthz",
                                   allow_redirects=False) as resp:
                assert resp.status == 301

            device = await connect_device(
                session, f"wss://127.0.0.1:{https_port}/api/v1/ws/device",
                token=mint_token("u1"), user_id="u1", device_id="laptop",
                agent_ids=["agent-a"])
            connected = proc.wait_for_event("device_connected")
            assert connected["remote"] == DEVICE_ADDRESS, connected

            # A tool call from a sibling service (internal listener, not through nginx).
            call = asyncio.create_task(call_api(
                session, "POST", f"{proc.internal_url}/tool-calls",
                {"user_id": "u1", "tool": "echo", "args": {"x": 1}, "timeout_s": 10}))
            tool_call = await device.recv_type("tool_call")
            await device.send({"type": "tool_result", "id": tool_call["id"],
                               "result": {"echo": tool_call["args"]}})
            status, body = await call
            assert status == 200 and body["ok"] and body["result"] == {"echo": {"x": 1}}, body

            # A run streamed through nginx.
            status, run = await call_api(session, "POST", f"{proc.internal_url}/runs",
                                         {"user_id": "u1", "agent_id": "agent-a"})
            assert status == 201 and run["status"] == "running", run
            run_id = (await device.recv_type("agent_run"))["run_id"]
            for n in (1, 2, 3):
                await device.send({"type": "agent_data", "run_id": run_id, "data": {"n": n}})
            await device.send({"type": "agent_complete", "run_id": run_id})
            async with session.get(f"{proc.internal_url}/runs/{run_id}/events",
                                   headers={"Authorization": f"Bearer {E2E_SERVICE_TOKEN}"}
                                   ) as resp:
                lines = (await resp.text()).splitlines()
            assert [line.count('"n":') for line in lines] == [1, 1, 1], lines

            # Quiet for longer than nginx's idle timeout: heartbeats alone keep it open.
            await device.expect_silence(IDLE_FOR_S)
            await device.send({"type": "ping"})
            await device.recv_type("pong")

            close = asyncio.create_task(close_frame_code(device, timeout=10))
            proc.signal(signal.SIGTERM)
            assert await close == 1001
            code, _ = await asyncio.to_thread(proc.wait_exit, 20)
    assert code == 0, proc.describe()
    lines = proc.log_lines()
    assert "device_disconnected" in [line["event"] for line in lines]
    upgrade = [line for line in lines if line["event"] == "http_request"
               and line.get("path", "").startswith("/api/v1/ws/device")]
    assert upgrade and {line["remote"] for line in upgrade} == {DEVICE_ADDRESS}, upgrade
    access_log = (tmp_path / "access.log").read_text()
    assert DEVICE_ADDRESS in access_log
    assert mint_token("u1")[:20] not in access_log and "token=" not in access_log
