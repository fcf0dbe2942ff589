"""One database round trip for many callers: requests made in the same event-loop
tick (or while every slot is busy) are answered by one batch.

A reconnect storm brings thousands of hellos a second, each of which must claim
pending runs and resume detached ones (§3.3, §1.8) and look up and write its
presence (§5), and a mass disconnect as many cleanups. One query per hello makes
the pool the bottleneck; one query per batch does not, and the batch grows by
itself as the database slows: whatever arrives while ``slots`` batches are in
flight waits for the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import attrs

Item = TypeVar("Item")
Result = TypeVar("Result")


@attrs.define(eq=False)
class Coalescer(Generic[Item, Result]):
    """``await submit(item)`` → ``batch([items…])[i]``; ``batch`` returns one result per item.

    The batch runs in a task of its own (held in ``_batches`` until it ends),
    not in any caller: a caller cancelled while its batch is in flight still
    waits for it, so what the batch did for that caller (runs claimed, runs
    resumed and tracked) is done before the caller's cleanup looks.
    """

    batch: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]]
    slots: int = 2
    batches: int = attrs.field(default=0, init=False)  # run so far (tests, benchmarks)
    _waiting: list[tuple[Item, asyncio.Future[Result]]] = attrs.field(factory=list, init=False)
    _batches: set[asyncio.Task[None]] = attrs.field(factory=set, init=False)
    _gate: asyncio.Semaphore | None = attrs.field(default=None, init=False)

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if len(self._waiting) == 1:  # the first since the last batch was taken: lead one
            task = asyncio.ensure_future(self._lead())
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if not future.done():
                await asyncio.wait([future])
            raise

    async def _lead(self) -> None:
        if self._gate is None:  # created in the loop that uses it
            self._gate = asyncio.Semaphore(self.slots)
        async with self._gate:
            await asyncio.sleep(0)  # the rest of this tick's callers join
            taken, self._waiting = self._waiting, []
            self.batches += 1
            try:
                results = await self.batch([item for item, _ in taken])
                if len(results) != len(taken):
                    raise RuntimeError(f"batch gave {len(results)} results for {len(taken)}")
            except Exception as exc:
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                return
            except BaseException:  # cancelled (shutdown): nobody may wait forever
                for _, future in taken:
                    if not future.done():
                        future.set_exception(RuntimeError("batch cancelled"))
                raise
            for (_, future), result in zip(taken, results, strict=True):
                if not future.done():
                    future.set_result(result)
