"""Retention: finished runs older than GATEWAY_RETENTION_DAYS go, with their events.

Removal is a series of small transactions (``store.prune_batch``): at most
``batch_events`` event rows each, then the runs left without events, with a
pause in between so ingest never waits long on a lock or on I/O. Batched
deletes rather than time-partitioned event tables: benchmarks/RESULTS.md
("Retention") has the measurement, and partitions by receive time would also
cut through runs that span a boundary, which the rule (whole finished runs,
by their end) does not allow.

Several gateway processes may run the loop; each batch takes a
transaction-level advisory lock first, so only one of them deletes at a time,
and a process that finds the lock taken leaves the work to the holder until
its next pass. Runs still pending or running (detached ones included) never
match: only ``completed``, ``error`` and ``cancelled`` runs are candidates.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import asyncpg
import attrs
import structlog

from gateway import store
from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

# One batch: a few thousand event rows, ~0.1 s of work on the benchmark machine.
BATCH_RUNS = 500
BATCH_EVENTS = 5000
# Between batches, at least PAUSE_S and PAUSE_PER_WORK times what the batch took:
# retention keeps one connection busy a fifth of the time at most, and slows
# down by itself when the database is slow. Unthrottled (0.05 s pauses) it took
# a third of the ingest rate while it ran (benchmarks/RESULTS.md, "Retention").
PAUSE_S = 0.05
PAUSE_PER_WORK = 4.0
# Between passes (and after finding another process at work).
PASS_INTERVAL_S = 60.0
SECONDS_PER_DAY = 86_400.0


@attrs.frozen
class PruneResult:
    """Runs and events removed; ``busy``: another process held the retention lock."""

    runs: int = 0
    events: int = 0
    busy: bool = False


async def cutoff_for(conn: store.Conn, days: float) -> dt.datetime:
    """Runs that finished before this moment (the database's clock) are expired."""
    now: dt.datetime = await conn.fetchval(store.DATABASE_NOW)
    return now - dt.timedelta(days=days)


async def prune(
    pool: asyncpg.Pool, days: float, *, metrics: Metrics | None = None,
    pause_s: float = PAUSE_S, pause_per_work: float = PAUSE_PER_WORK,
    batch_runs: int = BATCH_RUNS, batch_events: int = BATCH_EVENTS,
) -> PruneResult:
    """Remove finished runs older than ``days`` and their events, batch by batch."""
    runs = events = 0
    async with pool.acquire() as conn:
        cutoff = await cutoff_for(conn, days)
    while True:
        began = time.monotonic()
        async with pool.acquire() as conn:
            batch = await store.prune_batch(
                conn, cutoff, max_runs=batch_runs, max_events=batch_events)
        if not batch.locked:
            return PruneResult(runs, events, busy=True)
        runs += batch.runs
        events += batch.events
        if metrics is not None:
            metrics.retention_removed.labels("agent_run_logs").inc(batch.runs)
            metrics.retention_removed.labels("agent_run_events").inc(batch.events)
        if not batch.more:
            return PruneResult(runs, events)
        await asyncio.sleep(max(pause_s, pause_per_work * (time.monotonic() - began)))


async def count_expired(pool: asyncpg.Pool, days: float) -> tuple[int, int]:
    """What ``prune(pool, days)`` would remove now: runs, events."""
    async with pool.acquire() as conn:
        return await store.count_expired(conn, await cutoff_for(conn, days))


async def oldest_finished_age_s(pool: asyncpg.Pool) -> float | None:
    async with pool.acquire() as conn:
        return await store.oldest_finished_age_s(conn)


async def retention_loop(
    pool: asyncpg.Pool, days: float, metrics: Metrics, *,
    interval_s: float = PASS_INTERVAL_S,
) -> None:
    """The gateway's background task: a pass now and every ``interval_s``.

    With ``days`` 0 nothing is removed, but the oldest run's age is still
    exported, so a dashboard shows how far back the database goes.
    """
    metrics.retention_days.set(days)
    while True:
        try:
            if days > 0:
                began = time.monotonic()
                result = await prune(pool, days, metrics=metrics)
                if result.runs or result.events:
                    log.info("retention_pass", runs=result.runs, events=result.events,
                             busy=result.busy,
                             duration_s=round(time.monotonic() - began, 3))
            age = await oldest_finished_age_s(pool)
            metrics.retention_oldest_age.set(age or 0.0)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            metrics.db_errors.labels("retention").inc()
            log.error("retention_failed", error=repr(exc))
        await asyncio.sleep(interval_s)
