"""Session continuity (PROTOCOL.md §1.8): runs outlive their connection for a window.

A connection that ends for any reason but a replacement *detaches* its running
runs (``detached_at`` and the reason, in the database). The device's next
hello, on any process sharing the database, *resumes* them within
``GATEWAY_RUN_RESUME_S``; a replacement's hello takes them over from the
connection it replaces without detaching them. What is not resumed in time is
*expired*: marked ``error`` with its reason, by whichever process looks first.
With ``GATEWAY_RUN_RESUME_S=0`` nothing is detached: runs fail at once (rev. .4).

Races between one device's connections in this process (the old one's cleanup
against the new one's hello, two hellos at once) are ordered by ``turn``: a
per-device lock that the hello holds from registration to its ack, and a
connection's cleanup holds while it detaches. Across processes the row locks
of the UPDATEs order resume, expiry and cancel: whichever commits first wins.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Sequence

import attrs
import structlog

from gateway.metrics import Metrics
from gateway.runs.coalesce import Coalescer
from gateway.runs.live import LiveEvents
from gateway.runs.tracking import ActiveRun, RunTarget, Tracking
from gateway.store import Store

log = structlog.get_logger(__name__)

# How often each process looks for detached runs whose window passed: the
# contract allows 1 s past the window's end.
EXPIRY_POLL_S = 0.5


@attrs.define(eq=False)
class _Turn:
    """One device's turn: ``async with`` holds it. A class, not an
    ``asynccontextmanager``: every hello and every cleanup takes one, and an
    async generator each was a measurable share of a reconnect storm."""

    turns: dict[tuple[str, str], _Turn]
    key: tuple[str, str]
    lock: asyncio.Lock = attrs.Factory(asyncio.Lock)
    users: int = 0  # holders and waiters; the turn is dropped at 0

    async def __aenter__(self) -> None:
        self.users += 1
        try:
            await self.lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self.lock.release()
        self._leave()

    def _leave(self) -> None:
        self.users -= 1
        if self.users == 0:
            del self.turns[self.key]


@attrs.define(eq=False)
class Continuity:
    store: Store
    tracking: Tracking
    live: LiveEvents
    metrics: Metrics
    instance_id: str
    resume_s: float
    _turns: dict[tuple[str, str], _Turn] = attrs.Factory(dict)
    # The hellos of one moment resume their runs in one round trip.
    _resumes: Coalescer[RunTarget, list[ActiveRun]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._resumes = Coalescer(self._resume_batch)

    @property
    def enabled(self) -> bool:
        return self.resume_s > 0

    def turn(self, user_id: str, device_id: str) -> _Turn:
        """One connection of a device at a time: hello (to its ack) or cleanup."""
        key = (user_id, device_id)
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = _Turn(self._turns, key)
        return turn

    # ------------------------------------------------------------ a connection ended

    async def detach(self, target: RunTarget, run_ids: Sequence[uuid.UUID],
                     reason: str) -> list[uuid.UUID]:
        """Its runs wait for the device (their events are already stored)."""
        detached = await self.store.detach_runs(run_ids, reason, instance_id=self.instance_id)
        if detached:
            self.metrics.runs_detached.inc(len(detached))
        for run_id in detached:
            log.info("run_detached", run_id=str(run_id), reason=reason,
                     user_id=target.user_id, device_id=target.device_id,
                     resume_within_s=self.resume_s)
        return detached

    async def sweep(self, reason: str) -> int:
        """Every run this instance holds attached: detached (or failed, resume 0).

        At start-up (reason "gateway restarted"), for runs our previous life
        left; at the end of a drain ("gateway shutdown"), for any left behind.
        Runs already detached keep their own time and reason.
        """
        if not self.enabled:
            count = await self.store.mark_orphaned_runs(self.instance_id, reason)
            if count:
                self.metrics.runs.labels("error").inc(count)
                log.warning("orphaned_runs_marked", count=count, reason=reason,
                            instance_id=self.instance_id)
            return count
        detached = await self.store.detach_instance_runs(self.instance_id, reason)
        if detached:
            self.metrics.runs_detached.inc(len(detached))
            log.warning("runs_detached_by_sweep", count=len(detached), reason=reason,
                        runs=[str(r) for r in detached], instance_id=self.instance_id)
        return len(detached)

    # ------------------------------------------------------------ a hello

    def hand_over(self, target: RunTarget) -> list[ActiveRun]:
        """A replacement: the runs of the device's earlier connection are ``target``'s now."""
        if not self.enabled:
            return []  # rev. .4: the replaced connection's cleanup fails them
        moved = self.tracking.hand_over(target)
        for active in moved:
            self.metrics.runs_resumed.labels("replacement").inc()
            log.info("run_handed_over", run_id=str(active.run_id), last_seq=active.last_seq,
                     connection_id=target.connection_id)
        return moved

    async def resume(self, target: RunTarget) -> list[ActiveRun]:
        """The device's detached runs, still in their window, attached to ``target``."""
        if not self.enabled:
            return []
        return await self._resumes.submit(target)

    async def _resume_batch(self, targets: Sequence[RunTarget]) -> list[list[ActiveRun]]:
        batch = await self.store.resume_runs_batch(
            [(t.user_id, t.device_id) for t in targets],
            instance_id=self.instance_id, window_s=self.resume_s)
        now = dt.datetime.now(dt.UTC)
        out = []
        for target, records in zip(targets, batch, strict=True):
            resumed = []
            for record, detached_at in records:
                # Its device already has it: no agent_run again (announced).
                active = ActiveRun(record.id, record.agent_id, target, record.event_count,
                                   record.event_count, announced=True)
                self.tracking.add(active)
                resumed.append(active)
                self.metrics.runs_resumed.labels("hello").inc()
                log.info("run_resumed", run_id=str(record.id), last_seq=record.event_count,
                         connection_id=target.connection_id, user_id=target.user_id,
                         device_id=target.device_id,
                         detached_for_s=round((now - detached_at).total_seconds(), 3))
            out.append(resumed)
        return out

    # ------------------------------------------------------------ the window passed

    async def expire_loop(self) -> None:
        """Mark ``error`` every detached run whose window passed (any process's)."""
        while True:
            for run_id, reason in await self.store.expire_detached_runs(self.resume_s):
                self.live.end(run_id)
                self.metrics.runs_expired.inc()
                self.metrics.runs.labels("error").inc()
                log.info("run_expired", run_id=str(run_id), reason=reason,
                         window_s=self.resume_s)
            await asyncio.sleep(EXPIRY_POLL_S)
