"""The embedded PostgreSQL of the zero-configuration default, started for real.

Each test owns a fresh data directory (in memory where possible: initdb is
the slow part). The tests are synchronous because ``start()`` runs before the
gateway's event loop does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
from pg import (
    TEST_SERVER_PREFIX,
    memory_backed_temp_root,
    remove_abandoned_test_servers,
    run_blocking,
)

from gateway.dev.embedded_db import EmbeddedDbError, EmbeddedPostgres, stop_server_immediately

REPO_ROOT = Path(__file__).resolve().parent.parent
# Child gateways log to stderr, leaving stdout to what they report.
LOGS_TO_STDERR = (
    "import structlog, sys; "
    "structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))"
)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data directory that does not exist yet, under a fresh scratch directory."""
    scratch = Path(tempfile.mkdtemp(prefix="gw-edb-", dir=memory_backed_temp_root()))
    data = scratch / "data"
    yield data
    # A failed test must not leave a server behind.
    stop_server_immediately(data.resolve() / "pgdata")
    shutil.rmtree(scratch, ignore_errors=True)


def current_database(dsn: str) -> str:
    async def query() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            return str(await conn.fetchval("SELECT current_database()"))
        finally:
            await conn.close()

    return run_blocking(query())


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def server_processes(pgdata: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``pgdata`` (zombies are not running)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and str(pgdata) in proc.cmdline():
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def assert_no_server_left(pgdata: Path) -> None:
    # pg_ctl returns once the pid file is gone, a moment before the process is.
    deadline = time.monotonic() + 5
    while (left := server_processes(pgdata)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], f"still running on {pgdata}: {left}"


def test_start_serves_the_gateway_database(data_dir: Path) -> None:
    """On an empty directory, start() creates it, inits a cluster, and the DSN reaches 'gateway'."""
    db = EmbeddedPostgres.start(data_dir)
    try:
        assert db.pgdata == data_dir.resolve() / "pgdata"
        assert current_database(db.dsn) == "gateway"
        if os.geteuid() != 0:  # as root the server's user must be able to traverse it
            assert data_dir.stat().st_mode & 0o777 == 0o700
    finally:
        db.stop()


def test_second_start_on_a_data_directory_in_use_is_refused(data_dir: Path) -> None:
    """A second gateway on the same data directory is refused; the first keeps working."""
    db = EmbeddedPostgres.start(data_dir)
    try:
        with pytest.raises(EmbeddedDbError, match="is in use by another gateway process"):
            EmbeddedPostgres.start(data_dir)
        assert current_database(db.dsn) == "gateway"
    finally:
        db.stop()


def test_stop_leaves_no_server_process(data_dir: Path) -> None:
    """After stop() nothing runs on the data directory; a second stop() is harmless."""
    db = EmbeddedPostgres.start(data_dir)
    assert server_processes(db.pgdata) != []

    db.stop()
    db.stop()

    assert_no_server_left(db.pgdata)


def start_and_get_killed(data_dir: Path) -> None:
    """Start a server on ``data_dir`` from a process that is then SIGKILLed; the server stays."""
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from gateway.dev.embedded_db import EmbeddedPostgres
        EmbeddedPostgres.start(Path(sys.argv[1]))
        print("started", flush=True)
        time.sleep(60)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", LOGS_TO_STDERR + "\n" + script, str(data_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == "started"
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()


def test_start_after_a_killed_gateway_adopts_its_server(data_dir: Path) -> None:
    """A gateway SIGKILL'd with its server running: the next start takes that server over."""
    start_and_get_killed(data_dir)
    pgdata = data_dir.resolve() / "pgdata"
    orphan = postmaster_pid(pgdata)

    db = EmbeddedPostgres.start(data_dir)
    try:
        assert postmaster_pid(pgdata) == orphan  # adopted, not restarted
        assert current_database(db.dsn) == "gateway"
    finally:
        db.stop()
    assert_no_server_left(pgdata)


def age(lock_file: Path, seconds: float) -> None:
    """Make a lock file look ``seconds`` old (a session that died that long ago)."""
    then = time.time() - seconds
    os.utime(lock_file, (then, then))


def test_sweep_removes_servers_of_killed_sessions_only() -> None:
    """A test session killed with its server running left a directory behind: the next
    session's sweep stops that server and deletes the directory. It leaves alone a server
    whose owner lives, a directory with no lock, and one locked moments ago (its owner may
    be between creating and locking it)."""
    root = Path(tempfile.mkdtemp(prefix="gw-sweep-", dir=memory_backed_temp_root()))
    dead = root / f"{TEST_SERVER_PREFIX}dead"
    alive = root / f"{TEST_SERVER_PREFIX}alive"
    unlocked = root / f"{TEST_SERVER_PREFIX}being-created"
    unlocked.mkdir()
    young = root / f"{TEST_SERVER_PREFIX}young"
    young.mkdir()
    (young / "gateway.lock").write_text("1\n")
    owned: EmbeddedPostgres | None = None
    try:
        start_and_get_killed(dead)
        age(dead / "gateway.lock", 60)
        dead_pgdata = dead.resolve() / "pgdata"
        assert server_processes(dead_pgdata) != []
        owned = EmbeddedPostgres.start(alive)
        age(alive / "gateway.lock", 60)

        assert remove_abandoned_test_servers(str(root)) == [dead]

        assert not dead.exists()
        assert_no_server_left(dead_pgdata)
        assert current_database(owned.dsn) == "gateway"
        assert unlocked.is_dir() and young.is_dir()
    finally:
        if owned is not None:
            owned.stop()
        stop_server_immediately(dead.resolve() / "pgdata")
        shutil.rmtree(root, ignore_errors=True)


def test_sweep_never_signals_a_process_that_reused_the_servers_pid() -> None:
    """The dead session's postmaster.pid names a pid that now belongs to another live
    process (here: this test): the directory goes, the process is not touched."""
    root = Path(tempfile.mkdtemp(prefix="gw-sweep-", dir=memory_backed_temp_root()))
    dead = root / f"{TEST_SERVER_PREFIX}pid-reused"
    (dead / "pgdata").mkdir(parents=True)
    (dead / "pgdata" / "postmaster.pid").write_text(f"{os.getpid()}\n{dead / 'pgdata'}\n")
    (dead / "gateway.lock").write_text("1\n")
    age(dead / "gateway.lock", 60)
    try:
        assert remove_abandoned_test_servers(str(root)) == [dead]
        assert not dead.exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_start_survives_a_stale_pid_file(data_dir: Path) -> None:
    """A postmaster.pid naming a live process that is not the server (pid reuse) is cleared."""
    db = EmbeddedPostgres.start(data_dir)
    pid_file = db.pgdata / "postmaster.pid"
    contents = pid_file.read_text().splitlines()
    db.stop()
    # Our own pid: certainly alive, certainly not a postgres server.
    pid_file.write_text("\n".join([str(os.getpid()), *contents[1:]]) + "\n")

    db = EmbeddedPostgres.start(data_dir)
    try:
        assert current_database(db.dsn) == "gateway"
        assert postmaster_pid(db.pgdata) != os.getpid()
    finally:
        db.stop()


def test_data_directory_with_a_space_is_refused_clearly(tmp_path: Path) -> None:
    """pg_ctl cannot pass such a socket path to the server; we say so instead of failing later."""
    with pytest.raises(EmbeddedDbError, match="choose another GATEWAY_DATA_DIR"):
        EmbeddedPostgres.start(tmp_path / "my data")


@pytest.mark.skipif(os.geteuid() != 0, reason="this whole file already runs as a normal user")
def test_works_as_a_normal_user(data_dir: Path) -> None:
    """Started by an unprivileged user, the server runs as that user in a 0700 data directory."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to run as")
    # That user must reach the interpreter and its site-packages (pyenv under /root, say).
    for parent in Path(sys.executable).resolve().parents:
        if not parent.stat().st_mode & 0o001:
            pytest.skip(f"{parent} is not traversable by other users")
    scratch = data_dir.parent
    os.chown(scratch, nobody.pw_uid, nobody.pw_gid)
    script = textwrap.dedent(
        """
        import asyncio, os, sys
        from pathlib import Path
        import asyncpg
        from gateway.dev.embedded_db import EmbeddedDbError, EmbeddedPostgres

        async def whoami(dsn):
            conn = await asyncpg.connect(dsn)
            try:
                return await conn.fetchval("SELECT current_database()")
            finally:
                await conn.close()

        data_dir = Path(sys.argv[1])
        db = EmbeddedPostgres.start(data_dir)
        try:
            print(asyncio.run(whoami(db.dsn)))
            print(oct(data_dir.stat().st_mode & 0o777))
            print(os.stat(db.pgdata).st_uid == os.getuid())
            try:
                EmbeddedPostgres.start(data_dir)
            except EmbeddedDbError as err:
                print(err)
        finally:
            db.stop()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", LOGS_TO_STDERR + "\n" + script, str(data_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        env={**os.environ, "HOME": "/nonexistent"},
        check=False,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["gateway", "0o700", "True"], result.stdout
    assert "is in use by another gateway process" in lines[3]
    assert_no_server_left(data_dir.resolve() / "pgdata")
