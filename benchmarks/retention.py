"""Retention design: batched deletes against dropping a day partition, under ingest.

``python -m benchmarks.retention [--events 10000000] [--days 10] [--dsn DSN]``

Fills agent_run_events with ``--events`` rows (200-byte JSON each, 1,000 per
finished run) spread over ``--days`` days, fast (``INSERT ... SELECT
generate_series``), on an embedded PostgreSQL on disk (fsync on), then:

1. **batched** — ``gateway.retention.prune`` removes the oldest day (the
   gateway's own code and batch sizes) while an ingest task writes events with
   the gateway's Store.write_events as fast as it can;
2. **partitioned** — the same rows copied into a table partitioned by
   ``received_at`` per day (that copy is what migrating a populated database
   would cost, timed), then the oldest partition detached and dropped under the
   same ingest load.

Prints one JSON line per measurement; ingest alone is measured first as the
baseline. Also prints the disk use per million events (``pg_total_relation_size``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import time
import uuid
from typing import Any

import asyncpg

from benchmarks.servers import Database
from gateway import store
from gateway.migrate import apply_migrations, default_migrations_dir
from gateway.runs import retention
from gateway.store import create_pool

EVENTS_PER_RUN = 1000
INGEST_BATCH = 500
INGEST_RUNS = 50
DATA_SQL = (  # ~200 bytes of JSON, like the soak's events
    "jsonb_build_object('type', 'token', 'i', g, 'text', repeat('x', 160))"
)


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def fill(conn: asyncpg.Connection, events: int, days: int) -> None:
    """``events`` events in finished runs, the runs' ends spread evenly over ``days`` days."""
    runs = events // EVENTS_PER_RUN
    began = time.monotonic()
    await conn.execute(f"""
        INSERT INTO agent_run_logs (id, user_id, agent_id, device_id, status, started_at,
                                    finished_at, event_count, created_at)
        SELECT (lpad(to_hex(r), 8, '0') || '-0000-4000-8000-000000000000')::uuid,
               'user-' || (r % 300), 'stream', 'device-' || (r % 300), 'completed',
               t - interval '1 minute', t, {EVENTS_PER_RUN}, t - interval '1 minute'
          FROM generate_series(1, {runs}) AS r,
               LATERAL (SELECT now() - interval '1 day' * {days} * (1 - r::float8 / {runs})
                        - interval '1 hour' AS t) AS at
    """)
    # In slices, so a 10 M fill shows progress and no single statement holds it all.
    per_slice = max(1, 200_000 // EVENTS_PER_RUN)
    for first in range(1, runs + 1, per_slice):
        last = min(runs, first + per_slice - 1)
        await conn.execute(f"""
            INSERT INTO agent_run_events (run_id, seq, data, received_at)
            SELECT r.id, g, {DATA_SQL},
                   r.finished_at - interval '1 second' * ({EVENTS_PER_RUN} - g) / 20
              FROM agent_run_logs AS r,
                   generate_series(1, {EVENTS_PER_RUN}) AS g
             WHERE r.id IN (SELECT (lpad(to_hex(n), 8, '0') || '-0000-4000-8000-000000000000')::uuid
                              FROM generate_series({first}, {last}) AS n)
        """)
    await conn.execute("VACUUM ANALYZE agent_run_logs")
    await conn.execute("VACUUM ANALYZE agent_run_events")
    size = await conn.fetchval("SELECT pg_total_relation_size('agent_run_events')")
    emit(step="fill", events=events, runs=runs, days=days,
         seconds=round(time.monotonic() - began, 1),
         events_table_bytes=size, bytes_per_million_events=round(size / events * 1e6))


class Ingest:
    """Writes events into running runs with the gateway's statement, as fast as it can."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.store = store.Store(pool)
        self.runs = [uuid.uuid4() for _ in range(INGEST_RUNS)]
        self.seq = 0
        self.latencies: list[float] = []
        self.events = 0

    async def prepare(self) -> None:
        for run_id in self.runs:
            await self.store.create_run(run_id=run_id, user_id="ingest", agent_id="stream",
                                        device_id=None, input_json="{}", scheduled_at=None)
            await self.store.dispatch_run(run_id, device_id="d", instance_id="bench")

    async def run(self, stop: asyncio.Event) -> None:
        payload = json.dumps({"type": "token", "text": "x" * 160}).encode()
        while not stop.is_set():
            self.seq += 1
            at = time.time_ns() // 1000  # the writer's received_at: µs since the epoch
            records = []
            per_run = INGEST_BATCH // INGEST_RUNS
            for run_id in self.runs:
                for k in range(per_run):
                    records.append((run_id, self.seq * per_run + k + 1, payload, at))
            last = dict.fromkeys(self.runs, self.seq * per_run + per_run)
            began = time.perf_counter()
            await self.store.write_events(records, last)
            self.latencies.append(time.perf_counter() - began)
            self.events += len(records)

    def summary(self, seconds: float) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "ingest_events_per_s": round(self.events / seconds),
            "batch_p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
            "batch_p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1) if lat else None,
            "batch_max_ms": round(lat[-1] * 1000, 1) if lat else None,
        }


async def ingest_during(
    pool: asyncpg.Pool, work: Any, *, baseline_s: float = 0.0
) -> dict[str, Any]:
    """Ingest while ``work()`` runs (or for ``baseline_s`` when work is None)."""
    ingest = Ingest(pool)
    await ingest.prepare()
    stop = asyncio.Event()
    task = asyncio.create_task(ingest.run(stop))
    began = time.monotonic()
    result: Any = None
    if work is None:
        await asyncio.sleep(baseline_s)
    else:
        result = await work()
    seconds = time.monotonic() - began
    stop.set()
    await task
    return {"seconds": round(seconds, 2), "result": result, **ingest.summary(seconds)}


async def batched(pool: asyncpg.Pool, days: int) -> None:
    async def work() -> dict[str, int]:
        # The oldest day: runs that ended more than days - 1 days ago.
        result = await retention.prune(pool, days - 1)
        return {"runs": result.runs, "events": result.events}

    measured = await ingest_during(pool, work)
    removed = measured["result"]["events"]
    emit(step="batched_delete_one_day", removed_events=removed,
         removed_runs=measured["result"]["runs"],
         delete_events_per_s=round(removed / measured["seconds"]) if measured["seconds"] else None,
         **{k: v for k, v in measured.items() if k != "result"})


async def partitioned(conn: asyncpg.Connection, pool: asyncpg.Pool, days: int) -> None:
    await conn.execute("""
        CREATE TABLE events_by_day (
            run_id uuid NOT NULL, seq integer NOT NULL, data jsonb NOT NULL,
            received_at timestamptz NOT NULL,
            PRIMARY KEY (run_id, seq, received_at)
        ) PARTITION BY RANGE (received_at)""")
    start = await conn.fetchval(
        "SELECT date_trunc('day', min(received_at)) FROM agent_run_events")
    end = await conn.fetchval("SELECT date_trunc('day', now()) + interval '2 days'")
    names = []
    day = start
    while day < end:
        name = f"events_{day:%Y%m%d}"
        names.append(name)
        until = day + dt.timedelta(days=1)
        await conn.execute(
            f"CREATE TABLE {name} PARTITION OF events_by_day "
            f"FOR VALUES FROM ('{day.isoformat()}') TO ('{until.isoformat()}')")
        day += dt.timedelta(days=1)
    began = time.monotonic()
    await conn.execute("INSERT INTO events_by_day SELECT run_id, seq, data, received_at "
                       "FROM agent_run_events")
    emit(step="partition_migration_copy", seconds=round(time.monotonic() - began, 1),
         note="rewriting the populated table: ingest would have to wait or be dual-written")
    await conn.execute("VACUUM ANALYZE events_by_day")
    # Ingest goes to the partitioned table from here on (same name, same statement).
    await conn.execute("ALTER TABLE agent_run_events RENAME TO agent_run_events_plain")
    await conn.execute("ALTER TABLE events_by_day RENAME TO agent_run_events")
    oldest = names[1]  # the first whole day
    rows = await conn.fetchval(f"SELECT count(*) FROM {oldest}")

    async def work() -> dict[str, Any]:
        async with pool.acquire() as c:
            t0 = time.monotonic()
            await c.execute(f"ALTER TABLE agent_run_events DETACH PARTITION {oldest}")
            await c.execute(f"DROP TABLE {oldest}")
            return {"drop_s": round(time.monotonic() - t0, 3)}

    measured = await ingest_during(pool, work)
    emit(step="partition_drop_one_day", removed_events=rows,
         **{k: v for k, v in measured.items() if k != "result"}, **measured["result"])


async def main_async(args: argparse.Namespace) -> None:
    db = Database.open(args.dsn)
    try:
        conn = await asyncpg.connect(db.dsn)
        try:
            await apply_migrations(conn, default_migrations_dir())
            await fill(conn, args.events, args.days)
            pool = await create_pool(db.dsn, min_size=2, max_size=4)
            try:
                baseline = await ingest_during(pool, None, baseline_s=args.baseline_s)
                emit(step="ingest_baseline", **{k: v for k, v in baseline.items() if k != "result"})
                await batched(pool, args.days)
                if not args.skip_partitioned:
                    await partitioned(conn, pool, args.days)
            finally:
                await pool.close()
        finally:
            await conn.close()
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--baseline-s", type=float, default=20.0)
    parser.add_argument("--dsn", help="a throwaway database (default: embedded, on disk)")
    parser.add_argument("--skip-partitioned", action="store_true")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
