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
import collections
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import orjson
import structlog
from aiohttp import web

from gateway.metrics import Metrics
from gateway.runs.events import EventWriter
from gateway.runs.live import LiveEvents
from gateway.store import RunRecord, Store
from gateway.wire import codes, messages

log = structlog.get_logger(__name__)

# Remembered per target so a late frame for a run it just ended is answered
# `run_finished` without a database round trip.
RECENTLY_FINISHED_PER_TARGET = 256


class RunTarget(Protocol):
    """A connected device a run can be dispatched to."""

    @property
    def user_id(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def connection_id(self) -> str: ...
    @property
    def closing(self) -> bool: ...
    async def send(self, frame: bytes) -> None: ...


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


@attrs.define(eq=False)
class ActiveRun:
    run_id: uuid.UUID
    agent_id: str
    target: RunTarget
    last_seq: int
    # agent_run has gone to the device. A run claimed at hello is announced only
    # after hello_ack; cancelled before that, its device hears nothing of it.
    announced: bool = False


def parse_run_id(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return None


@attrs.define(eq=False)
class Runs:
    store: Store
    writer: EventWriter
    live: LiveEvents
    metrics: Metrics
    instance_id: str
    targets: RunTargets
    _active: dict[uuid.UUID, ActiveRun] = attrs.Factory(dict)
    _active_by_text: dict[str, ActiveRun] = attrs.Factory(dict)
    _by_target: dict[str, set[uuid.UUID]] = attrs.Factory(dict)
    _finished_by_target: dict[str, collections.OrderedDict[uuid.UUID, None]] = attrs.Factory(
        dict)
    # Set when a run is created for later: the scheduler looks again.
    scheduler_wake: asyncio.Event = attrs.Factory(asyncio.Event)

    # ------------------------------------------------------------ start-up

    async def mark_orphans(self) -> int:
        """Runs this instance left running in an earlier life are errors now."""
        count = await self.store.mark_orphaned_runs(
            self.instance_id, codes.RUN_ERROR_GATEWAY_RESTARTED)
        if count:
            self.metrics.runs.labels("error").inc(count)
            log.warning("orphaned_runs_marked", count=count, instance_id=self.instance_id)
        return count

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

    async def _dispatch(self, run_id: uuid.UUID, target: RunTarget) -> RunRecord | None:
        record = await self.store.dispatch_run(
            run_id, device_id=target.device_id, instance_id=self.instance_id)
        if record is None:  # claimed or cancelled meanwhile
            return None
        await self._activate(record, target)
        return record

    async def claim_for(self, target: RunTarget, agent_ids: Sequence[str]) -> list[RunRecord]:
        """On hello, before its ack: claim the device's due pending runs (§3.3).

        The caller sends hello_ack and then ``send_claimed``.
        """
        records = await self.store.claim_pending_runs(
            user_id=target.user_id, device_id=target.device_id, agent_ids=agent_ids,
            instance_id=self.instance_id)
        claimed = []
        for record in records:
            if await self._activate(record, target, send=False):
                claimed.append(record)
        return claimed

    async def send_claimed(self, target: RunTarget, records: Sequence[RunRecord]) -> None:
        for record in records:
            active = self._active.get(record.id)
            if active is not None and active.target is target:  # not cancelled meanwhile
                await self._send_run(record, active)

    async def _send_run(self, record: RunRecord, active: ActiveRun) -> None:
        active.announced = True  # before the await: a cancel from now on must follow it
        try:
            await active.target.send(messages.agent_run(
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
        active = ActiveRun(record.id, record.agent_id, target, record.event_count)
        self._active[record.id] = active
        self._active_by_text[str(record.id)] = active
        self._by_target.setdefault(target.connection_id, set()).add(record.id)
        log.info("run_dispatched", run_id=str(record.id), agent_id=record.agent_id,
                 user_id=target.user_id, device_id=target.device_id)
        if send:
            await self._send_run(record, active)
        return True

    async def _fail(self, run_id: uuid.UUID, reason: str) -> None:
        failed = await self.store.fail_runs([run_id], reason)
        if failed:
            self.metrics.runs.labels("error").inc(len(failed))
        self.live.end(run_id)

    # ------------------------------------------------------------ frames from the device

    def _owned(self, target: RunTarget, run_id_text: str) -> ActiveRun | None:
        # Devices echo the id as agent_run gave it: a dict hit, no UUID parsing
        # per event (that was an eighth of the ingest path); other spellings of
        # the same UUID still resolve.
        active = self._active_by_text.get(run_id_text)
        if active is None:
            run_id = parse_run_id(run_id_text)
            active = self._active.get(run_id) if run_id is not None else None
        if active is None or active.target is not target:
            return None
        return active

    async def _refusal(self, target: RunTarget, run_id_text: str) -> RunRefused:
        """unknown_run or run_finished, the same answer for foreign and absent runs."""
        run_id = parse_run_id(run_id_text)
        if run_id is None:
            return RunRefused(codes.UNKNOWN_RUN, "no such run on this connection")
        recent = self._finished_by_target.get(target.connection_id)
        finished = recent is not None and run_id in recent
        if not finished:
            status = await self.store.run_status_for_device(
                run_id, user_id=target.user_id, device_id=target.device_id)
            finished = status in ("completed", "error", "cancelled")
        if finished:
            return RunRefused(codes.RUN_FINISHED, "the run has already ended")
        return RunRefused(codes.UNKNOWN_RUN, "no such run on this connection")

    async def accept_event(self, target: RunTarget, run_id_text: str, data: Any) -> int:
        """Number and queue one agent_data event; returns its seq."""
        active = self._owned(target, run_id_text)
        if active is None:
            raise await self._refusal(target, run_id_text)
        active.last_seq += 1
        seq = active.last_seq
        await self.writer.put(active.run_id, seq, orjson.dumps(data).decode())
        return seq

    async def complete(
        self, target: RunTarget, run_id_text: str, *, status: str, errors: Sequence[str],
        result: Any, has_result: bool,
    ) -> RunRecord:
        active = self._owned(target, run_id_text)
        if active is None:
            raise await self._refusal(target, run_id_text)
        # Reported finished only once every event is stored (§3.4). The run stays
        # tracked until its end is written, so a failed write still leaves it to
        # the disconnect cleanup; this device's frames wait meanwhile anyway.
        await self.writer.flush()
        record = await self.store.finish_run(
            active.run_id, status=status, errors=errors,
            result_json=orjson.dumps(result).decode() if has_result else None)
        self._forget(active)
        self.live.end(active.run_id)
        if record is None:
            raise RunRefused(codes.RUN_FINISHED, "the run has already ended")
        self.metrics.runs.labels(status).inc()
        self._log_end(record)
        return record

    def _forget(self, active: ActiveRun) -> None:
        self._active.pop(active.run_id, None)
        self._active_by_text.pop(str(active.run_id), None)
        key = active.target.connection_id
        ids = self._by_target.get(key)
        if ids is not None:
            ids.discard(active.run_id)
            if not ids:
                del self._by_target[key]
        if not active.target.closing:
            recent = self._finished_by_target.setdefault(key, collections.OrderedDict())
            recent[active.run_id] = None
            if len(recent) > RECENTLY_FINISHED_PER_TARGET:
                recent.popitem(last=False)

    def _log_end(self, record: RunRecord) -> None:
        duration = None
        if record.started_at is not None and record.finished_at is not None:
            duration = round((record.finished_at - record.started_at).total_seconds(), 3)
        log.info("run_finished", run_id=str(record.id), status=record.status,
                 user_id=record.user_id, agent_id=record.agent_id, device_id=record.device_id,
                 events=record.event_count, duration_s=duration,
                 errors=orjson.loads(record.errors))

    # ------------------------------------------------------------ the device went

    async def target_gone(self, target: RunTarget, reason: str) -> list[uuid.UUID]:
        """Mark error every run dispatched to *this* connection and still running."""
        key = target.connection_id
        self._finished_by_target.pop(key, None)
        run_ids = self._by_target.pop(key, set())
        for run_id in run_ids:
            self._active.pop(run_id, None)
            self._active_by_text.pop(str(run_id), None)
        if not run_ids:
            return []
        await self.writer.flush()
        failed = await self.store.fail_runs(sorted(run_ids), reason)
        for run_id in run_ids:
            self.live.end(run_id)
        if failed:
            self.metrics.runs.labels("error").inc(len(failed))
            log.info("runs_failed", reason=reason, runs=[str(r) for r in failed],
                     user_id=target.user_id, device_id=target.device_id)
        return failed

    async def fail_instance_runs(self, reason: str) -> int:
        """Drain's last sweep: nothing this instance dispatched stays running."""
        return await self.store.mark_orphaned_runs(self.instance_id, reason)

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
            if run_id in self._active:
                await self._stop_active(run_id, reason)
            else:  # its device may be connected to another gateway process
                await self.store.notify_run_cancelled(run_id)
            await self.writer.flush()
        self.live.end(run_id)
        self._log_end(record)
        return record

    async def _stop_active(self, run_id: uuid.UUID, reason: str) -> None:
        """Stop tracking a cancelled run and tell its device."""
        active = self._active.get(run_id)
        if active is None:
            return
        self._forget(active)
        if not active.announced:  # claimed at hello, cancelled before its agent_run
            return
        try:
            await active.target.send(messages.agent_cancel(run_id=str(run_id), reason=reason))
        except Exception as exc:
            log.info("agent_cancel_send_failed", run_id=str(run_id), error=repr(exc))

    async def cancelled_elsewhere(self, run_id_text: str) -> None:
        """Another gateway process cancelled a run: if our device feeds it, stop it."""
        run_id = parse_run_id(run_id_text)
        if run_id is None or run_id not in self._active:
            return
        await self._stop_active(run_id, "cancelled")
        await self.writer.flush()
        self.live.end(run_id)


RUNS = web.AppKey("runs", Runs)
