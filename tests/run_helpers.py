"""Helpers shared by the run tests: create and start runs, read their rows and events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
from harness import Device, Harness

AGENT = "agent-1"
JSON_COLUMNS = ("input", "result", "errors")


async def create_run(gw: Harness, **body: Any) -> dict[str, Any]:
    """POST /runs; asserts 201 and returns the answer."""
    body.setdefault("user_id", "user-1")
    body.setdefault("agent_id", AGENT)
    status, answer = await gw.api("POST", "/runs", body)
    assert status == 201, answer
    return answer


async def run_row(pool: asyncpg.Pool, run_id: str) -> dict[str, Any]:
    """The agent_run_logs row, jsonb columns decoded."""
    row = await pool.fetchrow("SELECT * FROM agent_run_logs WHERE id = $1", uuid.UUID(run_id))
    assert row is not None, f"run {run_id} is not stored"
    values = dict(row)
    for column in JSON_COLUMNS:
        if values[column] is not None:
            values[column] = orjson.loads(values[column])
    return values


async def stored_events(pool: asyncpg.Pool, run_id: str) -> list[tuple[int, Any]]:
    rows = await pool.fetch(
        "SELECT seq, data::text AS data FROM agent_run_events WHERE run_id = $1 ORDER BY seq",
        uuid.UUID(run_id))
    return [(row["seq"], orjson.loads(row["data"])) for row in rows]


async def poll_row(pool: asyncpg.Pool, run_id: str, predicate: Callable[[dict[str, Any]], bool],
                   timeout: float = 5.0) -> dict[str, Any]:
    """Bounded poll of a run's row until ``predicate`` holds; returns the row."""
    deadline = time.monotonic() + timeout
    while True:
        row = await run_row(pool, run_id)
        if predicate(row):
            return row
        assert time.monotonic() < deadline, f"run never reached the expected state: {row}"
        await asyncio.sleep(0.02)


async def start_run(gw: Harness, device: Device, **body: Any) -> str:
    """A run dispatched to ``device`` (which advertises its agent); returns its id."""
    body.setdefault("user_id", device.user_id)
    body.setdefault("device_id", device.device_id)
    answer = await create_run(gw, **body)
    assert answer["status"] == "running", answer
    frame = await device.recv_type("agent_run")
    assert frame["run_id"] == answer["run_id"], frame
    return str(answer["run_id"])


async def expect_error(device: Device, code: str, ref: str | None) -> dict[str, Any]:
    frame = await device.recv_type("error")
    assert frame["code"] == code, frame
    assert frame["ref"] == ref, frame
    assert isinstance(frame["message"], str), frame
    return frame
