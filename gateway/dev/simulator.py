"""A device simulator: what an Electron device does, for people trying the gateway and tests.

It says hello, answers the built-in tools ``echo`` (returns its args),
``sleep`` (``{"seconds": S}``, with a tool_progress every second) and
``fail`` (a tool error), runs the built-in agent ``stream`` (``{"events": N,
"size": B, "delay_s": D}``: N agent_data events of B bytes, D seconds apart,
then agent_complete), answers ``ping`` with ``pong``, and logs every frame.

Session continuity (PROTOCOL.md §1.8): it reconnects after a drop with
exponential back-off and full jitter, and goes on with the runs its new
``hello_ack.runs`` lists. Each run keeps the events the gateway has not
confirmed and sends them again after a reconnect, then the rest. With
``event_acks`` the events carry ``seq``, each ``agent_ack`` confirms (and
forgets) events, everything past the last ack is sent again, and an agent with
``max_unacked`` events unconfirmed waits for acks: nothing is lost or stored
twice, even across a gateway crash. Without it a hello's ``last_seq`` is the
only confirmation, so the run keeps just its last ``max_unacked`` events.

It stops for good on 4000 (another copy of this device took over), 4002,
1008 and 1009 (reconnecting would be refused again), a refused handshake
(401), and 4001 unless it minted its own token (then it mints a new one).

One module, longer than most: it is a whole device (reconnects, resends,
tools, agents), meant to be read top to bottom by a device author.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import attrs
import orjson
import structlog

from gateway.wire.codes import CloseCode

log = structlog.get_logger("gateway.simulator")

MAX_SLEEP_S = 3600.0
DEFAULT_MAX_UNACKED = 1024
# Full-jitter back-off (sleep uniform in [0, min(cap, base * 2**attempt)]): many
# devices dropped at once by a deploy do not all come back in the same instant.
RECONNECT_BASE_S = 0.5
DEFAULT_RECONNECT_MAX_S = 30.0
# Reconnecting cannot help: the gateway would refuse the same again, or another
# copy of this device holds the connection now.
FINAL_CLOSE_CODES = frozenset({CloseCode.REPLACED, CloseCode.TOO_MANY_DEVICES,
                               CloseCode.POLICY, CloseCode.TOO_BIG})
LOST_RUN_ERROR = "the device no longer has this run"
# Runs whose agent_complete went out are kept until a hello_ack no longer lists
# them (were that frame lost in a drop, the run is resumed and it is sent
# again); this many at most, the oldest forgotten first.
KEEP_FINISHED_RUNS = 16


@attrs.frozen
class SimulatorOptions:
    url: str
    token: str
    device_id: str
    agent_ids: tuple[str, ...] = ("stream",)
    verbose: bool = True
    event_acks: bool = False
    reconnect: bool = True
    reconnect_max_s: float = DEFAULT_RECONNECT_MAX_S
    max_unacked: int = DEFAULT_MAX_UNACKED
    # Set when the simulator minted its token itself: a fresh one after 4001.
    mint_token: Callable[[], str] | None = None


@attrs.define(eq=False)
class RunState:
    """One run this device feeds: what the gateway has not confirmed yet."""

    run_id: str
    agent: asyncio.Task[None] | None = None
    next_seq: int = 1
    confirmed: int = 0  # events up to here are stored (an ack, or a hello's last_seq)
    unconfirmed: collections.deque[tuple[int, dict[str, Any]]] = attrs.Factory(
        collections.deque)
    complete: dict[str, Any] | None = None  # the agent finished: its agent_complete
    changed: asyncio.Event = attrs.Factory(asyncio.Event)  # the pump has something to send
    room: asyncio.Event = attrs.Factory(asyncio.Event)  # the agent may add an event

    def confirm(self, seq: int) -> None:
        if seq <= self.confirmed:
            return
        self.confirmed = seq
        while self.unconfirmed and self.unconfirmed[0][0] <= seq:
            self.unconfirmed.popleft()
        self.room.set()


@attrs.define(eq=False)
class Link:
    """One WebSocket connection and the tasks that live exactly as long as it."""

    ws: aiohttp.ClientWebSocketResponse
    tasks: set[asyncio.Task[None]] = attrs.Factory(set)

    def start(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(_until_disconnected(coro))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _until_disconnected(coro: Any) -> None:
    """Work for one connection: its end (a failed send) ends the work quietly."""
    with contextlib.suppress(ConnectionError):
        await coro


@attrs.define(eq=False)
class Simulator:
    options: SimulatorOptions
    link: Link | None = None
    runs: dict[str, RunState] = attrs.Factory(dict)
    # Tool calls and run pumps: per connection (the gateway fails a dropped
    # connection's calls; a run's pump starts again after the next hello).
    _calls: dict[str, asyncio.Task[None]] = attrs.Factory(dict)
    _pumps: dict[str, asyncio.Task[None]] = attrs.Factory(dict)
    _finished: collections.deque[str] = attrs.Factory(collections.deque)

    @property
    def verbose(self) -> bool:
        return self.options.verbose

    # ------------------------------------------------------------ sending

    async def send(self, frame: dict[str, Any]) -> None:
        """To the current connection; raises ConnectionError when there is none."""
        link = self.link
        if link is None or link.ws.closed:
            raise ConnectionError("not connected")
        if self.verbose:
            log.info("frame_out", frame=_shorten(frame))
        await link.ws.send_str(orjson.dumps(frame).decode())

    async def _send_quietly(self, frame: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send(frame)

    # ------------------------------------------------------------ a connection

    async def connected(self, link: Link) -> None:
        self.link = link
        hello: dict[str, Any] = {"type": "device_hello", "device_id": self.options.device_id,
                                 "agent_ids": list(self.options.agent_ids)}
        if self.options.event_acks:
            hello["capabilities"] = ["event_acks"]
        await self.send(hello)

    async def disconnected(self) -> None:
        """The connection ended: its calls and pumps end; the runs' agents go on."""
        link, self.link = self.link, None
        if link is not None:
            await link.stop()
        self._calls.clear()
        self._pumps.clear()

    def on_hello_ack(self, frame: dict[str, Any]) -> None:
        """Runs listed go on; runs not listed ended meanwhile.

        Without event_acks a hello is the only word on what was stored: events up
        to ``last_seq`` are forgotten and the rest sent again. With it, only an ack
        says "stored" (after a replacement ``last_seq`` also counts events still on
        their way to the database, which a crash then would lose), so everything
        past the last ack is sent again; the gateway acks, and does not store
        again, those up to its ``last_seq``."""
        listed: dict[str, int] = {}
        for entry in frame.get("runs") or ():
            listed[str(entry["run_id"])] = int(entry.get("last_seq") or 0)
        for run_id, known in list(self.runs.items()):
            if run_id not in listed:
                self._drop(run_id, "run_ended" if known.complete is None else "")
        for run_id, last_seq in listed.items():
            run = self.runs.get(run_id)
            if run is None:
                # Not ours to continue (this simulator started after the run did): end
                # it, or it would stay running, attached to this connection, forever.
                log.warning("run_unknown_to_device", run_id=run_id, last_seq=last_seq)
                self._start_on_link(self._send_quietly(
                    {"type": "agent_complete", "run_id": run_id, "status": "error",
                     "errors": [LOST_RUN_ERROR]}))
                continue
            if not self.options.event_acks:
                run.confirm(last_seq)
            first = run.unconfirmed[0][0] if run.unconfirmed else run.next_seq
            if first > max(last_seq, run.confirmed) + 1:
                # Only without event_acks: the events between were forgotten.
                log.warning("run_events_lost", run_id=run_id, last_seq=last_seq,
                            first_kept=first)
            log.info("run_continued", run_id=run_id, last_seq=last_seq, acked=run.confirmed,
                     resending=len(run.unconfirmed),
                     already_there=max(0, min(last_seq, run.next_seq - 1) - run.confirmed))
            self._pump(run)

    def _start_on_link(self, coro: Any) -> asyncio.Task[None] | None:
        if self.link is None:
            coro.close()
            return None
        return self.link.start(coro)

    # ------------------------------------------------------------ frames in

    async def on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "ping":
            await self.send({"type": "pong"})
        elif kind == "hello_ack":
            self.on_hello_ack(frame)
        elif kind == "tool_call":
            call_id = str(frame["id"])
            task = self._start_on_link(self.run_tool(frame))
            if task is not None:
                self._calls[call_id] = task
                task.add_done_callback(lambda _t: self._calls.pop(call_id, None))
        elif kind == "tool_cancel":
            call = self._calls.get(str(frame["id"]))
            if call is not None:
                call.cancel()
        elif kind == "agent_run":
            self.start_run(frame)
        elif kind == "agent_cancel":
            self._drop(str(frame["run_id"]), "run_cancelled")
        elif kind == "agent_ack":
            run = self.runs.get(str(frame["run_id"]))
            if run is not None:
                run.confirm(int(frame["seq"]))

    # ------------------------------------------------------------ runs

    def start_run(self, frame: dict[str, Any]) -> None:
        run_id = str(frame["run_id"])
        if run_id in self.runs:
            return
        run = self.runs[run_id] = RunState(run_id)
        run.room.set()
        run.agent = asyncio.get_running_loop().create_task(self.run_agent(run, frame))
        self._pump(run)

    def _drop(self, run_id: str, why: str) -> None:
        """Forget a run (``why``: the log event, or "" for none)."""
        run = self.runs.pop(run_id, None)
        if run is None:
            return
        with contextlib.suppress(ValueError):
            self._finished.remove(run_id)
        if run.agent is not None:
            run.agent.cancel()
        pump = self._pumps.pop(run_id, None)
        if pump is not None:
            pump.cancel()
        if why:
            log.info(why, run_id=run_id, unconfirmed=len(run.unconfirmed))

    def _pump(self, run: RunState) -> None:
        old = self._pumps.pop(run.run_id, None)
        if old is not None:
            old.cancel()
        task = self._start_on_link(self.pump(run))
        if task is not None:
            self._pumps[run.run_id] = task

    async def pump(self, run: RunState) -> None:
        """The one sender of a run's frames on this connection: first everything the
        gateway has not confirmed, in order, then each event as the agent makes it."""
        sent = run.confirmed
        while True:
            run.changed.clear()
            # The kept events have consecutive seqs: the next one is found by position.
            while run.unconfirmed and sent < run.unconfirmed[-1][0]:
                first = run.unconfirmed[0][0]
                seq, frame = run.unconfirmed[max(0, sent + 1 - first)]
                await self.send(frame)
                sent = seq
            if run.complete is not None and sent == run.next_seq - 1:
                await self.send(run.complete)
                self._keep_finished(run.run_id)
                return
            await run.changed.wait()

    async def add_event(self, run: RunState, data: Any) -> None:
        """The agent made an event: kept until confirmed, sent by the run's pump."""
        if self.options.event_acks:
            while len(run.unconfirmed) >= self.options.max_unacked:
                run.room.clear()
                await run.room.wait()  # for acks (after a reconnect, if need be)
        elif len(run.unconfirmed) >= self.options.max_unacked:
            run.unconfirmed.popleft()  # nothing but a hello confirms: keep the newest
        seq = run.next_seq
        run.next_seq += 1
        frame: dict[str, Any] = {"type": "agent_data", "run_id": run.run_id, "data": data}
        if self.options.event_acks:
            frame["seq"] = seq
        run.unconfirmed.append((seq, frame))
        run.changed.set()

    def finish(self, run: RunState, frame: dict[str, Any]) -> None:
        run.complete = frame
        run.changed.set()

    async def run_agent(self, run: RunState, frame: dict[str, Any]) -> None:
        given = frame.get("input")
        spec: dict[str, Any] = given if isinstance(given, dict) else {}
        count = int(spec.get("events", 10))
        payload = "x" * int(spec.get("size", 16))
        delay = float(spec.get("delay_s", 0))
        for i in range(1, count + 1):
            await self.add_event(run, {"i": i, "payload": payload})
            # Let the pump send as we go (a long run streams, it does not batch up).
            await asyncio.sleep(delay)
        self.finish(run, {"type": "agent_complete", "run_id": run.run_id,
                          "status": "completed", "result": {"events": count}})

    def _keep_finished(self, run_id: str) -> None:
        if run_id not in self._finished:
            self._finished.append(run_id)
        while len(self._finished) > KEEP_FINISHED_RUNS:
            self._drop(self._finished.popleft(), "")

    # ------------------------------------------------------------ tools

    async def run_tool(self, frame: dict[str, Any]) -> None:
        call_id, tool, args = frame["id"], frame.get("tool"), frame.get("args") or {}
        if tool == "echo":
            await self.send({"type": "tool_result", "id": call_id, "result": args})
        elif tool == "sleep":
            seconds = min(float(args.get("seconds", 1)), MAX_SLEEP_S)
            elapsed = 0.0
            while elapsed < seconds:
                step = min(1.0, seconds - elapsed)
                await asyncio.sleep(step)
                elapsed += step
                if elapsed < seconds:
                    await self.send({"type": "tool_progress", "id": call_id,
                                     "progress": elapsed / seconds})
            await self.send({"type": "tool_result", "id": call_id,
                             "result": {"slept_s": seconds}})
        elif tool == "fail":
            await self.send({"type": "tool_result", "id": call_id,
                             "error": {"code": "tool_failed",
                                       "message": str(args.get("message", "it failed"))}})
        else:
            await self.send({"type": "tool_result", "id": call_id,
                             "error": {"code": "unknown_tool", "message": f"no tool {tool!r}"}})

    async def close(self) -> None:
        await self.disconnected()
        agents = [run.agent for run in self.runs.values() if run.agent is not None]
        for agent in agents:
            agent.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
        self.runs.clear()


def _shorten(frame: dict[str, Any]) -> dict[str, Any]:
    text = orjson.dumps(frame)
    return frame if len(text) <= 300 else {"type": frame.get("type"), "bytes": len(text)}


def backoff_s(attempt: int, cap_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap_s, RECONNECT_BASE_S * 2 ** min(attempt, 32)))


async def _serve(simulator: Simulator, ws: aiohttp.ClientWebSocketResponse) -> bool:
    """One connection, to its end; True once the gateway acknowledged our hello."""
    link = Link(ws)
    acked = False
    try:
        await simulator.connected(link)
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            frame = orjson.loads(msg.data)
            if simulator.verbose:
                log.info("frame_in", frame=_shorten(frame))
            acked = acked or frame.get("type") == "hello_ack"
            await simulator.on_frame(frame)
    except (ConnectionError, aiohttp.ClientError) as exc:
        log.info("device_connection_lost", error=repr(exc))
    finally:
        await simulator.disconnected()
        with contextlib.suppress(Exception):
            await ws.close()
    return acked


async def run_simulator(options: SimulatorOptions, *, rng: random.Random | None = None) -> int:
    """Connect (and reconnect, unless told not to) until the gateway says to stop."""
    rng = rng or random.Random()
    token = options.token
    simulator = Simulator(options)
    attempt = 0
    try:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    ws = await session.ws_connect(options.url, params={"token": token},
                                                  heartbeat=30, max_msg_size=0)
                except aiohttp.WSServerHandshakeError as exc:
                    log.error("device_handshake_refused", status=exc.status, detail=exc.message)
                    if exc.status != 503 or not options.reconnect:  # 503: draining, full
                        return 1
                except (aiohttp.ClientError, OSError) as exc:
                    log.error("device_connect_failed", error=str(exc))
                    if not options.reconnect:
                        return 1
                else:
                    if await _serve(simulator, ws):
                        attempt = 0
                    code = ws.close_code
                    log.info("device_closed", close_code=code)
                    if not options.reconnect:
                        return 0
                    if code in FINAL_CLOSE_CODES:
                        log.warning("device_stopping", close_code=code)
                        return 0 if code == CloseCode.REPLACED else 1
                    if code == CloseCode.TOKEN_EXPIRED:
                        if options.mint_token is None:
                            log.warning("device_stopping", close_code=code,
                                        detail="the token expired; give a new --token")
                            return 1
                        token = options.mint_token()
                        log.info("device_token_minted")
                delay = backoff_s(attempt, options.reconnect_max_s, rng)
                attempt += 1
                log.info("device_reconnecting", in_s=round(delay, 3), attempt=attempt,
                         runs=len(simulator.runs))
                await asyncio.sleep(delay)
    finally:
        await simulator.close()
