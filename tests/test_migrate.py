"""The migration runner against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from gateway.migrate import MigrationError, apply_migrations, default_migrations_dir

FIRST = "0001_runs.sql"
RUN_INDEXES = {
    "agent_run_logs_pkey",
    "agent_run_logs_pending_idx",
    "agent_run_logs_pending_due_idx",
    "agent_run_logs_user_created_idx",
    "agent_run_logs_user_status_created_idx",
    "agent_run_logs_running_instance_idx",
}


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a fresh, already migrated database."""
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A private copy of migrations/ that a test may edit."""
    target = tmp_path / "migrations"
    shutil.copytree(default_migrations_dir(), target)
    return target


async def applied_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT name, checksum, applied_at FROM schema_migrations ORDER BY name"
    )


async def test_fresh_database_gets_tables_and_indexes(empty_database_url: str) -> None:
    """A new database ends up with both tables, their indexes, and a record of the file."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        applied = await apply_migrations(conn, default_migrations_dir())

        assert applied[0] == FIRST
        for table in ("agent_run_logs", "agent_run_events", "schema_migrations"):
            assert await conn.fetchval("SELECT to_regclass($1)::text", table) == table
        indexes = {
            row["indexname"]
            for row in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'agent_run_logs'"
            )
        }
        assert indexes >= RUN_INDEXES
        rows = await applied_rows(conn)
        assert [row["name"] for row in rows] == applied
        first_bytes = (default_migrations_dir() / FIRST).read_bytes()
        assert rows[0]["checksum"] == hashlib.sha256(first_bytes).hexdigest()
    finally:
        await conn.close()


async def test_rerun_is_a_no_op(conn: asyncpg.Connection) -> None:
    """Running the migrations again applies nothing and leaves the records alone."""
    before = await applied_rows(conn)

    assert await apply_migrations(conn, default_migrations_dir()) == []
    assert await applied_rows(conn) == before


async def test_edited_applied_file_is_refused(
    conn: asyncpg.Connection, migrations_copy: Path
) -> None:
    """Editing an applied migration stops the runner with a message naming the file."""
    edited = migrations_copy / FIRST
    edited.write_bytes(edited.read_bytes() + b"\n-- an innocent-looking edit\n")
    (migrations_copy / "0999_later.sql").write_text("CREATE TABLE later (id int);")

    with pytest.raises(MigrationError, match=rf"{FIRST} was changed after it was applied"):
        await apply_migrations(conn, migrations_copy)
    # Refused before anything else ran.
    assert await conn.fetchval("SELECT to_regclass('later')") is None


async def test_missing_applied_file_is_refused(
    conn: asyncpg.Connection, migrations_copy: Path
) -> None:
    """Deleting an applied migration stops the runner with a message naming the file."""
    (migrations_copy / FIRST).unlink()

    with pytest.raises(MigrationError, match=rf"{FIRST} was applied .* but is missing"):
        await apply_migrations(conn, migrations_copy)


async def test_failing_migration_is_rolled_back_and_named(
    conn: asyncpg.Connection, migrations_copy: Path
) -> None:
    """A migration that fails leaves no trace and is reported by name; a fixed one then applies."""
    broken = migrations_copy / "0999_broken.sql"
    broken.write_text("CREATE TABLE half_done (id int);\nSELECT 1 / 0;\n")

    with pytest.raises(MigrationError, match=r"0999_broken.sql failed: division by zero"):
        await apply_migrations(conn, migrations_copy)
    assert await conn.fetchval("SELECT to_regclass('half_done')") is None
    assert "0999_broken.sql" not in [row["name"] for row in await applied_rows(conn)]

    broken.write_text("CREATE TABLE half_done (id int);\n")
    assert await apply_migrations(conn, migrations_copy) == ["0999_broken.sql"]


async def test_concurrent_runners_apply_each_file_once(
    empty_database_url: str, migrations_copy: Path
) -> None:
    """Two processes migrating at once (advisory lock): every file applied exactly once."""
    # A slow file keeps the first runner inside its lock long enough for the
    # second to arrive while it works.
    (migrations_copy / "0999_slow.sql").write_text("SELECT pg_sleep(0.2);\n")
    expected = sorted(p.name for p in migrations_copy.glob("*.sql"))  # noqa: ASYNC240
    first = await asyncpg.connect(empty_database_url)
    second = await asyncpg.connect(empty_database_url)
    try:
        results = await asyncio.gather(
            apply_migrations(first, migrations_copy),
            apply_migrations(second, migrations_copy),
        )
        rows = await applied_rows(first)
    finally:
        await first.close()
        await second.close()

    assert sorted(results, key=len) == [[], expected]
    assert [row["name"] for row in rows] == expected
