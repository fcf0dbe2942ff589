"""A run's event stream for HTTP readers: stored events, then live ones, then the end.

The reader subscribes *before* it reads the database. The event writer hands
events to subscribers only after they are committed, so every event is either
already in the database when it is read or arrives live afterwards: no gap.
Duplicates at the switch are dropped by ``seq``.
"""

from __future__ import annotations

import uuid

import orjson
from aiohttp import web

from gateway.runs.lifecycle import RUNS
from gateway.runs.live import LIVE
from gateway.shutdown import SHUTDOWN
from gateway.store import RunRecord, StoredEvent

EVENTS_PAGE = 1000
# ... and at most this many bytes of event JSON (one larger event comes alone):
# a page of 1000 events of 3.5 MiB each held 3.5 GiB.
EVENTS_PAGE_BYTES = 8 * 1024 * 1024
# A reader of a run fed through another gateway process is woken by that
# process's NOTIFY of each committed batch (gateway/cluster/notify.py) and
# re-reads the table; it also looks this often, should a notification be lost.
POLL_S = 1.0


def _ndjson(events: list[StoredEvent]) -> bytes:
    return b"".join(event.as_json_bytes() + b"\n" for event in events)


def _sse(events: list[StoredEvent]) -> bytes:
    return b"".join(
        b"id: %d\nevent: agent_data\ndata: %s\n\n" % (event.seq, event.as_json_bytes())
        for event in events
    )


def _sse_end(record: RunRecord) -> bytes:
    return b"event: end\ndata: %s\n\n" % orjson.dumps(record.as_json())


async def stream_run_events(
    request: web.Request, run_id: uuid.UUID, *, after: int, sse: bool
) -> web.StreamResponse:
    store = request.app[RUNS].store
    live = request.app[LIVE]
    shutdown = request.app[SHUTDOWN]
    encode = _sse if sse else _ndjson
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream" if sse else "application/x-ndjson",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    subscription = live.subscribe(run_id)
    try:
        await response.prepare(request)
        last = after
        record: RunRecord | None = None
        catch_up = True
        while True:
            if catch_up:
                # The record first: if it says finished, everything is stored.
                record = await store.get_run(run_id)
                while True:
                    events, more = await store.events_page(
                        run_id, last, limit=EVENTS_PAGE, max_bytes=EVENTS_PAGE_BYTES)
                    if events:
                        await response.write(encode(events))
                        last = events[-1].seq
                    del events  # not held while the next page is read
                    if not more:
                        break
                if record is None or record.finished:
                    break
                if shutdown.draining:
                    # Cut short, with no `end` (the run has not ended): the reader
                    # resumes on another gateway with ?after=<last seq>.
                    record = None
                    break
            await subscription.wait(POLL_S)
            buffered, overflowed = subscription.take()
            fresh = [event for event in buffered if event.seq > last]
            if fresh and not overflowed:
                await response.write(encode(fresh))
                last = fresh[-1].seq
            # Back to the database after an overflow, at the end, or on a quiet poll.
            catch_up = overflowed or subscription.ended or not buffered
        if sse and record is not None:
            await response.write(_sse_end(record))
        await response.write_eof()
    finally:
        live.unsubscribe(subscription)
    return response
