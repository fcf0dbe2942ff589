"""Where PostgreSQL's time goes per event batch: ``python -m benchmarks.ingest_sql``.

One writer, as the gateway has, stores ``--batches`` batches of ``--batch``
events of ``--size`` bytes (spread over ``--runs`` runs) with each way of
writing, on an embedded PostgreSQL with fsync on (or ``--database-url``), and
prints ms per batch and events/s for each, as JSON lines:

- ``unnest``: the gateway's ``INSERT_EVENTS`` (one multi-row INSERT … unnest
  and the event_count UPDATE in one statement, one round trip);
- ``copy``: binary COPY (``copy_records_to_table``) and the UPDATE in one
  transaction (four round trips);
- each again with the foreign key to agent_run_logs dropped (``…_nofk``);
- ``unnest_parts``: the INSERT alone and the UPDATE alone, and ``commit``: an
  empty transaction's commit (the WAL flush every batch pays).

Variants alternate, ``--rounds`` times, and the medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import orjson

from gateway.migrate import apply_migrations, default_migrations_dir
from gateway.store import INSERT_EVENTS

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
DROP_FK = "ALTER TABLE agent_run_events DROP CONSTRAINT IF EXISTS agent_run_events_run_id_fkey"

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


async def write_unnest(conn: asyncpg.Connection, batch: Batch,
                       last: dict[uuid.UUID, int]) -> None:
    run_ids, seqs, data, received = zip(*batch, strict=True)
    await conn.execute(INSERT_EVENTS, run_ids, seqs, data, received, list(last),
                       list(last.values()))


async def write_copy(conn: asyncpg.Connection, batch: Batch, last: dict[uuid.UUID, int]) -> None:
    async with conn.transaction():
        await conn.copy_records_to_table(
            "agent_run_events", records=batch, columns=["run_id", "seq", "data", "received_at"])
        await conn.execute(UPDATE_ONLY, list(last), list(last.values()))


async def write_insert_only(conn: asyncpg.Connection, batch: Batch,
                            last: dict[uuid.UUID, int]) -> None:
    run_ids, seqs, data, received = zip(*batch, strict=True)
    await conn.execute(INSERT_ONLY, run_ids, seqs, data, received)


async def write_update_only(conn: asyncpg.Connection, batch: Batch,
                            last: dict[uuid.UUID, int]) -> None:
    await conn.execute(UPDATE_ONLY, list(last), list(last.values()))


async def commit_only(conn: asyncpg.Connection, batch: Batch, last: dict[uuid.UUID, int]) -> None:
    async with conn.transaction():
        await conn.execute("SELECT txid_current()")


Writer = Callable[[asyncpg.Connection, Batch, dict[uuid.UUID, int]], Awaitable[None]]


async def measure(conn: asyncpg.Connection, source: Source, writer: Writer, batches: int,
                  batch_size: int) -> float:
    """Seconds per batch (median)."""
    times = []
    for _ in range(batches):
        batch, last = source.batch(batch_size)
        started = time.perf_counter()
        await writer(conn, batch, last)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


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
                                       "insert_only": write_insert_only,
                                       "update_only": write_update_only, "commit": commit_only}
        results: dict[str, list[float]] = {}
        for phase in ("fk", "nofk"):
            if phase == "nofk":
                await conn.execute(DROP_FK)
            await measure(conn, source, write_unnest, 5, args.batch)  # warm-up
            for _ in range(args.rounds):
                for name, writer in variants.items():
                    if phase == "nofk" and name in ("update_only", "commit"):
                        continue
                    key = name if phase == "fk" else f"{name}_nofk"
                    results.setdefault(key, []).append(
                        await measure(conn, source, writer, args.batches, args.batch))
        for key, values in results.items():
            per_batch = statistics.median(values)
            print(orjson.dumps({
                "variant": key, "batch": args.batch, "size": args.size,
                "ms_per_batch": round(per_batch * 1000, 2),
                "events_per_s": round(args.batch / per_batch),
                "rounds_ms": [round(v * 1000, 2) for v in values],
            }).decode(), flush=True)
    finally:
        await conn.close()


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
