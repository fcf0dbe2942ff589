"""Background tasks with an owner: ``Tasks.supervise`` runs a loop and restarts it when it fails.

Every long-lived task of the gateway (the event writer, the scheduler, the
cancel listener, the app-ping loop, the systemd watchdog) is started here and
nowhere else, so none can end unseen (DESIGN.md, principle 5):

- an exception other than cancellation is logged with its traceback, the loop
  waits (exponential back-off, capped) and is started again;
- a loop that keeps failing is reported by ``Tasks.unhealthy`` so /readyz can
  turn 503 while it is down;
- a loop that is alive but makes no progress (its ``stalled`` check, e.g. the
  event writer with events waiting and no commit for a while) is reported
  the same way: a stuck loop is as bad as a dead one;
- ``Tasks.close`` cancels them all and waits for them, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import attrs
import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

LoopFactory = Callable[[], Coroutine[Any, Any, None]]
StallCheck = Callable[[], bool]

RESTART_FIRST_S = 0.1
RESTART_MAX_S = 5.0
# A loop that ran this long before failing counts as having recovered: its next
# restart starts the back-off again from RESTART_FIRST_S.
STABLE_AFTER_S = 30.0


@attrs.define(eq=False)
class Supervised:
    """One supervised loop: its task, and whether it is down right now."""

    name: str
    task: asyncio.Task[None] | None = None
    failures: int = 0
    down_since: float | None = None  # loop time of the failure it has not recovered from
    stalled: StallCheck | None = None  # True while it runs but makes no progress


@attrs.define(eq=False)
class Tasks:
    """The owner of the gateway's background tasks."""

    _loops: dict[str, Supervised] = attrs.Factory(dict)
    _closed: bool = False

    def supervise(self, name: str, factory: LoopFactory, *,
                  stalled: StallCheck | None = None) -> None:
        """Run ``factory()`` until it returns; restart it whenever it raises.

        ``factory`` is called for each (re)start, so a loop begins afresh from
        its own state. A loop that returns normally is done and not restarted.
        ``stalled``, asked by ``unhealthy``, says the loop is stuck though alive.
        """
        if self._closed:
            raise RuntimeError(f"cannot start {name!r}: the gateway's tasks are closed")
        if name in self._loops:
            raise RuntimeError(f"a task named {name!r} is already running")
        supervised = Supervised(name, stalled=stalled)
        supervised.task = asyncio.get_running_loop().create_task(
            self._run(supervised, factory), name=name)
        self._loops[name] = supervised

    async def _run(self, supervised: Supervised, factory: LoopFactory) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_FIRST_S
        while True:
            started = loop.time()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                ran_s = loop.time() - started
                if ran_s >= STABLE_AFTER_S:
                    delay = RESTART_FIRST_S
                supervised.failures += 1
                if supervised.down_since is None:
                    supervised.down_since = loop.time()
                log.error("background_task_failed", task=supervised.name, error=repr(exc),
                          failures=supervised.failures, restart_in_s=delay, exc_info=exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)
            supervised.down_since = None  # restarted; a new failure marks it again
            log.info("background_task_restarted", task=supervised.name,
                     failures=supervised.failures)

    def unhealthy(self) -> list[str]:
        """Names of the loops that are down (failed, waiting to be started again) or stalled."""
        return sorted(name for name, s in self._loops.items()
                      if s.down_since is not None or (s.stalled is not None and s.stalled()))

    async def cancel(self, *, exclude: Iterable[str] = ()) -> None:
        """Cancel every task but those named in ``exclude``, and wait for each to end."""
        kept = set(exclude)
        ending = {name: s for name, s in self._loops.items() if name not in kept}
        for supervised in ending.values():
            if supervised.task is not None:
                supervised.task.cancel()
        await asyncio.gather(*(s.task for s in ending.values() if s.task is not None),
                             return_exceptions=True)
        for name in ending:
            del self._loops[name]

    async def close(self) -> None:
        """Cancel every task, wait for each to end; nothing can be started after."""
        self._closed = True
        await self.cancel()


TASKS = web.AppKey("tasks", Tasks)
