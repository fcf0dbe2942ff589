"""Run lifecycle: create, dispatch, claim on hello, events, end, cancel, device gone.

This module never imports ``gateway.device``: it is handed ``RunTargets`` (the
registry, anything that finds a connected device for an agent) and each
``RunTarget`` (anything with ids, ``closing`` and an async ``send``), so the
lifecycle can be driven by a fake sender in tests. It builds its frames with
``gateway.wire.messages``. Which runs a target feeds is tracked here, in
memory, and cleaned up by ``target_gone``. The scheduler, the cancel listener
and the event writer are modules of their own beside it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import orjson
import structlog
from aiohttp import web

from gateway.metrics import Metrics
from gateway.runs.coalesce import Coalescer
from gateway.runs.continuity import Continuity
from gateway.runs.events import DATABASE_ERRORS, EventWriter
from gateway.runs.live import LiveEvents
from gateway.runs.tracking import ActiveRun, RunTarget, Tracking, parse_run_id
from gateway.store import RunRecord, Store
from gateway.wire import codes, messages

log = structlog.get_logger(__name__)

# agent_run_logs.errors and agent_cancel.reason of a run some of whose events
# the database refused for good (PROTOCOL.md §3.4 cannot be kept for it).
RUN_ERROR_EVENTS_LOST = "events could not be stored"
# What a device hears when its agent_complete could not be written: the run
# stays tracked, and the same agent_complete may be sent again.
COMPLETE_FAILED = "the run's end could not be stored; send agent_complete again"
# What ending a run can fail with when the database, not the frame, is at fault:
# whatever the event writer retries, or the writer stopped (a drain).
STORE_ERRORS: tuple[type[Exception], ...] = (*DATABASE_ERRORS, RuntimeError)


class RunTargets(Protocol):
    """Where runs find their device: the registry of connected devices."""

    def locate_agent(
        self, user_id: str, agent_id: str, device_id: str | None
    ) -> RunTarget | None: ...


class RunRefused(Exception):
    """A device frame about a run was refused; ``code`` is unknown_run or run_finished."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RunNotFound(Exception):
    pass


class RunAlreadyFinished(Exception):
    def __init__(self, record: RunRecord) -> None:
        super().__init__(f"run {record.id} is already {record.status}")
        self.record = record


@attrs.frozen
class Gone:
    """What a connection's end did to the runs it fed."""

    failed: list[uuid.UUID] = attrs.Factory(list)
    detached: list[uuid.UUID] = attrs.Factory(list)


@attrs.define(eq=False)
class Runs:
    store: Store
    writer: EventWriter
    live: LiveEvents
    metrics: Metrics
    instance_id: str
    targets: RunTargets
    continuity: Continuity
    tracking: Tracking
    # Set when a run is created for later: the scheduler looks again.
    scheduler_wake: asyncio.Event = attrs.Factory(asyncio.Event)
    # A due run whose device is not here: hand it to the process holding it
    # (PROTOCOL.md §5; wired by the composition root). Arguments: run id, user,
    # agent, device; True when that process dispatched it.
    dispatch_elsewhere: Callable[[uuid.UUID, str, str, str | None], Awaitable[bool]] | None = None
    # The hellos of one moment claim their pending runs in one round trip.
    _claims: Coalescer[tuple[RunTarget, Sequence[str]], list[RunRecord]] = attrs.field(
        init=False)

    def __attrs_post_init__(self) -> None:
        self.writer.on_commit = self._stored
        self.writer.on_lost = self._events_lost
        self._claims = Coalescer(self._claim_batch)

    # ------------------------------------------------------------ start-up

    async def mark_orphans(self) -> int:
        """Runs this instance left running in an earlier life: detached (or failed) now."""
        return await self.continuity.sweep(codes.RUN_ERROR_GATEWAY_RESTARTED)

    # ------------------------------------------------------------ creation and dispatch

    async def create(
        self, *, user_id: str, agent_id: str, device_id: str | None, input_value: Any,
        scheduled_at: dt.datetime | None,
    ) -> RunRecord:
        record, due = await self.store.create_run(
            run_id=uuid.uuid4(), user_id=user_id, agent_id=agent_id, device_id=device_id,
            input_json=orjson.dumps(input_value).decode(), scheduled_at=scheduled_at,
        )
        self.metrics.runs.labels("pending").inc()
        log.info("run_created", run_id=str(record.id), user_id=user_id, agent_id=agent_id,
                 device_id=device_id, scheduled_at=record.scheduled_at.isoformat())
        if not due:
            self.scheduler_wake.set()
            return record
        target = self.targets.locate_agent(user_id, agent_id, device_id)
        if target is None:
            if self.dispatch_elsewhere is not None and await self.dispatch_elsewhere(
                    record.id, user_id, agent_id, device_id):
                return await self.store.get_run(record.id) or record
            return record
        dispatched = await self._dispatch(record.id, target)
        if dispatched is None:  # another process claimed it first: show what it is now
            return await self.store.get_run(record.id) or record
        return dispatched

    async def dispatch_due(self, run_id: uuid.UUID, user_id: str, agent_id: str,
                           device_id: str | None) -> None:
        """The scheduler's part: a pending run fell due; dispatch it if its device is here."""
        target = self.targets.locate_agent(user_id, agent_id, device_id)
        if target is not None:
            await self._dispatch(run_id, target)

    async def dispatch_here(self, run_id: uuid.UUID) -> RunRecord | None:
        """Another process created a due run for a device of ours: dispatch it."""
        record = await self.store.get_run(run_id)
        if record is None or record.status != "pending":
            return None
        target = self.targets.locate_agent(record.user_id, record.agent_id, record.device_id)
        if target is None:
            return None
        return await self._dispatch(run_id, target)

    async def _dispatch(self, run_id: uuid.UUID, target: RunTarget) -> RunRecord | None:
        record = await self.store.dispatch_run(
            run_id, device_id=target.device_id, instance_id=self.instance_id)
        if record is None:  # claimed or cancelled meanwhile
            return None
        await self._activate(record, target)
        return record

    async def claim_for(self, target: RunTarget, agent_ids: Sequence[str]) -> list[RunRecord]:
        """On hello, before its ack: claim the device's due pending runs (§3.3).

        The caller sends hello_ack and then ``send_claimed``. Hellos arriving
        together share one query (``Coalescer``); the batch also tracks what it
        claimed, so a hello cancelled meanwhile leaves nothing untracked.
        """
        if not agent_ids:
            return []
        return await self._claims.submit((target, agent_ids))

    async def _claim_batch(
        self, hellos: Sequence[tuple[RunTarget, Sequence[str]]]
    ) -> list[list[RunRecord]]:
        batch = await self.store.claim_pending_runs_batch(
            [(target.user_id, target.device_id, agent_ids) for target, agent_ids in hellos],
            instance_id=self.instance_id)
        out = []
        for (target, _), records in zip(hellos, batch, strict=True):
            claimed = []
            for record in records:
                if await self._activate(record, target, send=False):
                    claimed.append(record)
            out.append(claimed)
        return out

    def send_claimed(self, target: RunTarget, records: Sequence[RunRecord]) -> None:
        for record in records:
            active = self.tracking.get(record.id)
            if active is not None and active.target is target:  # not cancelled meanwhile
                self._send_run(record, active)

    def _send_run(self, record: RunRecord, active: ActiveRun) -> None:
        active.announced = True
        try:
            active.target.send(messages.agent_run(
                run_id=str(record.id), agent_id=record.agent_id, input_json=record.input))
        except Exception as exc:  # the device's own cleanup ends the run
            log.info("run_dispatch_send_failed", run_id=str(record.id), error=repr(exc))

    async def _activate(self, record: RunRecord, target: RunTarget, *, send: bool = True) -> bool:
        """A run is now running on ``target``: track it (and send agent_run)."""
        self.metrics.runs.labels("running").inc()
        if target.closing:
            # The device went while the run was being claimed: its cleanup has
            # already looked at its runs, so this one is ended here.
            await self._fail(record.id, codes.RUN_ERROR_DEVICE_DISCONNECTED)
            return False
        active = ActiveRun(record.id, record.agent_id, target, record.event_count,
                           record.event_count)
        self.tracking.add(active)
        log.info("run_dispatched", run_id=str(record.id), agent_id=record.agent_id,
                 user_id=target.user_id, device_id=target.device_id)
        if send:
            self._send_run(record, active)
        return True

    async def _fail(self, run_id: uuid.UUID, reason: str) -> None:
        failed = await self.store.fail_runs([run_id], reason)
        if failed:
            self.metrics.runs.labels("error").inc(len(failed))
        self.live.end(run_id)

    # ------------------------------------------------------------ frames from the device

    async def _refusal(self, target: RunTarget, run_id_text: str) -> RunRefused:
        """unknown_run or run_finished, the same answer for foreign and absent runs."""
        run_id = parse_run_id(run_id_text)
        if run_id is None:
            return RunRefused(codes.UNKNOWN_RUN, "no such run on this connection")
        finished = self.tracking.recently_finished(target, run_id)
        if not finished:
            status = await self.store.run_status_for_device(
                run_id, user_id=target.user_id, device_id=target.device_id)
            finished = status in ("completed", "error", "cancelled")
        if finished:
            return RunRefused(codes.RUN_FINISHED, "the run has already ended")
        return RunRefused(codes.UNKNOWN_RUN, "no such run on this connection")

    def accept_event(
        self, target: RunTarget, run_id_text: str, data: Any, seq: int | None = None
    ) -> Awaitable[None] | None:
        """Number and queue one agent_data event (checking its seq under event_acks, §1.8).

        Returns None once the event is queued (the usual case: no coroutine per
        event), else what the device's receive loop must await before its next
        frame: room in the writer's buffer, or the query behind a refusal.
        """
        active = self.tracking.owned(target, run_id_text)
        if active is None:
            return self._refuse_event(target, run_id_text)
        if target.event_acks:
            if seq is None:
                raise RunRefused(codes.BAD_FRAME, "'seq' is required under event_acks")
            if seq <= active.last_seq:
                # Sent again after a reconnect: stored once already (or about to be).
                self.metrics.events_duplicate.inc()
                if seq <= active.stored_seq:
                    self._acknowledge(active)
                return None  # otherwise the commit of the events before it acks it
            if seq != active.last_seq + 1:
                raise RunRefused(codes.BAD_FRAME,
                                 f"'seq' {seq} skips events: expected {active.last_seq + 1}")
        active.last_seq += 1
        return self.writer.put_now(active.run_id, active.last_seq, orjson.dumps(data))

    async def _refuse_event(self, target: RunTarget, run_id_text: str) -> None:
        raise await self._refusal(target, run_id_text)

    def _stored(self, last_seq_by_run: Mapping[uuid.UUID, int]) -> None:
        """A batch was committed: acks, one per run, to devices that asked for them."""
        for run_id, seq in last_seq_by_run.items():
            active = self.tracking.get(run_id)
            if active is not None and seq > active.stored_seq:
                active.stored_seq = seq
                if active.target.event_acks:
                    self._acknowledge(active)

    async def _events_lost(self, lost: Mapping[uuid.UUID, list[int]]) -> None:
        """The database refused some events of these runs for good: end each run.

        Its device is told to stop (agent_cancel) and the run is marked error,
        so nothing claims it was stored whole. A run deleted underneath us has
        nothing left to mark. Called by the writer loop; never raises.
        """
        for run_id in lost:
            await self._stop_active(run_id, RUN_ERROR_EVENTS_LOST)
            self.live.end(run_id)
        try:
            failed = await self.store.fail_runs(sorted(lost), RUN_ERROR_EVENTS_LOST)
        except Exception as exc:  # the disconnect cleanup or the next sweep ends them
            log.error("run_fail_after_lost_events_failed", error=repr(exc),
                      runs=[str(r) for r in lost])
            return
        if failed:
            self.metrics.runs.labels("error").inc(len(failed))
        log.error("runs_ended_events_lost", runs=[str(r) for r in lost],
                  failed=[str(r) for r in failed])

    def _acknowledge(self, active: ActiveRun) -> None:
        try:
            active.target.send(messages.agent_ack(run_id=str(active.run_id),
                                                  seq=active.stored_seq))
        except Exception:  # the connection is going; the device resends after its hello
            return

    async def complete(
        self, target: RunTarget, run_id_text: str, *, status: str, errors: Sequence[str],
        result: Any, has_result: bool,
    ) -> RunRecord:
        active = self.tracking.owned(target, run_id_text)
        if active is None:
            raise await self._refusal(target, run_id_text)
        # Reported finished only once every event is stored (§3.4). The run stays
        # tracked until its end is written, so a failed write still leaves it to
        # the disconnect cleanup; this device's frames wait meanwhile anyway.
        try:
            await self.writer.flush()
            record = await self.store.finish_run(
                active.run_id, status=status, errors=errors,
                result_json=orjson.dumps(result).decode() if has_result else None)
        except STORE_ERRORS as exc:
            # Not the device's fault, and not its other runs' business: the run
            # stays tracked and the device may say agent_complete again.
            self.metrics.db_errors.labels("finish_run").inc()
            log.error("run_finish_failed", run_id=str(active.run_id), error=repr(exc))
            raise RunRefused(codes.INTERNAL, COMPLETE_FAILED) from exc
        self.tracking.forget(active)
        self.live.end(active.run_id)
        if record is None:
            raise RunRefused(codes.RUN_FINISHED, "the run has already ended")
        self.metrics.runs.labels(status).inc()
        self._log_end(record)
        return record

    def _log_end(self, record: RunRecord) -> None:
        duration = None
        if record.started_at is not None and record.finished_at is not None:
            duration = round((record.finished_at - record.started_at).total_seconds(), 3)
        log.info("run_finished", run_id=str(record.id), status=record.status,
                 user_id=record.user_id, agent_id=record.agent_id, device_id=record.device_id,
                 events=record.event_count, duration_s=duration,
                 errors=orjson.loads(record.errors))

    # ------------------------------------------------------------ the device went

    async def target_gone(self, target: RunTarget, reason: str) -> Gone:
        """The runs *this* connection fed: detached for the device to resume (§1.8),
        or, with GATEWAY_RUN_RESUME_S=0, errors at once. Call within its device's turn."""
        actives = self.tracking.take(target)
        if not actives:
            return Gone()
        run_ids = sorted(active.run_id for active in actives)
        await self.writer.flush()
        if self.continuity.enabled:
            return Gone(detached=await self.continuity.detach(target, run_ids, reason))
        failed = await self.store.fail_runs(run_ids, reason)
        for run_id in run_ids:
            self.live.end(run_id)
        if failed:
            self.metrics.runs.labels("error").inc(len(failed))
            log.info("runs_failed", reason=reason, runs=[str(r) for r in failed],
                     user_id=target.user_id, device_id=target.device_id)
        return Gone(failed=failed)

    async def fail_instance_runs(self, reason: str) -> int:
        """Drain's last sweep: nothing this instance dispatched stays attached."""
        return await self.continuity.sweep(reason)

    # ------------------------------------------------------------ the internal API

    async def cancel(self, run_id: uuid.UUID, reason: str = "cancelled") -> RunRecord:
        outcome = await self.store.cancel_run(run_id)
        if outcome is None:
            record = await self.store.get_run(run_id)
            if record is None:
                raise RunNotFound(str(run_id))
            raise RunAlreadyFinished(record)
        record, previous = outcome
        self.metrics.runs.labels("cancelled").inc()
        if previous == "running":
            if run_id in self.tracking:
                await self._stop_active(run_id, reason)
            else:  # its device may be connected to another gateway process
                await self.store.notify_run_cancelled(run_id)
            await self.writer.flush()
        self.live.end(run_id)
        self._log_end(record)
        return record

    async def _stop_active(self, run_id: uuid.UUID, reason: str) -> None:
        """Stop tracking a cancelled run and tell its device."""
        active = self.tracking.get(run_id)
        if active is None:
            return
        self.tracking.forget(active)
        if not active.announced:  # claimed at hello, cancelled before its agent_run
            return
        try:
            active.target.send(messages.agent_cancel(run_id=str(run_id), reason=reason))
        except Exception as exc:
            log.info("agent_cancel_send_failed", run_id=str(run_id), error=repr(exc))

    def tracked_run_ids(self) -> list[uuid.UUID]:
        """Runs fed through this process now (checked after a deaf listener)."""
        return self.tracking.run_ids()

    async def cancelled_elsewhere(self, run_id_text: str) -> None:
        """Another gateway process cancelled a run: if our device feeds it, stop it."""
        run_id = parse_run_id(run_id_text)
        if run_id is None or run_id not in self.tracking:
            return
        await self._stop_active(run_id, "cancelled")
        await self.writer.flush()
        self.live.end(run_id)


RUNS = web.AppKey("runs", Runs)
