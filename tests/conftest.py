"""Shared fixtures. Tests use a real PostgreSQL (DESIGN.md, principle 9).

Database fixtures
-----------------
- ``pg_server_dsn`` (session): a server where we may ``CREATE DATABASE``:
  ``GATEWAY_TEST_DATABASE_URL`` when set, else an embedded PostgreSQL in a
  temporary directory, tuned for speed over crash safety, stopped and removed
  when the session ends.
- ``template_database`` (session): a database migrated once, the template
  every test database is copied from.
- ``database_url`` (per test): the DSN of a fresh, migrated database of its
  own (``CREATE DATABASE ... TEMPLATE``: a file copy, no migrations re-run),
  dropped after the test even if it left connections open.

They are synchronous on purpose, so sync and async tests can both use them
and no fixture has to share pytest-asyncio's event loop across scopes; the
few async set-up steps run on a private loop (``pg.run_blocking``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Harness, make_settings, running_gateway
from pg import (
    TEST_SERVER_PREFIX,
    create_database,
    drop_database,
    dsn_with_database,
    make_throwaway_server_fast,
    memory_backed_temp_root,
    migrate_database,
    remove_abandoned_test_servers,
    run_blocking,
    unique_database_name,
)

from gateway.dev.embedded_db import EmbeddedPostgres

TEST_DATABASE_URL_ENV = "GATEWAY_TEST_DATABASE_URL"


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """DSN of the session's PostgreSQL server (any database on it; the user may create more)."""
    configured = os.environ.get(TEST_DATABASE_URL_ENV)
    if configured:
        yield configured
        return
    # Our own short temporary directory rather than pytest's tmp_path_factory:
    # the unix socket path must stay short, and as root the embedded server
    # needs to traverse the parents, which pytest re-tightens to 0700 whenever
    # another session starts. In memory when possible (see the helper).
    temp_root = memory_backed_temp_root()
    remove_abandoned_test_servers(temp_root)
    data_dir = Path(tempfile.mkdtemp(prefix=TEST_SERVER_PREFIX, dir=temp_root))
    try:
        server = EmbeddedPostgres.start(data_dir)
        try:
            run_blocking(make_throwaway_server_fast(server.dsn))
            yield server.dsn
        finally:
            server.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def template_database(pg_server_dsn: str) -> Iterator[str]:
    """Name of a database holding the migrated schema, to copy test databases from."""
    name = unique_database_name("gw_template")
    run_blocking(create_database(pg_server_dsn, name))
    try:
        # The migration connection is closed before any copy is made:
        # CREATE DATABASE ... TEMPLATE refuses while the template has sessions.
        run_blocking(migrate_database(dsn_with_database(pg_server_dsn, name)))
        yield name
    finally:
        run_blocking(drop_database(pg_server_dsn, name))


@pytest.fixture
def database_url(pg_server_dsn: str, template_database: str) -> Iterator[str]:
    """DSN of a fresh migrated database for this test alone."""
    name = unique_database_name("gw_test")
    run_blocking(create_database(pg_server_dsn, name, template=template_database))
    try:
        yield dsn_with_database(pg_server_dsn, name)
    finally:
        run_blocking(drop_database(pg_server_dsn, name))


@pytest.fixture
def empty_database_url(pg_server_dsn: str) -> Iterator[str]:
    """A database with no schema at all (``database_url`` is already migrated)."""
    name = unique_database_name("gw_empty")
    run_blocking(create_database(pg_server_dsn, name))
    try:
        yield dsn_with_database(pg_server_dsn, name)
    finally:
        run_blocking(drop_database(pg_server_dsn, name))



# ---------------------------------------------------------------- systemd


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket playing pid 1, and the NOTIFY_SOCKET value for it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    # A message that never arrives must fail the test, not hang it.
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


# ---------------------------------------------------------------- the gateway in-process


@pytest.fixture
async def make_gateway(database_url: str) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Start a gateway (both apps on real sockets) with settings overrides; stopped after."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Harness:
            settings = make_settings(overrides.pop("database_url", database_url), **overrides)
            harness: Harness = await stack.enter_async_context(running_gateway(settings))
            return harness

        yield start


@pytest.fixture
async def gateway(make_gateway: Callable[..., Awaitable[Harness]]) -> Harness:
    """A gateway with the test defaults."""
    return await make_gateway()
