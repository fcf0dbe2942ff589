"""``serve --workers N``: one command, N gateway processes sharing both ports.

The parent does not serve. It starts N workers (``python -m gateway.cli
serve``) with ``SO_REUSEPORT`` on the shared public and internal ports, each
with instance id ``<GATEWAY_INSTANCE_ID>/<n>`` and an extra internal listener
on an ephemeral port of its own, advertised to its siblings (PROTOCOL.md §5).
With the embedded database (dev mode) the parent starts it once and hands its
DSN and the dev secrets to the workers.

The workers' sd_notify messages come to a socket of the parent's (their
``NOTIFY_SOCKET``); the parent tells systemd ``READY=1`` once every worker
has said it, pings systemd's watchdog while it runs, and restarts a worker
that exits on its own (with a back-off), so one crash never takes the unit
down. SIGTERM (or SIGINT) goes to every worker; the parent exits 0 once all
have drained and exited 0. SIGHUP (certificate reload) is passed on.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
import structlog

from gateway.config import OPTIONS, ConfigError, Secrets, Settings
from gateway.systemd import SystemdNotifier

log = structlog.get_logger(__name__)

TICK_S = 0.2
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 10.0
# A worker that ran this long before it died starts the back-off afresh.
STABLE_AFTER_S = 30.0
# Past the workers' own drain budget, before the stragglers are killed.
STOP_MARGIN_S = 10.0
# Variables the parent's own systemd hands it, never a worker's to use.
_SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
_UCRED = struct.Struct("3i")


@attrs.define(eq=False)
class Worker:
    number: int
    instance_id: str
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready: bool = False
    restarts: int = 0
    restart_at: float | None = None
    delay_s: float = RESTART_FIRST_S
    last_watchdog: float = 0.0  # monotonic time of its last WATCHDOG=1 to us


def check(settings: Settings) -> None:
    if settings.workers > 1 and (settings.public_port == 0 or settings.internal_port == 0):
        raise ConfigError("GATEWAY_WORKERS > 1 needs fixed GATEWAY_PUBLIC_PORT and "
                          "GATEWAY_INTERNAL_PORT (the workers share them)")


def worker_environment(base: Mapping[str, str], settings: Settings, secrets: Secrets,
                       dsn: str, flags: Mapping[str, str | None], *, number: int,
                       notify_socket: str) -> dict[str, str]:
    """What worker ``number`` sees: our settings (flags as variables), its own identity."""
    env = {k: v for k, v in base.items() if k not in _SYSTEMD_ONLY}
    for option in OPTIONS:
        raw = flags.get(option.field)
        if raw is not None:
            env[option.env] = raw
    env.pop("GATEWAY_ADVERTISE_URL", None)  # each worker advertises its own listener
    env.update({
        "GATEWAY_WORKERS": "1",
        "GATEWAY_INSTANCE_ID": f"{settings.instance_id}/{number}",
        "GATEWAY_REUSE_PORT": "true",
        "GATEWAY_PEER_PORT": "0",
        "GATEWAY_DATABASE_URL": dsn,
        "NOTIFY_SOCKET": notify_socket,
        # A worker whose parent is gone (killed with SIGKILL) drains and exits.
        "GATEWAY_PARENT_PID": str(os.getpid()),
    })
    if settings.watchdog_usec:
        # Each worker pings us (no WATCHDOG_PID: the watchdog is its own); one that
        # stops is killed and restarted, while we keep pinging systemd.
        env["WATCHDOG_USEC"] = settings.watchdog_usec
    if secrets.jwt_secret is not None:
        env["GATEWAY_JWT_SECRET"] = secrets.jwt_secret
    if secrets.internal_tokens:
        env["GATEWAY_INTERNAL_TOKENS"] = ",".join(secrets.internal_tokens)
    return env


@attrs.define(eq=False)
class Supervisor:
    settings: Settings
    secrets: Secrets
    dsn: str
    flags: Mapping[str, str | None]
    notifier: SystemdNotifier
    workers: list[Worker] = attrs.Factory(list)
    _stop_signal: int | None = None
    _hup: bool = False
    _sock: socket.socket | None = None
    _sock_path: str = ""

    def run(self) -> int:
        check(self.settings)
        with tempfile.TemporaryDirectory(prefix="gateway-workers-") as tmp:
            self._sock_path = str(Path(tmp) / "notify.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind(self._sock_path)
            self._sock = sock
            try:
                return self._supervise()
            finally:
                sock.close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._hup = True
        elif self._stop_signal is None:
            self._stop_signal = signum
        else:  # a second one: leave at once, as a single gateway does
            for worker in self.workers:
                if worker.popen is not None and worker.popen.poll() is None:
                    worker.popen.kill()
            os._exit(1)

    def _supervise(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        self.workers = [Worker(n, f"{self.settings.instance_id}/{n}")
                        for n in range(1, self.settings.workers + 1)]
        log.info("workers_starting", workers=len(self.workers),
                 instance_id=self.settings.instance_id)
        for worker in self.workers:
            self._start(worker)
        announced = False
        watchdog = SystemdNotifier.watchdog_interval(
            self.settings.watchdog_usec, self.settings.watchdog_pid, os.getpid())
        next_ping = time.monotonic()
        while self._stop_signal is None:
            self._read_notifications()
            if self._hup:
                self._hup = False
                self._signal_all(signal.SIGHUP)
            self._reap_and_restart()
            if watchdog is not None:
                self._kill_silent(2 * watchdog)
            if not announced and all(w.ready for w in self.workers):
                announced = True
                log.info("workers_ready", workers=len(self.workers))
                self.notifier.ready(f"{len(self.workers)} workers accepting devices")
            if watchdog is not None and time.monotonic() >= next_ping:
                self.notifier.watchdog()
                next_ping = time.monotonic() + watchdog
        return self._stop_all()

    def _start(self, worker: Worker) -> None:
        env = worker_environment(os.environ, self.settings, self.secrets, self.dsn, self.flags,
                                 number=worker.number, notify_socket=self._sock_path)
        # The gateway the parent runs, wherever it was started from.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # Its own session: a terminal's Ctrl-C (SIGINT to the foreground group) reaches
        # only us, and we pass one SIGTERM on; a second signal would make a worker
        # leave without draining. (Under systemd, KillMode=mixed does the same.)
        worker.popen = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve"], env=env, stdin=subprocess.DEVNULL,
            start_new_session=True)
        worker.started_at = time.monotonic()
        worker.last_watchdog = worker.started_at
        worker.ready = False
        worker.restart_at = None
        log.info("worker_started", worker=worker.number, pid=worker.popen.pid,
                 instance_id=worker.instance_id, restarts=worker.restarts)

    def _read_notifications(self) -> None:
        assert self._sock is not None
        readable, _, _ = select.select([self._sock], [], [], TICK_S)
        while readable:
            try:
                data, ancillary, _flags, _addr = self._sock.recvmsg(
                    4096, socket.CMSG_SPACE(_UCRED.size), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[:_UCRED.size])[0]
            lines = data.split(b"\n")
            for worker in self.workers:
                if worker.popen is None or worker.popen.pid != pid:
                    continue
                if b"WATCHDOG=1" in lines:
                    worker.last_watchdog = time.monotonic()
                if b"READY=1" in lines:
                    worker.ready = True
                    worker.last_watchdog = time.monotonic()
                    log.info("worker_ready", worker=worker.number, pid=pid)

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.restart_at is not None:
                if now >= worker.restart_at and self._stop_signal is None:
                    worker.restarts += 1
                    self._start(worker)
                continue
            if worker.popen is None:
                continue
            code = worker.popen.poll()
            if code is None:
                continue
            ran_s = now - worker.started_at
            if ran_s >= STABLE_AFTER_S:
                worker.delay_s = RESTART_FIRST_S
            log.error("worker_exited", worker=worker.number, pid=worker.popen.pid,
                      exit_code=code, ran_s=round(ran_s, 3), restart_in_s=worker.delay_s)
            worker.ready = False
            worker.restart_at = now + worker.delay_s
            worker.delay_s = min(worker.delay_s * 2, RESTART_MAX_S)

    def _kill_silent(self, within_s: float) -> None:
        """A ready worker silent to the watchdog past ``within_s`` is wedged: kill it
        (``_reap_and_restart`` starts it again)."""
        now = time.monotonic()
        for worker in self.workers:
            if (worker.ready and worker.popen is not None and worker.popen.poll() is None
                    and now - worker.last_watchdog > within_s):
                log.error("worker_watchdog_timeout", worker=worker.number, pid=worker.popen.pid,
                          silent_s=round(now - worker.last_watchdog, 3))
                worker.popen.kill()
                worker.ready = False

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.popen is not None and worker.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.popen.send_signal(signum)

    def _stop_all(self) -> int:
        log.info("workers_stopping", signal=signal.Signals(self._stop_signal or 15).name)
        self.notifier.stopping("draining workers")
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + STOP_MARGIN_S
        codes: dict[str, int] = {}
        for worker in self.workers:
            if worker.popen is None or worker.restart_at is not None:
                continue  # was down, waiting for its restart
            try:
                codes[str(worker.number)] = worker.popen.wait(
                    timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.popen.kill()
                codes[str(worker.number)] = worker.popen.wait()
        log.info("workers_stopped", exit_codes=codes)
        return 0 if all(code == 0 for code in codes.values()) else 1
