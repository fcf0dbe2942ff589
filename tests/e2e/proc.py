"""The real gateway process, started and stopped as an operator (or systemd) would.

``start_gateway(env=...)`` runs ``python run_gateway.py`` from the repository
root with exactly the environment given (every inherited ``GATEWAY_*`` and
systemd variable stripped), its stdout and stderr captured to files, on free
ports picked by binding port 0. ``wait_ready`` polls ``/readyz`` with a
bounded deadline; ``stop`` sends SIGTERM and reports the exit code and the
time the process took to exit. Import as ``from e2e.proc import ...``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import jwt
import orjson
from harness import Device

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINT = REPO_ROOT / "run_gateway.py"
# Variables that would change what the child does behind the test's back.
_STRIPPED_PREFIXES = ("GATEWAY_",)
_STRIPPED = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS"})
READY_TIMEOUT_S = 30.0  # a cold dev-mode start runs initdb
POLL_INTERVAL_S = 0.05
COMMAND_TIMEOUT_S = 60.0
PORT_ATTEMPTS = 3


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bind port 0, read, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all held open until every one is picked)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def child_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """The inherited environment less GATEWAY_* and systemd variables, plus ``overrides``."""
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(_STRIPPED_PREFIXES) and key not in _STRIPPED
    }
    env.update(overrides)
    return env


def run_command(args: Sequence[str], env: Mapping[str, str],
                timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``python run_gateway.py <args>`` to completion (token, migrate, bad config)."""
    return subprocess.run(
        [sys.executable, str(ENTRY_POINT), *args], cwd=REPO_ROOT, env=child_env(env),
        capture_output=True, text=True, timeout=timeout, check=False,
    )


@attrs.define(eq=False)
class GatewayProcess:
    """A running ``run_gateway.py`` and where to reach it."""

    popen: subprocess.Popen[bytes]
    public_port: int
    internal_port: int
    stdout_path: Path
    stderr_path: Path
    started_at: float  # time.monotonic() just before the spawn
    ready_after_s: float | None = None
    signalled_at: float | None = None
    # Set when the public listener speaks TLS: a client context trusting its CA.
    client_ssl: ssl.SSLContext | None = None

    @property
    def public_url(self) -> str:
        scheme = "https" if self.client_ssl else "http"
        return f"{scheme}://127.0.0.1:{self.public_port}"

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}/internal/v1"

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.client_ssl else "ws"
        return f"{scheme}://127.0.0.1:{self.public_port}/api/v1/ws/device"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """stdout parsed as JSON lines (raises if a line is not one JSON object)."""
        lines = []
        for number, line in enumerate(self.stdout().splitlines(), 1):
            value = orjson.loads(line)
            if not isinstance(value, dict):
                raise ValueError(f"stdout line {number} is not a JSON object: {line!r}")
            lines.append(value)
        return lines

    def events(self) -> list[str]:
        return [str(line.get("event")) for line in self.log_lines()]

    def describe(self) -> str:
        """Everything the process said, for assertion messages."""
        return (f"exit code: {self.popen.poll()}\n--- stderr ---\n{self.stderr()[-4000:]}"
                f"\n--- stdout ---\n{self.stdout()[-4000:]}")

    def readyz_status(self, timeout: float = 2.0) -> int | None:
        """/readyz's HTTP status, or None when nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.public_url}/readyz", timeout=timeout,
                                        context=self.client_ssl) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Poll /readyz until 200; seconds since spawn. Fails fast if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise AssertionError(f"gateway exited before it was ready\n{self.describe()}")
            if self.readyz_status(timeout=1.0) == 200:
                self.ready_after_s = time.monotonic() - self.started_at
                return self.ready_after_s
            if time.monotonic() > deadline:
                raise AssertionError(f"/readyz not 200 within {timeout} s\n{self.describe()}")
            time.sleep(POLL_INTERVAL_S)

    def wait_for_event(self, event: str, timeout: float = 5.0) -> dict[str, Any]:
        """The first stdout log line whose event is ``event`` (bounded poll)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_lines():
                if line.get("event") == event:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event!r} log line within {timeout} s\n"
                                     f"{self.describe()}")
            time.sleep(POLL_INTERVAL_S)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
        self.popen.send_signal(signum)

    def wait_exit(self, timeout: float = 30.0) -> tuple[int, float]:
        """Exit code and seconds from the first signal to the exit (kills on timeout)."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"gateway did not exit within {timeout} s\n"
                                 f"{self.describe()}") from None
        exited_at = time.monotonic()
        return code, exited_at - (self.signalled_at or exited_at)

    def stop(self, timeout: float = 30.0) -> tuple[int, float]:
        """SIGTERM, then the exit code and the seconds it took to exit."""
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """Last resort for a test that failed half-way: SIGKILL our own child only."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


def start_gateway(env: Mapping[str, str], *, args: Sequence[str] = (),
                  log_dir: Path | None = None, public_port: int | None = None,
                  internal_port: int | None = None,
                  program: Sequence[str] | None = None, cwd: Path = REPO_ROOT,
                  client_ssl: ssl.SSLContext | None = None) -> GatewayProcess:
    """Spawn ``python run_gateway.py [args]`` with ``env`` on free ports (not yet ready).

    The ports are set through GATEWAY_PUBLIC_PORT / GATEWAY_INTERNAL_PORT
    unless ``env`` already names them. ``program`` replaces
    ``python run_gateway.py`` (an installed ``device-gateway`` script, say).
    """
    env = dict(env)
    if public_port is None or internal_port is None:
        picked = free_ports(2)
        public_port = public_port or picked[0]
        internal_port = internal_port or picked[1]
    env.setdefault("GATEWAY_PUBLIC_PORT", str(public_port))
    env.setdefault("GATEWAY_INTERNAL_PORT", str(internal_port))
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="gw-e2e-logs-"))
    stdout_path = log_dir / f"gateway-{public_port}.stdout"
    stderr_path = log_dir / f"gateway-{public_port}.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        started_at = time.monotonic()
        popen = subprocess.Popen(
            [*(program or (sys.executable, str(ENTRY_POINT))), *args], cwd=cwd,
            env=child_env(env),
            stdin=subprocess.DEVNULL, stdout=out, stderr=err,
        )
    return GatewayProcess(
        popen=popen, public_port=int(env["GATEWAY_PUBLIC_PORT"]),
        internal_port=int(env["GATEWAY_INTERNAL_PORT"]), stdout_path=stdout_path,
        stderr_path=stderr_path, started_at=started_at, client_ssl=client_ssl,
    )


@contextlib.contextmanager
def running_gateway(env: Mapping[str, str], *, log_dir: Path | None = None,
                    ready_timeout: float = READY_TIMEOUT_S,
                    client_ssl: ssl.SSLContext | None = None) -> Iterator[GatewayProcess]:
    """A started and ready gateway; killed afterwards if the test did not stop it.

    ``client_ssl``: the public listener speaks TLS (GATEWAY_TLS_* in ``env``), and
    this context, trusting its CA, is how the helpers reach it.
    """
    for attempt in range(1, PORT_ATTEMPTS + 1):
        proc = start_gateway(env, log_dir=log_dir, client_ssl=client_ssl)
        try:
            proc.wait_ready(ready_timeout)
            break
        except AssertionError:
            proc.kill()
            # A port picked free was taken before the gateway bound it (another
            # process's ephemeral port): pick again, unless the ports were given.
            picked = "GATEWAY_PUBLIC_PORT" not in env and "GATEWAY_INTERNAL_PORT" not in env
            if not (picked and attempt < PORT_ATTEMPTS and "address already in use"
                    in proc.stdout() + proc.stderr()):
                raise
    try:
        yield proc
    finally:
        proc.kill()


def wait_for_text(read: Any, pattern: str, timeout: float = 5.0) -> re.Match[str]:
    """Poll ``read()`` (e.g. ``proc.stderr``) until ``pattern`` matches (multiline)."""
    compiled = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        match = compiled.search(text)
        if match is not None:
            return match
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not seen within {timeout} s in:\n{text[-4000:]}")
        time.sleep(POLL_INTERVAL_S)


# ---------------------------------------------------------------- driving it as users do

# Secrets for processes with GATEWAY_DATABASE_URL: long and distinctive, so a
# grep of the captured output cannot miss them nor match them by accident.
E2E_JWT_SECRET = "e2e-jwt-secret-5f1c0a9b7d3e4a26b8c1"
E2E_SERVICE_TOKEN = "e2e-service-token-9a4be27c61d0f385"


def database_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment of a gateway on a configured database (not dev mode)."""
    return {
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_JWT_SECRET": E2E_JWT_SECRET,
        "GATEWAY_INTERNAL_TOKENS": E2E_SERVICE_TOKEN,
        **extra,
    }


def mint_token(sub: str, *, secret: str = E2E_JWT_SECRET, ttl_s: int = 3600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256")


async def connect_device(session: aiohttp.ClientSession, ws_url: str, *, token: str,
                         user_id: str, device_id: str,
                         agent_ids: Sequence[str] | None = None) -> Device:
    """A device that connected with ``?token=``, said hello and got its hello_ack."""
    ws = await session.ws_connect(ws_url, params={"token": token})
    device = Device(ws, user_id, device_id)
    hello: dict[str, Any] = {"type": "device_hello", "device_id": device_id}
    if agent_ids is not None:
        hello["agent_ids"] = list(agent_ids)
    await device.send(hello)
    device.hello_ack = await device.recv_type("hello_ack")
    return device


async def call_api(session: aiohttp.ClientSession, method: str, url: str, body: Any = None, *,
                   token: str = E2E_SERVICE_TOKEN) -> tuple[int, Any]:
    """One internal API request as a sibling service makes it: (status, decoded JSON)."""
    data = orjson.dumps(body) if body is not None else None
    async with session.request(method, url, data=data, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as resp:
        raw = await resp.read()
        return resp.status, (orjson.loads(raw) if raw else None)
