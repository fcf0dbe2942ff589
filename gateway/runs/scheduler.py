"""Scheduled runs: dispatch the ones whose ``scheduled_at`` falls due while their device is here.

One loop for the whole process: it sleeps until the next scheduled run (or
until a run is created for later) and then looks at the window of runs that
fell due since its last look. Runs that were due while no fitting device was
connected are claimed by that device's next hello instead (§3.3).
"""

from __future__ import annotations

import asyncio
import datetime as dt

import structlog

from gateway.metrics import Metrics
from gateway.runs.lifecycle import Runs

log = structlog.get_logger(__name__)

# Windows overlap by this much, so a run committed just after a window's query
# is still seen by the next one.
SCHEDULER_OVERLAP = dt.timedelta(seconds=5)
SCHEDULER_MAX_SLEEP_S = 30.0
RETRY_S = 1.0


async def run_scheduler(runs: Runs, metrics: Metrics) -> None:
    store = runs.store
    window_start = await store.now()
    while True:
        try:
            next_at = await store.next_scheduled_after(window_start)
            now = await store.now()
            sleep_s = SCHEDULER_MAX_SLEEP_S
            if next_at is not None:
                sleep_s = min(sleep_s, max(0.0, (next_at - now).total_seconds()))
            if sleep_s > 0:
                try:
                    async with asyncio.timeout(sleep_s):
                        await runs.scheduler_wake.wait()
                except TimeoutError:
                    pass
            runs.scheduler_wake.clear()
            now = await store.now()
            due = await store.pending_due_between(window_start - SCHEDULER_OVERLAP, now)
            window_start = now
            for run in due:
                await runs.dispatch_due(run.id, run.user_id, run.agent_id, run.device_id)
        except Exception as exc:
            # Kept here rather than left to the supervisor: a restart would start
            # a new window at "now" and forget the runs that fell due meanwhile.
            metrics.db_errors.labels("scheduler").inc()
            log.error("scheduler_failed", error=repr(exc))
            await asyncio.sleep(RETRY_S)
