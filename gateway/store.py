"""Every SQL statement of the gateway, as named constants, over one asyncpg pool.

This module knows SQL and nothing else: no sockets, no HTTP. JSON values are
passed to PostgreSQL as text (``$n::jsonb``) and read back as text, so a stored
event can be streamed to a reader without being decoded and encoded again.

It is the longest module because it is the one place for SQL (DESIGN.md,
principle 1), in four sections: runs and events, continuity (§1.8), retention,
cluster (§5). The next step is a ``store/`` package with one module per
section; it was left for after this round's parallel branches had merged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
import attrs
import orjson
from asyncpg.pool import PoolConnectionProxy

FINAL_STATUSES = frozenset({"completed", "error", "cancelled"})
RUN_STATUSES = frozenset({"pending", "running", *FINAL_STATUSES})

def _run_columns(table: str = "") -> str:
    """The run record's columns, JSON as text (optionally qualified by a table alias)."""
    t = f"{table}." if table else ""
    return (
        f"{t}id, {t}user_id, {t}agent_id, {t}device_id, {t}status, {t}input::text AS input, "
        f"{t}result::text AS result, {t}errors::text AS errors, {t}scheduled_at, "
        f"{t}started_at, {t}finished_at, {t}event_count, {t}gateway_instance, "
        f"{t}created_at, {t}updated_at, {t}detached_at, {t}detach_reason"
    )


RUN_COLUMNS = _run_columns()

SELECT_ONE = "SELECT 1"

# ---------------------------------------------------------------- continuity (§1.8)

# A connection ended: its running runs wait for the device to come back.
DETACH_RUNS = """
UPDATE agent_run_logs
   SET detached_at = now(), detach_reason = $2, updated_at = now()
 WHERE id = ANY($1::uuid[]) AND status = 'running' AND detached_at IS NULL
   AND gateway_instance = $3
RETURNING id
"""

# Start-up and shutdown sweeps: every attached running run of this instance.
# Runs already detached keep their detached_at and reason (a drain's survive
# the restart that follows it).
DETACH_INSTANCE_RUNS = """
UPDATE agent_run_logs
   SET detached_at = now(), detach_reason = $2, updated_at = now()
 WHERE status = 'running' AND gateway_instance = $1 AND detached_at IS NULL
RETURNING id
"""

# Hellos: the devices' detached runs still inside their window are attached to
# them, on whichever process they reached. Row locks order it against expiry
# and cancel: whichever commits first wins, the other sees the new row. One
# statement for a batch of hellos ($1 their positions, $2 users, $3 devices),
# so a reconnect storm costs one round trip per batch, not per device. Rows are
# locked in id order, so two batches touching the same runs cannot deadlock.
RESUME_RUNS_BATCH = f"""
WITH wanted AS (
    SELECT * FROM unnest($1::int[], $2::text[], $3::text[]) AS w(ord, user_id, device_id)
), detached AS (
    SELECT r.id, r.detached_at, w.ord FROM wanted AS w
      JOIN agent_run_logs AS r ON r.user_id = w.user_id AND r.device_id = w.device_id
     WHERE r.status = 'running' AND r.detached_at IS NOT NULL
       AND r.detached_at > now() - make_interval(secs => $5)
     ORDER BY r.id
       FOR UPDATE OF r
), one AS (
    SELECT DISTINCT ON (id) id, detached_at, ord FROM detached ORDER BY id, ord
)
UPDATE agent_run_logs AS r
   SET detached_at = NULL, detach_reason = NULL, gateway_instance = $4, updated_at = now()
  FROM one
 WHERE r.id = one.id
RETURNING {_run_columns("r")}, one.detached_at AS was_detached_at, one.ord AS ord
"""

# Detached runs whose window passed: errors, with the reason they were detached.
# Idempotent, so every process may run it.
EXPIRE_DETACHED_RUNS = """
UPDATE agent_run_logs
   SET status = 'error', errors = errors || jsonb_build_array(detach_reason),
       finished_at = now(), updated_at = now()
 WHERE status = 'running' AND detached_at IS NOT NULL
   AND detached_at <= now() - make_interval(secs => $1)
RETURNING id, detach_reason
"""

MARK_ORPHANED_RUNS = """
UPDATE agent_run_logs
   SET status = 'error', errors = errors || jsonb_build_array($2::text),
       finished_at = now(), updated_at = now()
 WHERE status = 'running' AND gateway_instance = $1
RETURNING id
"""

INSERT_RUN = f"""
INSERT INTO agent_run_logs (id, user_id, agent_id, device_id, input, scheduled_at)
VALUES ($1, $2, $3, $4, $5::jsonb, COALESCE($6, now()))
RETURNING {RUN_COLUMNS}, scheduled_at <= now() AS due
"""

# Dispatch one pending run (at creation, or by the scheduler) to a device.
DISPATCH_RUN = f"""
UPDATE agent_run_logs
   SET status = 'running', device_id = $2, gateway_instance = $3,
       started_at = now(), updated_at = now()
 WHERE id = $1 AND status = 'pending' AND scheduled_at <= now()
RETURNING {RUN_COLUMNS}
"""

# §3.3: claim the due pending runs of a batch of hellos: one row per (hello,
# agent) in $1 (the hello's position), $2 users, $3 devices, $4 agents. SKIP
# LOCKED keeps two gateway processes from ever dispatching the same run; a run
# two hellos of the batch could take goes to the earlier one, as one by one.
CLAIM_PENDING_RUNS_BATCH = f"""
WITH wanted AS (
    SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::text[])
                  AS w(ord, user_id, device_id, agent_id)
), candidates AS (
    SELECT r.id, w.ord, w.device_id FROM wanted AS w
      JOIN agent_run_logs AS r ON r.user_id = w.user_id AND r.agent_id = w.agent_id
     WHERE r.status = 'pending' AND (r.device_id IS NULL OR r.device_id = w.device_id)
       AND r.scheduled_at <= now()
       FOR UPDATE OF r SKIP LOCKED
), one AS (
    SELECT DISTINCT ON (id) id, ord, device_id FROM candidates ORDER BY id, ord
)
UPDATE agent_run_logs AS r
   SET status = 'running', device_id = one.device_id, gateway_instance = $5,
       started_at = now(), updated_at = now()
  FROM one
 WHERE r.id = one.id
RETURNING {_run_columns("r")}, one.ord AS ord
"""

# The scheduler's window: pending runs that fell due in (after, until].
PENDING_DUE_BETWEEN = """
SELECT id, user_id, agent_id, device_id FROM agent_run_logs
 WHERE status = 'pending' AND scheduled_at > $1 AND scheduled_at <= $2
 ORDER BY scheduled_at
"""

NEXT_SCHEDULED_AFTER = """
SELECT min(scheduled_at) FROM agent_run_logs WHERE status = 'pending' AND scheduled_at > $1
"""

DATABASE_NOW = "SELECT now()"

FINISH_RUN = f"""
UPDATE agent_run_logs
   SET status = $2, errors = errors || $3::jsonb, result = $4::jsonb,
       finished_at = now(), updated_at = now()
 WHERE id = $1 AND status = 'running'
RETURNING {RUN_COLUMNS}
"""

FAIL_RUNS = """
UPDATE agent_run_logs
   SET status = 'error', errors = errors || jsonb_build_array($2::text),
       finished_at = now(), updated_at = now()
 WHERE id = ANY($1::uuid[]) AND status = 'running'
RETURNING id
"""

CANCEL_RUN = f"""
WITH previous AS (
    SELECT id, status FROM agent_run_logs WHERE id = $1 FOR UPDATE
)
UPDATE agent_run_logs AS r
   SET status = 'cancelled', finished_at = now(), updated_at = now()
  FROM previous
 WHERE r.id = previous.id AND previous.status IN ('pending', 'running')
RETURNING {_run_columns("r")}, previous.status AS previous_status
"""

# Tells every gateway process that a run was cancelled, so the one whose
# device feeds it sends agent_cancel (the run may live on another process).
RUN_CANCELLED_CHANNEL = "gateway_run_cancelled"
NOTIFY_RUN_CANCELLED = f"SELECT pg_notify('{RUN_CANCELLED_CHANNEL}', $1)"

GET_RUN = f"SELECT {RUN_COLUMNS} FROM agent_run_logs WHERE id = $1"

LIST_RUNS = f"""
SELECT {RUN_COLUMNS} FROM agent_run_logs
 WHERE user_id = $1 AND ($2::text IS NULL OR status = $2)
 ORDER BY created_at DESC, id DESC
 LIMIT $3
"""

RUN_STATUS_FOR_DEVICE = """
SELECT status FROM agent_run_logs WHERE id = $1 AND user_id = $2 AND device_id = $3
"""

EVENTS_AFTER = """
SELECT seq, data::text AS data, received_at FROM agent_run_events
 WHERE run_id = $1 AND seq > $2
 ORDER BY seq
 LIMIT $3
"""

# At most $3 events after $2, and only those that start within $4 bytes of JSON
# text (the first one always): a page of large events is bounded by its bytes,
# not only by its rows. `more`: another event followed within the row limit.
EVENTS_PAGE = """
SELECT seq, data, received_at, more FROM (
    SELECT seq, data, received_at,
           sum(octet_length(data)) OVER (ORDER BY seq) - octet_length(data) AS before,
           lead(seq) OVER (ORDER BY seq) IS NOT NULL AS more
      FROM (SELECT seq, data::text AS data, received_at FROM agent_run_events
             WHERE run_id = $1 AND seq > $2
             ORDER BY seq
             LIMIT $3) AS page
) AS sized
 WHERE before < $4
 ORDER BY seq
"""

# A batch of events: binary COPY, then agent_run_logs.event_count kept equal to
# what is stored, in one transaction. Measured against one multi-row INSERT …
# FROM unnest(…) doing both in one round trip (python -m benchmarks.ingest_sql,
# 2,000 x 200 B, interleaved): COPY takes less of PostgreSQL's time per batch
# (23 against 28 ms, without the foreign key 0005 dropped) and less of ours to
# encode (1.75 against 2.3 µs per event), its extra round trips included.
# The UPDATE also stands in for the foreign key 0005 dropped: it must find
# every run of the batch, and holds their rows locked until the commit, so a
# run deleted meanwhile fails the batch as the key did (once per run, not per row).
EVENT_COLUMNS = ("run_id", "seq", "data", "received_at")

# An event as the writer holds it: run, seq, the data's JSON text in UTF-8, and
# received_at in microseconds since the Unix epoch (time.time_ns() // 1000).
EventRow = tuple[uuid.UUID, int, bytes, int]

# PostgreSQL's binary COPY format (the COPY page of its manual): a header, one
# tuple per row (a field count, then each field's length and bytes), a trailer.
# Encoded here in one pass over bytes the writer already holds: asyncpg's
# copy_records_to_table would encode a str to UTF-8 again and convert a
# datetime per row, and the rows would need building in its shapes first.
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no extension
COPY_TRAILER = b"\xff\xff"
# Per row: 4 fields; run_id uuid (16 bytes); then seq int4's length (the run's
# part, the same for each of its rows).
_ROW_RUN = struct.Struct(">hi16si")
# seq's value, data's length (+1: the jsonb version byte) and that byte (1).
_ROW_SEQ_DATA = struct.Struct(">iiB")
# received_at: timestamptz, 8 bytes, microseconds since 2000-01-01 UTC.
_ROW_AT = struct.Struct(">iq")
_PG_EPOCH_US = 946_684_800_000_000
_UNIX_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


async def _once(payload: bytes) -> AsyncIterator[bytes]:
    """``payload`` as COPY's source (asyncpg would take bare bytes for a file name)."""
    yield payload


def received_at(unix_us: int) -> dt.datetime:
    """An EventRow's received_at as the datetime PostgreSQL will return for it."""
    return _UNIX_EPOCH + dt.timedelta(microseconds=unix_us)


def encode_event_copy(rows: Sequence[EventRow]) -> bytes:
    """``rows`` as one binary COPY stream for EVENT_COLUMNS.

    Raises asyncpg's client-side DataError, as its own encoder did, for a seq
    outside int4 (nothing is sent).
    """
    run_parts: dict[uuid.UUID, bytes] = {}
    seq_data = _ROW_SEQ_DATA.pack
    at = _ROW_AT.pack
    parts = [COPY_HEADER]
    append = parts.append
    try:
        for run_id, seq, data, unix_us in rows:
            run_part = run_parts.get(run_id)
            if run_part is None:
                run_part = run_parts[run_id] = _ROW_RUN.pack(4, 16, run_id.bytes, 4)
            append(run_part)
            append(seq_data(seq, len(data) + 1, 1))
            append(data)
            append(at(8, unix_us - _PG_EPOCH_US))
    except struct.error as exc:
        raise asyncpg_base.DataError(f"event row cannot be encoded: {exc}") from None
    append(COPY_TRAILER)
    return b"".join(parts)
UPDATE_EVENT_COUNTS = """
UPDATE agent_run_logs AS r
   SET event_count = GREATEST(r.event_count, c.last_seq)
  FROM unnest($1::uuid[], $2::int[]) AS c(run_id, last_seq)
 WHERE r.id = c.run_id
RETURNING r.id
"""


@attrs.frozen
class RunRecord:
    """One row of agent_run_logs; JSON columns kept as the text PostgreSQL gave."""

    id: uuid.UUID
    user_id: str
    agent_id: str
    device_id: str | None
    status: str
    input: str
    result: str | None
    errors: str
    scheduled_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    event_count: int
    gateway_instance: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    detached_at: dt.datetime | None
    detach_reason: str | None

    @classmethod
    def of(cls, row: asyncpg.Record) -> RunRecord:
        return cls(**{field.name: row[field.name] for field in attrs.fields(cls)})

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    def as_json(self) -> dict[str, Any]:
        """The record as the internal API shows it (PROTOCOL.md §2.3)."""
        return {
            "run_id": str(self.id),
            "user_id": self.user_id,
            "agent_id": self.agent_id,
            "device_id": self.device_id,
            "status": self.status,
            "input": orjson.Fragment(self.input),
            "result": orjson.Fragment(self.result) if self.result is not None else None,
            "errors": orjson.Fragment(self.errors),
            "scheduled_at": _iso(self.scheduled_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "event_count": self.event_count,
            "gateway_instance": self.gateway_instance,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "detached_at": _iso(self.detached_at),
            "detach_reason": self.detach_reason,
        }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@attrs.frozen
class StoredEvent:
    seq: int
    data: str  # JSON text
    received_at: dt.datetime

    def as_json_bytes(self) -> bytes:
        return orjson.dumps(
            {"seq": self.seq, "data": orjson.Fragment(self.data),
             "received_at": self.received_at.isoformat()}
        )


@attrs.frozen
class PendingDue:
    id: uuid.UUID
    user_id: str
    agent_id: str
    device_id: str | None


@attrs.frozen
class Store:
    """Raw asyncpg SQL over a pool."""

    pool: asyncpg.Pool

    async def ping(self) -> None:
        await self.pool.fetchval(SELECT_ONE)

    async def now(self) -> dt.datetime:
        value: dt.datetime = await self.pool.fetchval(DATABASE_NOW)
        return value

    async def detach_runs(
        self, run_ids: Sequence[uuid.UUID], reason: str, *, instance_id: str
    ) -> list[uuid.UUID]:
        if not run_ids:
            return []
        rows = await self.pool.fetch(DETACH_RUNS, list(run_ids), reason, instance_id)
        return [row["id"] for row in rows]

    async def detach_instance_runs(self, instance_id: str, reason: str) -> list[uuid.UUID]:
        rows = await self.pool.fetch(DETACH_INSTANCE_RUNS, instance_id, reason)
        return [row["id"] for row in rows]

    async def resume_runs(
        self, *, user_id: str, device_id: str, instance_id: str, window_s: float
    ) -> list[tuple[RunRecord, dt.datetime]]:
        """The device's runs detached within ``window_s``, attached again; with when they
        had been detached."""
        (resumed,) = await self.resume_runs_batch([(user_id, device_id)],
                                                  instance_id=instance_id, window_s=window_s)
        return resumed

    async def resume_runs_batch(
        self, devices: Sequence[tuple[str, str]], *, instance_id: str, window_s: float
    ) -> list[list[tuple[RunRecord, dt.datetime]]]:
        """``resume_runs`` for many (user_id, device_id) at once; results in their order."""
        out: list[list[tuple[RunRecord, dt.datetime]]] = [[] for _ in devices]
        if not devices:
            return out
        rows = await self.pool.fetch(
            RESUME_RUNS_BATCH, list(range(len(devices))), [u for u, _ in devices],
            [d for _, d in devices], instance_id, window_s)
        for row in rows:
            out[row["ord"]].append((RunRecord.of(row), row["was_detached_at"]))
        for records in out:
            records.sort(key=lambda pair: pair[0].started_at or pair[0].created_at)
        return out

    async def expire_detached_runs(self, window_s: float) -> list[tuple[uuid.UUID, str]]:
        rows = await self.pool.fetch(EXPIRE_DETACHED_RUNS, window_s)
        return [(row["id"], row["detach_reason"]) for row in rows]

    async def mark_orphaned_runs(self, instance_id: str, reason: str) -> int:
        rows = await self.pool.fetch(MARK_ORPHANED_RUNS, instance_id, reason)
        return len(rows)

    async def create_run(
        self, *, run_id: uuid.UUID, user_id: str, agent_id: str, device_id: str | None,
        input_json: str, scheduled_at: dt.datetime | None,
    ) -> tuple[RunRecord, bool]:
        """Insert a pending run; returns it and whether it is already due."""
        row = await self.pool.fetchrow(
            INSERT_RUN, run_id, user_id, agent_id, device_id, input_json, scheduled_at
        )
        assert row is not None
        return RunRecord.of(row), bool(row["due"])

    async def dispatch_run(
        self, run_id: uuid.UUID, *, device_id: str, instance_id: str
    ) -> RunRecord | None:
        row = await self.pool.fetchrow(DISPATCH_RUN, run_id, device_id, instance_id)
        return RunRecord.of(row) if row is not None else None

    async def claim_pending_runs(
        self, *, user_id: str, device_id: str, agent_ids: Sequence[str], instance_id: str
    ) -> list[RunRecord]:
        (claimed,) = await self.claim_pending_runs_batch([(user_id, device_id, agent_ids)],
                                                         instance_id=instance_id)
        return claimed

    async def claim_pending_runs_batch(
        self, hellos: Sequence[tuple[str, str, Sequence[str]]], *, instance_id: str
    ) -> list[list[RunRecord]]:
        """``claim_pending_runs`` for many (user_id, device_id, agent_ids) at once."""
        out: list[list[RunRecord]] = [[] for _ in hellos]
        flat = [(i, user_id, device_id, agent_id)
                for i, (user_id, device_id, agent_ids) in enumerate(hellos)
                for agent_id in dict.fromkeys(agent_ids)]
        if not flat:
            return out
        ords, users, devices, agents = (list(column) for column in zip(*flat, strict=True))
        rows = await self.pool.fetch(CLAIM_PENDING_RUNS_BATCH, ords, users, devices, agents,
                                     instance_id)
        for row in rows:
            out[row["ord"]].append(RunRecord.of(row))
        for records in out:
            records.sort(key=lambda r: (r.scheduled_at, r.created_at))
        return out

    async def pending_due_between(
        self, after: dt.datetime, until: dt.datetime
    ) -> list[PendingDue]:
        rows = await self.pool.fetch(PENDING_DUE_BETWEEN, after, until)
        return [PendingDue(row["id"], row["user_id"], row["agent_id"], row["device_id"])
                for row in rows]

    async def next_scheduled_after(self, moment: dt.datetime) -> dt.datetime | None:
        value: dt.datetime | None = await self.pool.fetchval(NEXT_SCHEDULED_AFTER, moment)
        return value

    async def finish_run(
        self, run_id: uuid.UUID, *, status: str, errors: Sequence[str], result_json: str | None
    ) -> RunRecord | None:
        row = await self.pool.fetchrow(
            FINISH_RUN, run_id, status, orjson.dumps(list(errors)).decode(), result_json
        )
        return RunRecord.of(row) if row is not None else None

    async def fail_runs(self, run_ids: Sequence[uuid.UUID], reason: str) -> list[uuid.UUID]:
        if not run_ids:
            return []
        rows = await self.pool.fetch(FAIL_RUNS, list(run_ids), reason)
        return [row["id"] for row in rows]

    async def cancel_run(self, run_id: uuid.UUID) -> tuple[RunRecord, str] | None:
        """Cancel a pending or running run; returns it and its previous status."""
        row = await self.pool.fetchrow(CANCEL_RUN, run_id)
        if row is None:
            return None
        return RunRecord.of(row), row["previous_status"]

    async def notify_run_cancelled(self, run_id: uuid.UUID) -> None:
        await self.pool.execute(NOTIFY_RUN_CANCELLED, str(run_id))

    async def get_run(self, run_id: uuid.UUID) -> RunRecord | None:
        row = await self.pool.fetchrow(GET_RUN, run_id)
        return RunRecord.of(row) if row is not None else None

    async def list_runs(self, *, user_id: str, status: str | None, limit: int) -> list[RunRecord]:
        rows = await self.pool.fetch(LIST_RUNS, user_id, status, limit)
        return [RunRecord.of(row) for row in rows]

    async def run_status_for_device(
        self, run_id: uuid.UUID, *, user_id: str, device_id: str
    ) -> str | None:
        status: str | None = await self.pool.fetchval(
            RUN_STATUS_FOR_DEVICE, run_id, user_id, device_id
        )
        return status

    async def events_after(self, run_id: uuid.UUID, after: int, limit: int) -> list[StoredEvent]:
        rows = await self.pool.fetch(EVENTS_AFTER, run_id, after, limit)
        return [StoredEvent(row["seq"], row["data"], row["received_at"]) for row in rows]

    async def events_page(self, run_id: uuid.UUID, after: int, *, limit: int,
                          max_bytes: int) -> tuple[list[StoredEvent], bool]:
        """Events after ``after``: at most ``limit``, and at most ``max_bytes`` of JSON
        text but for the last one; and whether more may follow right away."""
        rows = await self.pool.fetch(EVENTS_PAGE, run_id, after, limit, max_bytes)
        events = [StoredEvent(row["seq"], row["data"], row["received_at"]) for row in rows]
        return events, len(rows) == limit or (bool(rows) and rows[-1]["more"])

    async def write_events(
        self, records: Sequence[EventRow], last_seq_by_run: dict[uuid.UUID, int],
    ) -> None:
        """Store a batch of events and bump the runs' event counts, atomically.

        Raises ForeignKeyViolationError, storing nothing, when a run of the batch
        is not in agent_run_logs (deleted): what the dropped foreign key raised.
        """
        if not records:
            return
        payload = encode_event_copy(records)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.copy_to_table("agent_run_events", source=_once(payload),
                                     columns=EVENT_COLUMNS, format="binary")
            found = await conn.fetch(UPDATE_EVENT_COUNTS, list(last_seq_by_run),
                                     list(last_seq_by_run.values()))
            if len(found) != len(last_seq_by_run):
                missing = set(last_seq_by_run) - {row["id"] for row in found}
                raise asyncpg.ForeignKeyViolationError(
                    f"runs not in agent_run_logs: {sorted(str(r) for r in missing)}")


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Session settings every pooled connection shares.
    await conn.execute("SET TIME ZONE 'UTC'")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a pooled connection needs on its way back to the pool: nothing more.

    asyncpg's default reset sends ``RESET ALL; UNLISTEN *; CLOSE ALL;
    pg_advisory_unlock_all()`` on every release, a second round trip for each
    single-statement use (a hello made four). Pooled connections never take
    session state (LISTEN has a connection of its own, advisory locks are
    transaction-level, cursors live in transactions), and asyncpg still rolls
    back an open transaction before this runs. It also keeps ``SET TIME ZONE``
    of ``_init_connection``, which ``RESET ALL`` undid after the first use.
    """


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection,
        reset=_keep_session, command_timeout=60,
    )
    assert pool is not None
    return pool


# ---------------------------------------------------------------- retention
#
# Finished runs older than a cutoff are removed in small transactions: a few
# thousand event rows, then the runs left without events. Every batch first
# takes a transaction-level advisory lock, so only one gateway process prunes
# at a time and the lock cannot outlive its transaction (or a dead process).

# A connection of its own or one lent by the pool.
Conn = asyncpg.Connection | PoolConnectionProxy

# Any fixed bigint nothing else uses; the ASCII of "gwretain".
RETENTION_LOCK_KEY = 0x6777726574616961
TRY_RETENTION_LOCK = "SELECT pg_try_advisory_xact_lock($1)"

# The oldest expired finished runs (agent_run_logs_finished_idx). SKIP LOCKED:
# a run being read or cancelled is simply taken in a later batch.
EXPIRED_RUNS = """
SELECT id FROM agent_run_logs
 WHERE status IN ('completed', 'error', 'cancelled') AND finished_at < $1
 ORDER BY finished_at
 LIMIT $2
   FOR UPDATE SKIP LOCKED
"""

# At most $2 events of those runs, by the primary key (run_id, seq).
DELETE_EXPIRED_EVENTS = """
DELETE FROM agent_run_events AS e
 USING (SELECT run_id, seq FROM agent_run_events
         WHERE run_id = ANY($1::uuid[])
         LIMIT $2) AS doomed
 WHERE e.run_id = doomed.run_id AND e.seq = doomed.seq
"""

# Only runs with no events left: a run never goes before its events (there is
# no foreign key since 0005: nothing else would remove them), and one small
# batch can never turn into an unbounded delete.
DELETE_EMPTIED_RUNS = """
DELETE FROM agent_run_logs AS r
 WHERE r.id = ANY($1::uuid[])
   AND NOT EXISTS (SELECT 1 FROM agent_run_events AS e WHERE e.run_id = r.id)
"""

# For --dry-run: what a prune with this cutoff would remove, counted exactly.
COUNT_EXPIRED = """
WITH expired AS (
    SELECT id FROM agent_run_logs
     WHERE status IN ('completed', 'error', 'cancelled') AND finished_at < $1
)
SELECT (SELECT count(*) FROM expired) AS runs,
       (SELECT count(*) FROM agent_run_events WHERE run_id IN (SELECT id FROM expired))
           AS events
"""

# Age of the oldest finished run still stored (NULL: none).
OLDEST_FINISHED_AGE_S = """
SELECT EXTRACT(EPOCH FROM now() - min(finished_at))::float8
  FROM agent_run_logs
 WHERE status IN ('completed', 'error', 'cancelled')
"""


@attrs.frozen
class PruneBatch:
    """What one retention transaction did; ``locked`` False: another process holds the lock."""

    locked: bool
    runs: int = 0
    events: int = 0
    more: bool = False


async def prune_batch(
    conn: Conn, cutoff: dt.datetime, *, max_runs: int, max_events: int
) -> PruneBatch:
    """One small retention transaction on ``conn``; see the section comment."""
    async with conn.transaction():
        if not await conn.fetchval(TRY_RETENTION_LOCK, RETENTION_LOCK_KEY):
            return PruneBatch(locked=False)
        run_ids = [row["id"] for row in await conn.fetch(EXPIRED_RUNS, cutoff, max_runs)]
        if not run_ids:
            return PruneBatch(locked=True)
        events = _row_count(await conn.execute(DELETE_EXPIRED_EVENTS, run_ids, max_events))
        runs = _row_count(await conn.execute(DELETE_EMPTIED_RUNS, run_ids))
    return PruneBatch(locked=True, runs=runs, events=events, more=True)


async def count_expired(conn: Conn, cutoff: dt.datetime) -> tuple[int, int]:
    """Finished runs older than ``cutoff``, and their stored events."""
    row = await conn.fetchrow(COUNT_EXPIRED, cutoff)
    assert row is not None
    return int(row["runs"]), int(row["events"])


async def oldest_finished_age_s(conn: Conn) -> float | None:
    """Seconds since the oldest stored finished run ended; None when there is none."""
    value: float | None = await conn.fetchval(OLDEST_FINISHED_AGE_S)
    return value


def _row_count(status: str) -> int:
    """The count of an asyncpg command status such as ``DELETE 42``."""
    return int(status.rsplit(" ", 1)[-1])


# ---------------------------------------------------------------- cluster (PROTOCOL.md §5)
#
# gateway_instances says which processes are alive (heartbeat younger than the
# TTL); device_presence says which process holds which device. Only rows of
# live instances count anywhere: a dead process's rows are ignored at once and
# removed by the reaper of whichever live process gets there first.

UPSERT_INSTANCE = """
INSERT INTO gateway_instances (instance_id, advertise_url, started_at, heartbeat_at)
VALUES ($1, $2, now(), now())
ON CONFLICT (instance_id) DO UPDATE
   SET advertise_url = EXCLUDED.advertise_url, started_at = now(), heartbeat_at = now()
"""

# The heartbeat; no row back means another process reaped us (a stall past the
# TTL): we register again and rewrite our presence.
HEARTBEAT_INSTANCE = """
UPDATE gateway_instances SET heartbeat_at = now() WHERE instance_id = $1 RETURNING 1
"""

SET_ADVERTISE_URL = "UPDATE gateway_instances SET advertise_url = $2 WHERE instance_id = $1"

DELETE_INSTANCE = "DELETE FROM gateway_instances WHERE instance_id = $1"

DELETE_INSTANCE_PRESENCE = "DELETE FROM device_presence WHERE instance_id = $1"

# Back after being reaped: our rows again, except for devices another process
# took meanwhile (those connections of ours are let go, see PRESENCE_LOST).
_INSERT_PRESENCE_ROWS = """
INSERT INTO device_presence (user_id, device_id, instance_id, connection_id, agent_ids,
                             connected_at)
SELECT u, d, $1, c, string_to_array(a, chr(31)), t
  FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
       AS p(u, d, c, a, t)
"""
UPSERT_PRESENCE_MANY = _INSERT_PRESENCE_ROWS + "ON CONFLICT (user_id, device_id) DO NOTHING\n"

# Connections' cleanups (batched): exactly their own rows, never a successor's.
DELETE_PRESENCE = "DELETE FROM device_presence WHERE connection_id = ANY($1::text[])"

_LIVE = """
JOIN gateway_instances AS i ON i.instance_id = p.instance_id
 AND i.heartbeat_at > now() - make_interval(secs => $2)
"""

# The user's devices on live processes other than $3, newest first.
PRESENCE_ELSEWHERE = f"""
SELECT p.user_id, p.device_id, p.instance_id, p.connection_id, p.agent_ids, p.connected_at,
       i.advertise_url
  FROM device_presence AS p {_LIVE}
 WHERE p.user_id = $1 AND p.instance_id <> $3
 ORDER BY p.connected_at DESC
"""

# At hellos (batched, a reconnect storm brings thousands): the presence rows on
# live processes of the users $1.
HELLO_PRESENCE = f"""
SELECT p.user_id, p.device_id, p.instance_id, p.connection_id, i.advertise_url
  FROM device_presence AS p {_LIVE}
 WHERE p.user_id = ANY($1::text[])
"""

# Devices up (batched): one row per device, the batch keeps the last hello of
# each (ON CONFLICT may not touch a row twice).
UPSERT_PRESENCE = _INSERT_PRESENCE_ROWS + """ON CONFLICT (user_id, device_id) DO UPDATE
   SET instance_id = EXCLUDED.instance_id, connection_id = EXCLUDED.connection_id,
       agent_ids = EXCLUDED.agent_ids, connected_at = EXCLUDED.connected_at
"""

PRESENCE_ROW_EXISTS = "SELECT 1 FROM device_presence WHERE connection_id = $1"

# The reaper: instances whose heartbeat is older than the TTL, locked so two
# reapers do not both take one (SKIP LOCKED: the other simply finds none).
DEAD_INSTANCES = """
SELECT instance_id FROM gateway_instances
 WHERE heartbeat_at <= now() - make_interval(secs => $1) AND instance_id <> $2
   FOR UPDATE SKIP LOCKED
"""

DELETE_PRESENCE_OF = "DELETE FROM device_presence WHERE instance_id = ANY($1::text[])"

DELETE_INSTANCES = "DELETE FROM gateway_instances WHERE instance_id = ANY($1::text[])"

# Run events committed: one notification per run per batch, "<instance> <run> <seq>".
EVENTS_CHANNEL = "gateway_run_events"
NOTIFY_EVENTS = f"""
SELECT pg_notify('{EVENTS_CHANNEL}', $1 || ' ' || r::text || ' ' || s::text)
  FROM unnest($2::uuid[], $3::int[]) AS n(r, s)
"""

# Devices across processes: replacements ({"op": "replace", ...}) as JSON.
DEVICES_CHANNEL = "gateway_devices"
NOTIFY_DEVICES = f"SELECT pg_notify('{DEVICES_CHANNEL}', $1)"

CANCELLED_AMONG = """
SELECT id FROM agent_run_logs WHERE id = ANY($1::uuid[]) AND status = 'cancelled'
"""

# What this process's rows add up to: their count, and the sum of 60 bits of
# each connection id's md5 (``connection_digest``): presence.py compares it
# with what it wrote, and sends its ids (PRESENCE_LOST) only when they differ.
PRESENCE_DIGEST = """
SELECT count(*) AS n,
       coalesce(sum(('x' || substr(md5(connection_id), 1, 15))::bit(60)::bigint), 0) AS total
  FROM device_presence WHERE instance_id = $1
"""


def connection_digest(connection_id: str) -> int:
    """What PRESENCE_DIGEST adds up for one row: 60 bits of its id's md5."""
    digest = hashlib.md5(connection_id.encode(), usedforsecurity=False).hexdigest()
    return int(digest[:15], 16)


# Of the connections whose rows we wrote, those whose row is gone: another
# process's hello overwrote it (a replacement we may not have been told of).
PRESENCE_LOST = """
SELECT c FROM unnest($2::text[]) AS c
EXCEPT
SELECT connection_id FROM device_presence WHERE instance_id = $1
"""

AGENT_SEPARATOR = "\x1f"


@attrs.frozen
class PresenceRow:
    """A device held by another live process, and where that process is reached."""

    user_id: str
    device_id: str
    instance_id: str
    connection_id: str
    agent_ids: tuple[str, ...]
    connected_at: dt.datetime
    advertise_url: str | None

    @classmethod
    def of(cls, row: asyncpg.Record) -> PresenceRow:
        return cls(row["user_id"], row["device_id"], row["instance_id"], row["connection_id"],
                   tuple(row["agent_ids"]), row["connected_at"], row["advertise_url"])

    def as_json(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "device_id": self.device_id,
                "agent_ids": list(self.agent_ids), "connection_id": self.connection_id,
                "connected_at": self.connected_at.isoformat()}


@attrs.frozen
class HelloPresence:
    """At a hello: how many other devices the user holds on live processes, and
    which live process (if another) holds this device now."""

    other_devices: int
    holder: PresenceRow | None


@attrs.frozen
class ClusterStore:
    """The cluster section's statements over the same pool."""

    pool: asyncpg.Pool

    async def register_instance(self, instance_id: str, advertise_url: str | None) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(UPSERT_INSTANCE, instance_id, advertise_url)
            # Rows of our previous life: those devices are not connected to us.
            await conn.execute(DELETE_INSTANCE_PRESENCE, instance_id)

    async def set_advertise_url(self, instance_id: str, url: str) -> None:
        await self.pool.execute(SET_ADVERTISE_URL, instance_id, url)

    async def heartbeat(self, instance_id: str) -> bool:
        """False: our row was gone (reaped while we stalled)."""
        return await self.pool.fetchval(HEARTBEAT_INSTANCE, instance_id) is not None

    async def reregister(
        self, instance_id: str, advertise_url: str | None,
        devices: Sequence[tuple[str, str, str, Sequence[str], dt.datetime]],
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(UPSERT_INSTANCE, instance_id, advertise_url)
            if devices:
                users, device_ids, conns, agents, times = zip(*devices, strict=True)
                await conn.execute(
                    UPSERT_PRESENCE_MANY, instance_id, list(users), list(device_ids),
                    list(conns), [AGENT_SEPARATOR.join(a) for a in agents], list(times))

    async def unregister_instance(self, instance_id: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(DELETE_INSTANCE_PRESENCE, instance_id)
            await conn.execute(DELETE_INSTANCE, instance_id)

    async def devices_up(
        self, instance_id: str, rows: Sequence[tuple[str, str, str, Sequence[str], dt.datetime]],
    ) -> None:
        """Presence rows (user, device, connection, agents, connected at) of ours."""
        last = {(row[0], row[1]): row for row in rows}
        if not last:
            return
        users, device_ids, conns, agents, times = zip(*last.values(), strict=True)
        await self.pool.execute(
            UPSERT_PRESENCE, instance_id, list(users), list(device_ids), list(conns),
            [AGENT_SEPARATOR.join(a) for a in agents], list(times))

    async def devices_down(self, connection_ids: Sequence[str]) -> None:
        await self.pool.execute(DELETE_PRESENCE, list(connection_ids))

    async def presence_exists(self, connection_id: str) -> bool:
        return await self.pool.fetchval(PRESENCE_ROW_EXISTS, connection_id) is not None

    async def elsewhere(self, user_id: str, *, instance_id: str,
                        ttl_s: float) -> list[PresenceRow]:
        rows = await self.pool.fetch(PRESENCE_ELSEWHERE, user_id, ttl_s, instance_id)
        return [PresenceRow.of(row) for row in rows]

    async def at_hellos(self, hellos: Sequence[tuple[str, str]], *, instance_id: str,
                        ttl_s: float) -> list[HelloPresence]:
        """For each (user, device) hello: the user's other devices on live
        processes, and which other live process holds this device now."""
        if not hellos:
            return []
        rows_of: dict[str, list[asyncpg.Record]] = {user: [] for user, _ in hellos}
        for row in await self.pool.fetch(HELLO_PRESENCE, list(rows_of), ttl_s):
            rows_of[row["user_id"]].append(row)
        out = []
        for user_id, device_id in hellos:
            rows = rows_of[user_id]
            others = sum(1 for row in rows if row["device_id"] != device_id)
            holder = next((row for row in rows if row["device_id"] == device_id
                           and row["instance_id"] != instance_id), None)
            out.append(HelloPresence(others, None if holder is None else PresenceRow(
                user_id, device_id, holder["instance_id"], holder["connection_id"], (),
                dt.datetime.now(dt.UTC), holder["advertise_url"])))
        return out

    async def reap(
        self, *, instance_id: str, ttl_s: float, reason: str, detach: bool,
    ) -> tuple[list[str], list[uuid.UUID]]:
        """Dead instances: presence removed, running runs detached (or failed when
        ``detach`` is False), rows deleted. Returns the instances and the runs."""
        async with self.pool.acquire() as conn, conn.transaction():
            dead = [row["instance_id"] for row in await conn.fetch(
                DEAD_INSTANCES, ttl_s, instance_id)]
            if not dead:
                return [], []
            await conn.execute(DELETE_PRESENCE_OF, dead)
            runs: list[uuid.UUID] = []
            for gone in dead:
                statement = DETACH_INSTANCE_RUNS if detach else MARK_ORPHANED_RUNS
                runs += [row["id"] for row in await conn.fetch(statement, gone, reason)]
            await conn.execute(DELETE_INSTANCES, dead)
        return dead, runs

    async def presence_digest(self, instance_id: str) -> tuple[int, int]:
        """How many rows are this process's, and their ids' ``connection_digest`` sum."""
        row = await self.pool.fetchrow(PRESENCE_DIGEST, instance_id)
        assert row is not None  # an aggregate always answers one row
        return int(row["n"]), int(row["total"])

    async def presence_lost(self, instance_id: str, connection_ids: Sequence[str]) -> set[str]:
        if not connection_ids:
            return set()
        rows = await self.pool.fetch(PRESENCE_LOST, instance_id, list(connection_ids))
        return {row["c"] for row in rows}

    async def notify_events(self, instance_id: str, last_seq_by_run: dict[uuid.UUID, int]) -> None:
        await self.pool.execute(NOTIFY_EVENTS, instance_id, list(last_seq_by_run),
                                list(last_seq_by_run.values()))

    async def notify_devices(self, payload: str) -> None:
        await self.pool.execute(NOTIFY_DEVICES, payload)

    async def cancelled_among(self, run_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        if not run_ids:
            return []
        rows = await self.pool.fetch(CANCELLED_AMONG, list(run_ids))
        return [row["id"] for row in rows]
