"""The processes under test: the gateway, the ceiling, PostgreSQL; and their CPU and memory.

Every server is a child process of the benchmark, listening on loopback only,
stopped by its own pid (SIGTERM, then SIGKILL after a bounded wait).
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
WS_PATH = "/api/v1/ws/device"
INTERNAL_PREFIX = "/internal/v1"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def check_loopback(url: str) -> None:
    """Load is only ever aimed at this machine."""
    host = urllib.request.urlparse(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load a non-loopback target: {url}")


# ---------------------------------------------------------------- PostgreSQL


@dataclass
class Database:
    """The gateway's PostgreSQL: given by DSN, or an embedded one in a temporary directory."""

    dsn: str
    embedded: Any = None  # gateway.embedded_db.EmbeddedPostgres
    tmp_dir: Path | None = None

    @classmethod
    def open(cls, dsn: str | None, *, tmp_root: str | None = None) -> Database:
        if dsn:
            return cls(dsn=dsn)
        from gateway.dev.embedded_db import EmbeddedPostgres

        tmp_dir = Path(tempfile.mkdtemp(prefix="gw-bench-pg-", dir=tmp_root))
        try:
            embedded = EmbeddedPostgres.start(tmp_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        return cls(dsn=embedded.dsn, embedded=embedded, tmp_dir=tmp_dir)

    def pids(self) -> list[int]:
        """The server's processes (postmaster and backends), when it is ours."""
        if self.embedded is None:
            return []
        pid_file = Path(self.embedded.pgdata) / "postmaster.pid"
        try:
            postmaster = int(pid_file.read_text().split("\n", 1)[0])
            proc = psutil.Process(postmaster)
            return [postmaster, *(c.pid for c in proc.children(recursive=True))]
        except (OSError, ValueError, psutil.Error):
            return []

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    """A running gateway or ceiling process and how to reach it."""

    kind: str  # "gateway" | "ceiling"
    proc: subprocess.Popen[bytes]
    public_port: int
    internal_port: int
    log_path: Path
    jwt_secret: str
    service_token: str
    instance_id: str = ""
    _log_file: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.public_port}{WS_PATH}"

    @property
    def internal_base(self) -> str:
        return f"http://{LOOPBACK}:{self.internal_port}{INTERNAL_PREFIX}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM (the gateway drains), then SIGKILL if it does not leave in time."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode


def _wait_ready(server: Server, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.kind} exited with {server.proc.returncode} during start-up:\n"
                + server.log_tail())
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{server.kind} not ready within {START_TIMEOUT_S:g} s:\n"
                       + server.log_tail())


def start_gateway(db: Database, run_dir: Path, *,
                  extra_env: Mapping[str, str] | None = None, root: Path = ROOT,
                  argv: list[str] | None = None) -> Server:
    """``python run_gateway.py`` against ``db``, on loopback ports, logs to a file.

    ``root``: the source tree to run (another worktree, to A/B a change); its
    ``run_gateway.py`` directory comes first on ``sys.path``, so its ``gateway``
    package is the one imported.
    """
    public_port, internal_port = free_port(), free_port()
    while internal_port == public_port:
        internal_port = free_port()
    jwt_secret = secrets.token_urlsafe(32)
    service_token = secrets.token_urlsafe(32)
    instance_id = f"bench-{public_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({
        "GATEWAY_DATABASE_URL": db.dsn,
        "GATEWAY_JWT_SECRET": jwt_secret,
        "GATEWAY_INTERNAL_TOKENS": service_token,
        "GATEWAY_PUBLIC_HOST": LOOPBACK,
        "GATEWAY_PUBLIC_PORT": str(public_port),
        "GATEWAY_INTERNAL_HOST": LOOPBACK,
        "GATEWAY_INTERNAL_PORT": str(internal_port),
        "GATEWAY_INSTANCE_ID": instance_id,
        "GATEWAY_DATA_DIR": str(run_dir / "gateway-data"),
        "GATEWAY_LOG_FORMAT": "json",
    })
    env.update(extra_env or {})
    log_path = run_dir / f"gateway-{public_port}.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        argv or [sys.executable, str(root / "run_gateway.py")], cwd=root, env=env,
        stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
    )
    server = Server("gateway", proc, public_port, internal_port, log_path, jwt_secret,
                    service_token, instance_id, log_file)
    _wait_ready(server, f"http://{LOOPBACK}:{public_port}/readyz")
    return server


def start_ceiling(run_dir: Path, *, extra_env: Mapping[str, str] | None = None,
                  argv: list[str] | None = None, compress: bool = False) -> Server:
    """``python -m benchmarks.ceiling`` on one loopback port (both roles)."""
    port = free_port()
    log_path = run_dir / f"ceiling-{port}.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [*(argv or [sys.executable, "-m", "benchmarks.ceiling"]), "--port", str(port),
         *(["--compress"] if compress else [])],
        cwd=ROOT, env={**os.environ, **(extra_env or {})},
        stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
    )
    server = Server("ceiling", proc, port, port, log_path, "", "", "", log_file)
    _wait_ready(server, f"http://{LOOPBACK}:{port}/healthz")
    return server


# ---------------------------------------------------------------- sampling


def _cpu_seconds(pids: Iterable[int], *, kernel_only: bool = False) -> float:
    """CPU seconds of ``pids``: user and kernel, or the kernel's (system calls) alone."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.system if kernel_only else times.user + times.system
    return total


def _machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)


def rss_bytes(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


@dataclass
class CpuWindow:
    """CPU used by groups of processes between ``start`` and ``stop``, in cores.

    ``groups`` maps a name to a callable returning pids, so processes that come
    and go (PostgreSQL backends) are looked up at both ends.
    """

    groups: Mapping[str, Any]
    _t0: float = 0.0
    _cpu0: dict[str, float] = field(default_factory=dict)
    _kernel0: dict[str, float] = field(default_factory=dict)
    _machine0: float = 0.0

    def start(self) -> None:
        self._cpu0 = {name: _cpu_seconds(pids()) for name, pids in self.groups.items()}
        self._kernel0 = {name: _cpu_seconds(pids(), kernel_only=True)
                         for name, pids in self.groups.items()}
        self._machine0 = _machine_busy_seconds()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._t0, 1e-9)
        cores = {
            name: round(max(0.0, _cpu_seconds(pids()) - self._cpu0[name]) / wall, 3)
            for name, pids in self.groups.items()
        }
        # How much of it was the kernel's (socket system calls): what no Python
        # change removes.
        cores.update({
            f"{name}_kernel": round(max(0.0, _cpu_seconds(pids(), kernel_only=True)
                                        - self._kernel0[name]) / wall, 3)
            for name, pids in self.groups.items()
        })
        cores["machine_busy"] = round(max(0.0, _machine_busy_seconds() - self._machine0)
                                      / wall, 3)
        cores["wall_s"] = round(wall, 3)
        return cores
