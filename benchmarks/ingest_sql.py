"""Where PostgreSQL's time goes per event batch: ``python -m benchmarks.ingest_sql``.

One writer, as the gateway has, stores ``--batches`` batches of ``--batch``
events of ``--size`` bytes (spread over ``--runs`` runs) with each way of
writing, on an embedded PostgreSQL with fsync on (or ``--database-url``), and
prints ms per batch and events/s for each, as JSON lines:

- ``unnest``: one multi-row INSERT … unnest and the event_count UPDATE in one
  statement, one round trip (the gateway's way until issue 14);
- ``copy``: binary COPY (``copy_records_to_table``) and the UPDATE in one
  transaction, four round trips (``Store.write_events`` until ingest round four);
- ``copy_encoded``: the same, the COPY stream encoded by ``encode_event_copy``
  from the writer's rows (``Store.write_events`` now; the CPU figure includes
  turning this benchmark's rows into that shape, one tuple per event);
- each again into a copy of the table without the foreign key to
  agent_run_logs (``…_nofk``; migration 0005 dropped it), written in turns;
- ``unnest_parts``: the INSERT alone and the UPDATE alone, and ``commit``: an
  empty transaction's commit (the WAL flush every batch pays).

Variants alternate, ``--rounds`` times, and the medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import orjson
import structlog

from gateway.migrate import apply_migrations, default_migrations_dir
from gateway.store import EVENT_COLUMNS, UPDATE_EVENT_COUNTS, encode_event_copy

INSERT_EVENTS = """
WITH stored AS (
    INSERT INTO agent_run_events (run_id, seq, data, received_at)
    SELECT run_id, seq, data::jsonb, received_at
      FROM unnest($1::uuid[], $2::int[], $3::text[], $4::timestamptz[])
           AS e(run_id, seq, data, received_at)
)
UPDATE agent_run_logs AS r
   SET event_count = GREATEST(r.event_count, c.last_seq)
  FROM unnest($5::uuid[], $6::int[]) AS c(run_id, last_seq)
 WHERE r.id = c.run_id
"""
INSERT_ONLY = """
INSERT INTO agent_run_events (run_id, seq, data, received_at)
SELECT run_id, seq, data::jsonb, received_at
  FROM unnest($1::uuid[], $2::int[], $3::text[], $4::timestamptz[])
       AS e(run_id, seq, data, received_at)
"""
UPDATE_ONLY = """
UPDATE agent_run_logs AS r
   SET event_count = GREATEST(r.event_count, c.last_seq)
  FROM unnest($1::uuid[], $2::int[]) AS c(run_id, last_seq)
 WHERE r.id = c.run_id
"""
ADD_FK = """
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'agent_run_events_run_id_fkey')
    THEN ALTER TABLE agent_run_events ADD CONSTRAINT agent_run_events_run_id_fkey
         FOREIGN KEY (run_id) REFERENCES agent_run_logs (id) ON DELETE CASCADE;
    END IF;
END $$
"""

Batch = list[tuple[uuid.UUID, int, str, dt.datetime]]


class Source:
    """Batches of fresh events for ``runs`` runs, seq counting up per run."""

    def __init__(self, run_ids: list[uuid.UUID], size: int) -> None:
        self.run_ids = run_ids
        self.seq = dict.fromkeys(run_ids, 0)
        self.payload = orjson.dumps({"i": 1, "p": "x" * max(0, size - 16)}).decode()

    def batch(self, count: int) -> tuple[Batch, dict[uuid.UUID, int]]:
        now = dt.datetime.now(dt.UTC)
        out: Batch = []
        for i in range(count):
            run_id = self.run_ids[i % len(self.run_ids)]
            self.seq[run_id] += 1
            out.append((run_id, self.seq[run_id], self.payload, now))
        last = {r: self.seq[r] for r in {e[0] for e in out}}
        return out, last


async def write_unnest(conn: asyncpg.Connection, table: str, batch: Batch,
                       last: dict[uuid.UUID, int]) -> None:
    run_ids, seqs, data, received = zip(*batch, strict=True)
    sql = INSERT_EVENTS.replace("INTO agent_run_events ", f"INTO {table} ")
    await conn.execute(sql, run_ids, seqs, data, received, list(last), list(last.values()))


async def write_copy(conn: asyncpg.Connection, table: str, batch: Batch,
                     last: dict[uuid.UUID, int]) -> None:
    async with conn.transaction():
        await conn.copy_records_to_table(table, records=batch, columns=EVENT_COLUMNS)
        await conn.fetch(UPDATE_EVENT_COUNTS, list(last), list(last.values()))


async def write_copy_encoded(conn: asyncpg.Connection, table: str, batch: Batch,
                             last: dict[uuid.UUID, int]) -> None:
    at = time.time_ns() // 1000
    text = batch[0][2]
    data = text.encode()  # one payload in every row of a Source batch
    rows = [(run_id, seq, data if d is text else d.encode(), at)
            for run_id, seq, d, _at in batch]

    async def source() -> AsyncIterator[bytes]:
        yield encode_event_copy(rows)

    async with conn.transaction():
        await conn.copy_to_table(table, source=source(), columns=EVENT_COLUMNS,
                                 format="binary")
        await conn.fetch(UPDATE_EVENT_COUNTS, list(last), list(last.values()))


async def write_insert_only(conn: asyncpg.Connection, table: str, batch: Batch,
                            last: dict[uuid.UUID, int]) -> None:
    run_ids, seqs, data, received = zip(*batch, strict=True)
    sql = INSERT_ONLY.replace("INTO agent_run_events ", f"INTO {table} ")
    await conn.execute(sql, run_ids, seqs, data, received)


async def write_update_only(conn: asyncpg.Connection, table: str, batch: Batch,
                            last: dict[uuid.UUID, int]) -> None:
    await conn.execute(UPDATE_ONLY, list(last), list(last.values()))


async def commit_only(conn: asyncpg.Connection, table: str, batch: Batch,
                      last: dict[uuid.UUID, int]) -> None:
    async with conn.transaction():
        await conn.execute("SELECT txid_current()")


Writer = Callable[[asyncpg.Connection, str, Batch, dict[uuid.UUID, int]], Awaitable[None]]


async def measure(conn: asyncpg.Connection, table: str, source: Source, writer: Writer,
                  batches: int, batch_size: int) -> tuple[float, float]:
    """Seconds per batch (median), and this process's CPU seconds per event (encoding)."""
    times = []
    cpu = 0.0
    for _ in range(batches):
        batch, last = source.batch(batch_size)
        started, cpu_started = time.perf_counter(), time.process_time()
        await writer(conn, table, batch, last)
        times.append(time.perf_counter() - started)
        cpu += time.process_time() - cpu_started
    return statistics.median(times), cpu / (batches * batch_size)


async def main_async(args: argparse.Namespace, dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET TIME ZONE 'UTC'")
        await apply_migrations(conn, default_migrations_dir())
        run_ids = [uuid.uuid4() for _ in range(args.runs)]
        await conn.executemany(
            "INSERT INTO agent_run_logs (id, user_id, agent_id, status) "
            "VALUES ($1, 'bench', 'bench', 'running')", [(r,) for r in run_ids])
        source = Source(run_ids, args.size)
        variants: dict[str, Writer] = {"unnest": write_unnest, "copy": write_copy,
                                       "copy_encoded": write_copy_encoded,
                                       "insert_only": write_insert_only,
                                       "update_only": write_update_only, "commit": commit_only}
        results: dict[str, list[float]] = {}
        client_cpu: dict[str, list[float]] = {}
        # The same table twice, with and without the foreign key, written in turns:
        # both grow alike, so neither is measured on a bigger index than the other.
        await conn.execute("CREATE TABLE agent_run_events_nofk "
                           "(LIKE agent_run_events INCLUDING ALL)")
        await conn.execute(ADD_FK)  # the key migration 0005 dropped, for the comparison
        tables = {False: "agent_run_events", True: "agent_run_events_nofk"}
        for table in tables.values():
            await measure(conn, table, source, write_unnest, 5, args.batch)  # warm-up
            await measure(conn, table, source, write_copy, 5, args.batch)
        for _ in range(args.rounds):
            for name, writer in variants.items():
                for nofk in (False, True):
                    if nofk and name in ("update_only", "commit"):
                        continue
                    key = f"{name}_nofk" if nofk else name
                    wall, cpu = await measure(conn, tables[nofk], source, writer, args.batches,
                                              args.batch)
                    results.setdefault(key, []).append(wall)
                    client_cpu.setdefault(key, []).append(cpu)
        for key, values in results.items():
            per_batch = statistics.median(values)
            print(orjson.dumps({
                "variant": key, "batch": args.batch, "size": args.size,
                "ms_per_batch": round(per_batch * 1000, 2),
                "events_per_s": round(args.batch / per_batch),
                # The gateway's side of it: asyncpg encoding the batch, per event.
                "client_cpu_us_per_event": round(statistics.median(client_cpu[key]) * 1e6, 2),
                "rounds_ms": [round(v * 1000, 2) for v in values],
            }).decode(), flush=True)
    finally:
        await conn.close()


def _quiet_logs() -> None:
    """stdout is for JSON lines: the embedded database's logs go to stderr."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--database-url", default=None,
                        help="an EMPTY database (migrated here); default: embedded, fsync on")
    args = parser.parse_args()
    _quiet_logs()
    if args.database_url:
        asyncio.run(main_async(args, args.database_url))
        return
    from gateway.dev.embedded_db import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-sql-"))
    try:
        db = EmbeddedPostgres.start(tmp)
        try:
            asyncio.run(main_async(args, db.dsn))
        finally:
            db.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
