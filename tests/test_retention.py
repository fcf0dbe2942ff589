"""Retention: old finished runs and their events go; nothing else is touched."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from harness import JWT_SECRET, SERVICE_TOKEN, Harness

from gateway import store
from gateway.config import ConfigError, load_settings
from gateway.migrate import apply_migrations, default_migrations_dir
from gateway.runs import retention
from gateway.store import create_pool

ROOT = Path(__file__).resolve().parent.parent
DAY = "interval '1 day'"
FAST: dict[str, Any] = {"pause_s": 0, "pause_per_work": 0}  # no pauses between batches


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(database_url, min_size=1, max_size=4)
    yield p
    await p.close()


async def add_run(conn: Any, *, status: str, ended_days_ago: float | None,
                  events: int, started_days_ago: float = 100.0) -> uuid.UUID:
    """A run in ``status``, ended ``ended_days_ago`` (None: never), with ``events`` events."""
    run_id = uuid.uuid4()
    await conn.execute(
        f"""INSERT INTO agent_run_logs (id, user_id, agent_id, status, started_at, finished_at,
                                        event_count, created_at)
            VALUES ($1, 'user-1', 'stream', $2, now() - {DAY} * $3::float8,
                    now() - {DAY} * $4::float8, $5, now() - {DAY} * $3::float8)""",
        run_id, status, started_days_ago, ended_days_ago, events)
    await conn.execute(
        """INSERT INTO agent_run_events (run_id, seq, data)
           SELECT $1, g, '{"n": 1}'::jsonb FROM generate_series(1, $2::int) AS g""",
        run_id, events)
    return run_id


async def remaining(conn: Any, run_ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    """Runs of ``run_ids`` still stored, with their stored event counts."""
    rows = await conn.fetch(
        """SELECT r.id, (SELECT count(*) FROM agent_run_events e WHERE e.run_id = r.id) AS n
             FROM agent_run_logs r WHERE r.id = ANY($1::uuid[])""", run_ids)
    return {row["id"]: row["n"] for row in rows}


async def mixed_runs(conn: Any) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """(expired runs, runs that must stay) for a 30-day retention."""
    expired = [
        await add_run(conn, status="completed", ended_days_ago=40, events=1200),
        await add_run(conn, status="error", ended_days_ago=31, events=3),
        await add_run(conn, status="cancelled", ended_days_ago=365, events=0),
    ]
    kept = [
        await add_run(conn, status="completed", ended_days_ago=29, events=5),
        await add_run(conn, status="error", ended_days_ago=1, events=5),
        # Unfinished, however old: pending, running (a detached run is running too).
        await add_run(conn, status="pending", ended_days_ago=None, events=0),
        await add_run(conn, status="running", ended_days_ago=None, events=7),
        # finished_at set on a run still running must not make it a candidate.
        await add_run(conn, status="running", ended_days_ago=90, events=2),
    ]
    return expired, kept


async def test_prune_removes_old_finished_runs_with_their_events_and_nothing_else(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        expired, kept = await mixed_runs(conn)
        before = await remaining(conn, kept)
        # Small batches, so a run's events take several transactions.
        result = await retention.prune(pool, 30, **FAST, batch_runs=2, batch_events=500)
        assert (result.runs, result.events, result.busy) == (3, 1203, False)
        assert await remaining(conn, expired) == {}
        assert await remaining(conn, kept) == before
        assert len(before) == len(kept)


async def test_dry_run_counts_exactly_what_prune_removes(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        expired, _ = await mixed_runs(conn)
        assert await retention.count_expired(pool, 30) == (3, 1203)
        assert len(await remaining(conn, expired)) == 3  # counting removed nothing
        assert await retention.count_expired(pool, 400) == (0, 0)


async def test_prune_leaves_the_work_to_the_process_holding_the_lock(
    pool: asyncpg.Pool, database_url: str,
) -> None:
    async with pool.acquire() as conn:
        expired, _ = await mixed_runs(conn)
    other = await asyncpg.connect(database_url)  # "another gateway process" mid-batch
    try:
        tx = other.transaction()
        await tx.start()
        assert await other.fetchval(store.TRY_RETENTION_LOCK, store.RETENTION_LOCK_KEY)
        result = await retention.prune(pool, 30, **FAST)
        assert result == retention.PruneResult(0, 0, busy=True)
        async with pool.acquire() as conn:
            assert len(await remaining(conn, expired)) == 3
        await tx.rollback()  # its batch ends: the lock goes with the transaction
    finally:
        await other.close()
    assert await retention.prune(pool, 30, **FAST) == retention.PruneResult(3, 1203)


async def test_two_pruners_at_once_remove_each_row_once(
    pool: asyncpg.Pool, database_url: str,
) -> None:
    async with pool.acquire() as conn:
        for _ in range(20):
            await add_run(conn, status="completed", ended_days_ago=45, events=300)
    second = await create_pool(database_url, min_size=1, max_size=2)
    try:
        results = await asyncio.gather(
            retention.prune(pool, 30, **FAST, batch_runs=3, batch_events=200),
            retention.prune(second, 30, **FAST, batch_runs=3, batch_events=200),
        )
    finally:
        await second.close()
    assert sum(r.runs for r in results) <= 20
    assert sum(r.events for r in results) <= 6000
    # Whoever found the lock taken stopped; the other (or a later pass) finishes.
    finish = await retention.prune(pool, 30, **FAST)
    assert sum(r.runs for r in results) + finish.runs == 20
    assert sum(r.events for r in results) + finish.events == 6000
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM agent_run_events") == 0


async def test_the_gateway_prunes_in_the_background_and_exports_it(
    make_gateway: Callable[..., Any], database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        expired, kept = await mixed_runs(conn)
        gw: Harness = await make_gateway(retention_days=30)
        removed = gw.svc.metrics.retention_removed
        age_gauge = gw.svc.metrics.retention_oldest_age
        # The pass is over once it has set the age, after removing.
        await gw.wait_for(lambda: removed.labels("agent_run_logs")._value.get() == 3
                          and age_gauge._value.get() > 0, timeout=20)
        assert await remaining(conn, expired) == {}
        assert len(await remaining(conn, kept)) == len(kept)
        async with gw.public.get("/metrics") as response:
            text = await response.text()
    finally:
        await conn.close()
    assert 'gateway_retention_rows_removed_total{table="agent_run_events"} 1203.0' in text
    assert "gateway_retention_days 30.0" in text
    age = next(float(line.split()[1]) for line in text.splitlines()
               if line.startswith("gateway_retention_oldest_run_age_seconds "))
    assert 28 * 86400 < age < 30 * 86400  # the 29-day-old run is now the oldest


async def test_retention_zero_keeps_everything(
    make_gateway: Callable[..., Any], database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        expired, _ = await mixed_runs(conn)
        gw: Harness = await make_gateway(retention_days=0)
        gauge = gw.svc.metrics.retention_oldest_age
        # The pass that would have pruned has run once it set the age.
        await gw.wait_for(lambda: gauge._value.get() > 0, timeout=20)
        assert len(await remaining(conn, expired)) == 3
        assert gauge._value.get() > 364 * 86400
    finally:
        await conn.close()


def test_retention_days_setting() -> None:
    env = {"GATEWAY_RETENTION_DAYS": "0"}
    assert load_settings(env).retention_days == 0
    assert load_settings({}).retention_days == 30
    assert load_settings({"GATEWAY_RETENTION_DAYS": "7.5"}).retention_days == 7.5
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(ConfigError, match="GATEWAY_RETENTION_DAYS"):
            load_settings({"GATEWAY_RETENTION_DAYS": bad})


# ---------------------------------------------------------------- migration


async def migrate_to_0001(conn: asyncpg.Connection, tmp_path: Path) -> None:
    """The schema as it was before retention: 0001 only."""
    before = tmp_path / "before"
    before.mkdir()
    shutil.copy(default_migrations_dir() / "0001_runs.sql", before)
    await apply_migrations(conn, before)


async def test_migration_applies_to_a_database_that_already_holds_events(
    empty_database_url: str, tmp_path: Path,
) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        await migrate_to_0001(conn, tmp_path)
        expired, kept = await mixed_runs(conn)
        applied = await apply_migrations(conn, default_migrations_dir())
        assert "0003_retention.sql" in applied
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'agent_run_logs_finished_idx'"
        ) == 1
        assert len(await remaining(conn, expired + kept)) == len(expired + kept)
    finally:
        await conn.close()
    pool = await create_pool(empty_database_url, min_size=1, max_size=2)
    try:
        assert await retention.prune(pool, 30, **FAST) == retention.PruneResult(3, 1203)
    finally:
        await pool.close()


async def test_migration_accepts_an_index_created_concurrently_beforehand(
    empty_database_url: str, tmp_path: Path,
) -> None:
    """The README's advice for huge tables: pre-create the index, then migrate."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        await migrate_to_0001(conn, tmp_path)
        await conn.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS agent_run_logs_finished_idx "
            "ON agent_run_logs (finished_at) "
            "WHERE status IN ('completed', 'error', 'cancelled')")
        assert "0003_retention.sql" in await apply_migrations(conn, default_migrations_dir())
    finally:
        await conn.close()


# ---------------------------------------------------------------- the prune command


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_DATABASE_URL": database_url,
           "GATEWAY_JWT_SECRET": JWT_SECRET, "GATEWAY_INTERNAL_TOKENS": SERVICE_TOKEN,
           "GATEWAY_LOG_LEVEL": "warning"}
    env.pop("GATEWAY_RETENTION_DAYS", None)
    return subprocess.run([sys.executable, "run_gateway.py", "prune", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


async def test_prune_command_dry_run_then_real(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        expired, kept = await mixed_runs(conn)
        dry = await asyncio.to_thread(run_cli, database_url, "--older-than", "30", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would remove 3 runs and 1203 events" in dry.stdout
        assert len(await remaining(conn, expired)) == 3
        # Default age: GATEWAY_RETENTION_DAYS (30).
        done = await asyncio.to_thread(run_cli, database_url)
        assert done.returncode == 0, done.stderr
        assert "removed 3 runs and 1203 events" in done.stdout
        assert await remaining(conn, expired) == {}
        assert len(await remaining(conn, kept)) == len(kept)
    finally:
        await conn.close()


@pytest.mark.parametrize("bad", ["0", "-3", "soon"])
def test_prune_command_refuses_a_bad_age(database_url: str, bad: str) -> None:
    done = run_cli(database_url, "--older-than", bad)
    assert done.returncode == 2
    assert "--older-than" in done.stderr


@pytest.mark.e2e
def test_retention_benchmark_runs_at_a_tiny_size() -> None:
    """The benchmark behind the design choice still runs (its figures are not checked)."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.retention", "--events", "20000", "--days", "4",
         "--baseline-s", "0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(text) for text in done.stdout.splitlines() if text.startswith("{")]
    steps = {line["step"]: line for line in lines}
    assert set(steps) == {"fill", "ingest_baseline", "batched_delete_one_day",
                          "partition_migration_copy", "partition_drop_one_day"}
    assert steps["batched_delete_one_day"]["removed_events"] > 0
    assert steps["partition_drop_one_day"]["removed_events"] > 0
