"""Applies ``migrations/NNNN_*.sql`` in order (PROTOCOL.md §3, §4).

Each file runs in its own transaction together with its row in
``schema_migrations``, so a file is either applied and recorded or neither.
Applied files are immutable: a changed checksum or a missing file stops the
runner, because the database would no longer match what the directory says
it is. Concurrent runners (several gateways starting at once, or ``migrate``
next to a serving process) queue on a session-level advisory lock, and each
file is applied exactly once.

A migration cannot contain statements that refuse to run in a transaction
(``CREATE INDEX CONCURRENTLY``, ``VACUUM``).
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Final

import asyncpg
import attrs
import structlog

log = structlog.get_logger(__name__)

# Any fixed bigint works, as long as nothing else in the database uses it as
# an advisory lock key; this one is the ASCII of "gwmigrat".
MIGRATION_LOCK_KEY: Final = 0x67776D6967726174

_FILE_NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_.-]+\.sql$")

# Created after taking the lock: concurrent CREATE TABLE IF NOT EXISTS can fail
# on the catalog's unique index.
CREATE_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text        PRIMARY KEY,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
SELECT_APPLIED: Final = "SELECT name, checksum FROM schema_migrations ORDER BY name"
INSERT_APPLIED: Final = "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)"
LOCK: Final = "SELECT pg_advisory_lock($1)"
UNLOCK: Final = "SELECT pg_advisory_unlock($1)"


class MigrationError(Exception):
    """Migrations cannot be applied; the message names the file and the reason."""


@attrs.frozen
class Migration:
    name: str
    checksum: str
    sql: str


def default_migrations_dir() -> Path:
    """The migrations shipped with this gateway.

    Installed (a wheel), they are package data: ``gateway/migrations/``. In a
    source checkout (and an editable install) they are the top-level
    ``migrations/`` next to the ``gateway`` package, the one place they are edited.
    """
    package = Path(__file__).resolve().parent
    installed = package / "migrations"
    return installed if installed.is_dir() else package.parent / "migrations"


def load_migrations(migrations_dir: Path) -> list[Migration]:
    """The migration files of ``migrations_dir``, in order; refuses misnamed or duplicate ones."""
    try:
        paths = sorted(p for p in migrations_dir.iterdir() if p.suffix == ".sql")
    except OSError as err:
        raise MigrationError(f"cannot read migrations directory {migrations_dir}: {err}") from err
    migrations: list[Migration] = []
    numbers: dict[str, str] = {}
    for path in paths:
        match = _FILE_NAME.match(path.name)
        if match is None:
            # A typo'd name would otherwise be skipped silently, or sorted
            # somewhere unexpected.
            raise MigrationError(f"migration {path.name}: file name must look like NNNN_name.sql")
        number = match.group(1)
        if number in numbers:
            raise MigrationError(
                f"migration {path.name}: number {number} is already used by {numbers[number]}"
            )
        numbers[number] = path.name
        data = path.read_bytes()
        try:
            sql = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise MigrationError(f"migration {path.name}: not UTF-8 ({err})") from err
        migrations.append(Migration(path.name, hashlib.sha256(data).hexdigest(), sql))
    return migrations


async def apply_migrations(conn: asyncpg.Connection, migrations_dir: Path) -> list[str]:
    """Apply the pending migrations of ``migrations_dir``; the names newly applied, in order."""
    migrations = load_migrations(migrations_dir)
    await conn.execute(LOCK, MIGRATION_LOCK_KEY)
    try:
        await conn.execute(CREATE_TABLE)
        applied = {row["name"]: row["checksum"] for row in await conn.fetch(SELECT_APPLIED)}
        _check_applied(applied, migrations, migrations_dir)
        newly_applied: list[str] = []
        for migration in migrations:
            if migration.name in applied:
                continue
            await _apply(conn, migration)
            newly_applied.append(migration.name)
    finally:
        await _unlock(conn)
    log.info("migrations_checked", applied=newly_applied, total=len(migrations))
    return newly_applied


async def _unlock(conn: asyncpg.Connection) -> None:
    """Release the advisory lock without masking the error that got us here."""
    if conn.is_closed():
        return  # a closed session has released its locks
    try:
        await conn.execute(UNLOCK, MIGRATION_LOCK_KEY)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as err:
        # The session keeps the lock until the caller closes the connection.
        log.warning("migration_unlock_failed", error=str(err))


def _check_applied(
    applied: dict[str, str], migrations: list[Migration], migrations_dir: Path
) -> None:
    on_disk = {m.name: m for m in migrations}
    for name, checksum in applied.items():
        migration = on_disk.get(name)
        if migration is None:
            raise MigrationError(
                f"migration {name} was applied to this database but is missing from "
                f"{migrations_dir}; restore it (applied migrations are never removed)"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"migration {name} was changed after it was applied (sha256 {checksum[:12]} "
                f"in the database, {migration.checksum[:12]} on disk); revert the edit and "
                f"add a new migration instead"
            )


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    began = time.monotonic()
    try:
        async with conn.transaction():
            # No arguments: asyncpg sends it as a simple query, so a file may
            # hold many statements.
            await conn.execute(migration.sql)
            await conn.execute(INSERT_APPLIED, migration.name, migration.checksum)
    except asyncpg.PostgresError as err:
        reason = " ".join(str(err).split())
        raise MigrationError(f"migration {migration.name} failed: {reason}") from err
    log.info(
        "migration_applied",
        name=migration.name,
        duration_ms=round((time.monotonic() - began) * 1000),
    )
