"""PostgreSQL helpers for tests: DSNs, throwaway databases, and running async set-up from sync code.

Import from test files as ``from pg import dsn_with_database`` (``tests/`` is on
``sys.path`` because ``tests/conftest.py`` lives there).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import psutil  # type: ignore[import-untyped, unused-ignore]

from gateway.dev.embedded_db import (
    LOCK_FILE,
    PID_FILE,
    EmbeddedDbError,
    acquire_lock,
    stop_server_immediately,
)
from gateway.migrate import apply_migrations, default_migrations_dir

T = TypeVar("T")

# Query parameters that name the database and would override the URL path.
_DATABASE_PARAMS = frozenset({"database", "dbname"})


def dsn_with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at ``database`` instead; everything else (host, socket, options) kept.

    Works for TCP DSNs (``postgresql://u:p@127.0.0.1:5432/db``) and unix-socket
    ones (``postgresql://postgres@/gateway?host=/some/dir``).
    """
    parts = urllib.parse.urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql:// DSN: {parts.scheme or dsn!r}")
    query = [
        (key, value)
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if key not in _DATABASE_PARAMS
    ]
    return urllib.parse.urlunsplit(
        parts._replace(
            path="/" + urllib.parse.quote(database, safe=""),
            query=urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="/"),
        )
    )


def unique_database_name(prefix: str) -> str:
    """A fresh database name: unique per call, valid unquoted, within the 63-byte limit."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(server_dsn: str, name: str, *, template: str | None = None) -> None:
    """``CREATE DATABASE name [TEMPLATE template]`` through ``server_dsn``."""
    sql = f"CREATE DATABASE {quote_ident(name)}"
    conn = await asyncpg.connect(server_dsn)
    try:
        if template is not None:
            sql += f" TEMPLATE {quote_ident(template)}"
            if conn.get_server_version().major >= 15:
                # A plain file copy: for a small template, faster to create
                # and several times faster to drop than PG 15's default
                # (WAL_LOG), which pays off on every test.
                sql += " STRATEGY FILE_COPY"
        await conn.execute(sql)
    finally:
        await conn.close()


async def drop_database(server_dsn: str, name: str) -> None:
    """Drop ``name``, disconnecting whatever a test left connected to it."""
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


async def make_throwaway_server_fast(server_dsn: str) -> None:
    """Trade crash safety for speed on a test-only server (not for a configured one).

    Without fsync, creating and dropping a database per test costs ~15 ms
    instead of ~150 ms. A lost test database on an OS crash costs nothing.
    """
    conn = await asyncpg.connect(server_dsn)
    try:
        for setting in ("fsync", "synchronous_commit", "full_page_writes", "autovacuum"):
            await conn.execute(f"ALTER SYSTEM SET {setting} = off")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def migrate_database(dsn: str) -> list[str]:
    """Apply the project's migrations to the database at ``dsn``."""
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_migrations(conn, default_migrations_dir())
    finally:
        await conn.close()


def memory_backed_temp_root() -> str | None:
    """A tmpfs for test servers' files if there is one, else None (the default temp dir).

    Copying the template database for a test takes ~6 ms there against ~100 ms
    on disk, even with fsync off: it creates a few hundred files.
    """
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


TEST_SERVER_PREFIX = "gateway-test-pg-"


def remove_abandoned_test_servers(root: str | None) -> list[Path]:
    """Stop and delete the embedded test servers of sessions that were killed.

    A session stopped by SIGKILL or a CI timeout never runs its fixture's
    teardown: its server keeps running and, on tmpfs, its ~80 MB stay in memory
    until a reboot. Only our own prefix, and only directories whose owner is
    dead (``reclaim_abandoned``): a session running alongside keeps its server.
    """
    removed = []
    for data_dir in Path(root or tempfile.gettempdir()).glob(f"{TEST_SERVER_PREFIX}*"):
        if data_dir.is_dir() and reclaim_abandoned(data_dir):
            shutil.rmtree(data_dir, ignore_errors=True)
            removed.append(data_dir)
    return removed


# A data directory whose lock file is younger may be one a live owner has
# created and not yet locked; sweeps leave it alone.
ABANDONED_MIN_AGE_S = 10.0


def reclaim_abandoned(data_dir: Path, *, min_age_s: float = ABANDONED_MIN_AGE_S) -> bool:
    """Stop the server a dead owner left on ``data_dir``; True when nobody owns it now.

    A process that owns a data directory holds its lock for as long as it
    lives, so a lock anyone can take means the owner died without stopping its
    server (SIGKILL, the OOM killer, a CI timeout). False, and nothing touched,
    when a live process holds the lock, when there is no lock file (not a data
    directory of ours), when the lock file is younger than ``min_age_s`` (an
    owner may be between creating and locking it), or when it cannot be told
    for certain which process the server is. Blocking; for sweeps of
    throwaway directories.
    """
    lock_file = data_dir / LOCK_FILE
    try:
        if time.time() - lock_file.stat().st_mtime < min_age_s:
            return False
    except OSError:
        return False
    try:
        lock_fd = acquire_lock(data_dir)
    except EmbeddedDbError:
        return False
    try:
        pgdata = data_dir / "pgdata"
        try:
            lines = (pgdata / PID_FILE).read_text().splitlines()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if not lines or not lines[0].strip().isdigit():
            return False
        state = _server_state(int(lines[0]), pgdata)
        if state == "running":
            return stop_server_immediately(pgdata)
        return state == "gone"
    finally:
        os.close(lock_fd)


def _server_state(pid: int, pgdata: Path) -> str:
    """"running" (the server of ``pgdata``), "gone" or "unknown", on evidence only.

    Unlike ``_is_postmaster_of`` this never guesses "running": it decides
    whether to signal a process, where a wrong guess would stop someone
    else's server that reused the pid.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return "gone"
        if str(pgdata) in proc.cmdline() or Path(proc.cwd()) == pgdata:
            return "running"
        return "gone"  # the pid now belongs to another process
    except psutil.NoSuchProcess:
        return "gone"
    except psutil.AccessDenied:
        return "unknown"


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a private event loop in a worker thread.

    For synchronous (session-scoped) fixtures: they then work for sync and async
    tests alike, and never touch the event loop pytest-asyncio manages for the
    main thread (``asyncio.run`` there would reset its current loop).
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
