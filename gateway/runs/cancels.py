"""Runs cancelled through another gateway process, heard through PostgreSQL's LISTEN.

A cancel is committed by whichever process the service called; the process
whose device feeds the run must send ``agent_cancel``. ``Runs.cancel`` NOTIFYs
when the run is not fed here; this loop hears it everywhere and stops ours.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog

from gateway.metrics import Metrics
from gateway.runs.lifecycle import Runs
from gateway.store import RUN_CANCELLED_CHANNEL

log = structlog.get_logger(__name__)

CANCEL_QUEUE_MAX = 10_000
# How often the loop looks at its connection when no notification comes.
IDLE_CHECK_S = 5.0
# A LISTEN connection that does not close at once is dropped.
LISTENER_CLOSE_S = 1.0
RETRY_S = 1.0


async def listen_for_cancels(runs: Runs, metrics: Metrics, dsn: str) -> None:
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=CANCEL_QUEUE_MAX)

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
        try:
            queue.put_nowait(str(payload))
        except asyncio.QueueFull:
            log.warning("cancel_notification_dropped", run_id=payload)

    while True:
        try:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.add_listener(RUN_CANCELLED_CHANNEL, on_notify)
                while not conn.is_closed():
                    try:
                        async with asyncio.timeout(IDLE_CHECK_S):
                            payload = await queue.get()
                    except TimeoutError:
                        continue  # look at the connection again
                    await runs.cancelled_elsewhere(payload)
            finally:
                await conn.close(timeout=LISTENER_CLOSE_S)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            metrics.db_errors.labels("cancel_listener").inc()
            log.error("cancel_listener_failed", error=repr(exc))
            await asyncio.sleep(RETRY_S)
