"""Which connection feeds which run, in this process's memory.

The database says a run is ``running`` on this instance; this says on which
connection, how far its events have come, and whether its device has heard of
it. Cleanup is exact because of it: a connection's end takes exactly its own
runs (``take``), and a replacement's hello takes over exactly the runs of the
same device (``hand_over``).
"""

from __future__ import annotations

import collections
import uuid
from typing import Protocol

import attrs

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
    @property
    def event_acks(self) -> bool: ...
    def send(self, frame: bytes) -> None: ...


@attrs.define(eq=False)
class ActiveRun:
    run_id: uuid.UUID
    agent_id: str
    target: RunTarget
    last_seq: int  # the highest seq accepted (queued for the writer)
    stored_seq: int  # the highest seq durably stored
    # agent_run has gone to the device. A run claimed at hello is announced only
    # after hello_ack; cancelled before that, its device hears nothing of it.
    announced: bool = False


def parse_run_id(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return None


@attrs.define(eq=False)
class Tracking:
    _active: dict[uuid.UUID, ActiveRun] = attrs.Factory(dict)
    _active_by_text: dict[str, ActiveRun] = attrs.Factory(dict)
    _by_target: dict[str, set[uuid.UUID]] = attrs.Factory(dict)
    _finished_by_target: dict[str, collections.OrderedDict[uuid.UUID, None]] = attrs.Factory(
        dict)
    # (user_id, device_id) → the connections of that device that feed runs: a
    # replacement finds its predecessors without looking at every connection.
    _by_device: dict[tuple[str, str], dict[str, RunTarget]] = attrs.Factory(dict)

    def __contains__(self, run_id: uuid.UUID) -> bool:
        return run_id in self._active

    def run_ids(self) -> list[uuid.UUID]:
        return list(self._active)

    def get(self, run_id: uuid.UUID) -> ActiveRun | None:
        return self._active.get(run_id)

    def add(self, active: ActiveRun) -> None:
        self._active[active.run_id] = active
        self._active_by_text[str(active.run_id)] = active
        self._attach(active.run_id, active.target)

    def _attach(self, run_id: uuid.UUID, target: RunTarget) -> None:
        self._by_target.setdefault(target.connection_id, set()).add(run_id)
        device = self._by_device.setdefault((target.user_id, target.device_id), {})
        device[target.connection_id] = target

    def _detach_target(self, target: RunTarget) -> None:
        """``target`` feeds nothing any more."""
        self._by_target.pop(target.connection_id, None)
        device_key = (target.user_id, target.device_id)
        device = self._by_device.get(device_key)
        if device is not None:
            device.pop(target.connection_id, None)
            if not device:
                del self._by_device[device_key]

    def owned(self, target: RunTarget, run_id_text: str) -> ActiveRun | None:
        """The run ``target`` feeds under that id, or None (someone else's, or nobody's)."""
        # Devices echo the id as agent_run gave it: a dict hit, no UUID parsing
        # per event; other spellings of the same UUID still resolve.
        active = self._active_by_text.get(run_id_text)
        if active is None:
            run_id = parse_run_id(run_id_text)
            active = self._active.get(run_id) if run_id is not None else None
        if active is None or active.target is not target:
            return None
        return active

    def forget(self, active: ActiveRun) -> None:
        """The run ended (or was cancelled): no connection feeds it any more."""
        self._active.pop(active.run_id, None)
        self._active_by_text.pop(str(active.run_id), None)
        key = active.target.connection_id
        ids = self._by_target.get(key)
        if ids is not None:
            ids.discard(active.run_id)
            if not ids:
                self._detach_target(active.target)
        if not active.target.closing:
            recent = self._finished_by_target.setdefault(key, collections.OrderedDict())
            recent[active.run_id] = None
            if len(recent) > RECENTLY_FINISHED_PER_TARGET:
                recent.popitem(last=False)

    def recently_finished(self, target: RunTarget, run_id: uuid.UUID) -> bool:
        recent = self._finished_by_target.get(target.connection_id)
        return recent is not None and run_id in recent

    def take(self, target: RunTarget) -> list[ActiveRun]:
        """Every run ``target`` still feeds, no longer tracked (its connection ended)."""
        key = target.connection_id
        self._finished_by_target.pop(key, None)
        taken = []
        ids = self._by_target.get(key, set())
        self._detach_target(target)
        for run_id in ids:
            active = self._active.pop(run_id, None)
            self._active_by_text.pop(str(run_id), None)
            if active is not None:
                taken.append(active)
        return taken

    def hand_over(self, target: RunTarget) -> list[ActiveRun]:
        """Runs fed by an earlier connection of ``target``'s device, now fed by ``target``."""
        earlier = [t for key, t in
                   self._by_device.get((target.user_id, target.device_id), {}).items()
                   if key != target.connection_id]
        moved = []
        for old in earlier:
            ids = self._by_target.get(old.connection_id, set())
            self._detach_target(old)
            for run_id in ids:
                active = self._active[run_id]
                active.target = target
                self._attach(run_id, target)
                moved.append(active)
        return moved
