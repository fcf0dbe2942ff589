"""The load generator: worker processes that play devices and calling services.

Each worker is a separate process (``multiprocessing``, spawn) with its own
event loop, so the generator can use more than one core. A worker talks to the
driver over a pipe: it reports ``("ready", ...)``, waits for commands, and
ends with ``("done", figures)``. Every loop is bounded in count and time, and
every wait on the pipe has a deadline, so a dead driver or server ends the
worker instead of leaving it behind.

Times are ``time.monotonic()``: CLOCK_MONOTONIC is system-wide on Linux, so
the driver and the workers can compare them.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import jwt
import orjson

from benchmarks.servers import check_loopback, raise_nofile_limit

TEXT = aiohttp.WSMsgType.TEXT
HELLO_TIMEOUT_S = 30.0
# A hard cap on requests per caller loop, whatever the duration: loops are bounded in count.
MAX_REQUESTS_PER_LOOP = 5_000_000


def _recv_within(pipe: Connection, timeout: float) -> Any:
    if pipe.poll(max(0.0, timeout)):
        return pipe.recv()
    raise TimeoutError(f"no command from the driver within {timeout:g} s")


async def recv(pipe: Connection, timeout: float) -> Any:
    """The driver's next message; the helper thread never outlives ``timeout``."""
    return await asyncio.get_running_loop().run_in_executor(None, _recv_within, pipe, timeout)


def run_worker(main: Callable[[Connection, dict[str, Any]], Coroutine[Any, Any, None]],
               pipe: Connection, cfg: dict[str, Any]) -> None:
    raise_nofile_limit()
    try:
        asyncio.run(main(pipe, cfg))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", repr(exc)[:500]))
        raise
    finally:
        pipe.close()


# ---------------------------------------------------------------- devices


class TokenMinter:
    """Device JWTs, one per user, signed with the gateway's secret (the ceiling ignores them)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self._cache: dict[str, str] = {}

    def __call__(self, user_id: str) -> str:
        token = self._cache.get(user_id)
        if token is None:
            if not self.secret:
                token = "ceiling-ignores-tokens"
            else:
                now = int(time.time())
                token = jwt.encode({"sub": user_id, "iat": now, "exp": now + 6 * 3600},
                                   self.secret, algorithm="HS256")
            self._cache[user_id] = token
        return token


async def connect_device(
    session: aiohttp.ClientSession, ws_url: str, token: str, user_id: str, device_id: str,
    agent_ids: list[str] | None = None, capabilities: list[str] | None = None,
) -> tuple[aiohttp.ClientWebSocketResponse, float]:
    """WebSocket + device_hello + hello_ack; returns the socket and the time it took."""
    started = time.monotonic()
    async with asyncio.timeout(HELLO_TIMEOUT_S):
        ws = await session.ws_connect(
            ws_url, params={"token": token, "user_id": user_id}, autoping=True,
            max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        try:
            hello: dict[str, Any] = {"type": "device_hello", "device_id": device_id}
            if agent_ids is not None:
                hello["agent_ids"] = agent_ids
            if capabilities is not None:
                hello["capabilities"] = capabilities
            await ws.send_frame(orjson.dumps(hello), TEXT)
            while True:
                msg = await ws.receive()
                if msg.type is not TEXT:
                    raise ConnectionError(f"closed before hello_ack: {msg.type.name} "
                                          f"{ws.close_code} {msg.extra!r}")
                if orjson.loads(msg.data).get("type") == "hello_ack":
                    break
        except BaseException:
            await ws.close()
            raise
    return ws, time.monotonic() - started


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


# ---------------------------------------------------------------- idle


async def idle_main(pipe: Connection, cfg: dict[str, Any]) -> None:
    """Hold ``cfg["indices"]`` devices until told to stop."""
    check_loopback(cfg["ws_url"])
    mint = TokenMinter(cfg["jwt_secret"])
    per_user = cfg["devices_per_user"]
    tag = cfg["tag"]
    sem = asyncio.Semaphore(cfg["concurrency"])
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    latencies: list[float] = []
    failures: list[str] = []
    stopping = False
    unexpected: list[int | None] = []

    async def hold(ws: aiohttp.ClientWebSocketResponse) -> None:
        async for _msg in ws:  # answers WebSocket pings; app pings are ignored
            pass
        if not stopping:
            unexpected.append(ws.close_code)

    async with new_session() as session:
        async def one(i: int) -> None:
            user_id = f"{tag}-u{i // per_user}"
            async with sem:
                try:
                    ws, took = await connect_device(session, cfg["ws_url"], mint(user_id),
                                                    user_id, f"{tag}-d{i}",
                                                    agent_ids=cfg["agent_ids"])
                except Exception as exc:
                    failures.append(repr(exc)[:200])
                    return
            sockets.append(ws)
            latencies.append(took)

        for i in range(*cfg["indices"]):
            mint(f"{tag}-u{i // per_user}")
        pipe.send(("ready", {"pid": os.getpid()}))
        command = await recv(pipe, 60)
        assert command == "go", command
        started = time.monotonic()
        async with asyncio.timeout(cfg["connect_timeout_s"]):
            await asyncio.gather(*(one(i) for i in range(*cfg["indices"])))
        connected_at = time.monotonic()
        holders = [asyncio.create_task(hold(ws)) for ws in sockets]
        pipe.send(("connected", {
            "connected": len(sockets), "failed": len(failures), "failures": failures[:3],
            "latencies": array.array("d", latencies), "started": started,
            "finished": connected_at,
        }))
        command = await recv(pipe, cfg["hold_timeout_s"])
        assert command == "stop", command
        stopping = True
        lost = len(unexpected)
        close_sem = asyncio.Semaphore(256)

        async def close(ws: aiohttp.ClientWebSocketResponse) -> None:
            async with close_sem:
                with contextlib.suppress(Exception):
                    await ws.close()

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                await asyncio.gather(*(close(ws) for ws in sockets))
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    pipe.send(("done", {"unexpected_closes": lost, "close_codes": sorted(
        {str(c) for c in unexpected})[:5]}))


def idle_worker(pipe: Connection, cfg: dict[str, Any]) -> None:
    run_worker(idle_main, pipe, cfg)


# ---------------------------------------------------------------- tool calls: the device


def tool_result_frame(frame: dict[str, Any]) -> bytes:
    return b"".join((b'{"type":"tool_result","id":', orjson.dumps(frame["id"]),
                     b',"result":', orjson.dumps(frame.get("args")), b"}"))


async def device_main(pipe: Connection, cfg: dict[str, Any]) -> None:
    """One device that answers ``echo`` at once and never answers ``hang``."""
    check_loopback(cfg["ws_url"])
    mint = TokenMinter(cfg["jwt_secret"])
    answered = 0
    seen = 0
    wanted = 0
    enough = asyncio.Event()
    async with new_session() as session:
        ws, _ = await connect_device(session, cfg["ws_url"], mint(cfg["user_id"]),
                                     cfg["user_id"], cfg["device_id"])

        async def serve() -> None:
            nonlocal answered, seen
            async for msg in ws:
                if msg.type is not TEXT:
                    continue
                frame = orjson.loads(msg.data)
                if frame.get("type") != "tool_call":
                    continue
                seen += 1
                if wanted and seen >= wanted:
                    enough.set()
                if frame.get("tool") == "hang":
                    continue
                await ws.send_frame(tool_result_frame(frame), TEXT)
                answered += 1

        server = asyncio.create_task(serve())
        pipe.send(("ready", {"pid": os.getpid()}))
        deadline = time.monotonic() + cfg["max_s"]
        while True:
            command = await recv(pipe, deadline - time.monotonic())
            if command[0] == "wait_calls":
                wanted = command[1]
                if seen >= wanted:
                    enough.set()
                async with asyncio.timeout(10):
                    await enough.wait()
                pipe.send(("seen", seen))
            elif command[0] == "close":
                closing_at = time.monotonic()
                await ws.close()
                pipe.send(("closed", closing_at))
                break
            elif command[0] == "stop":
                break
        await ws.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
    pipe.send(("done", {"answered": answered, "seen": seen}))


def device_worker(pipe: Connection, cfg: dict[str, Any]) -> None:
    run_worker(device_main, pipe, cfg)


# ---------------------------------------------------------------- tool calls: the callers


class HttpClient(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive client: one request in flight, Content-Length bodies.

    aiohttp's own client costs several times more CPU per request; on a
    2-core machine that would make the generator, not the server, the limit.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            waiter.set_exception(ConnectionError("response without Content-Length"))
            return
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17:line_end if line_end >= 0 else len(head)])
        total = end + 4 + length
        if len(buf) < total:
            return
        body = bytes(buf[end + 4:total])
        del buf[:total]
        waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter


def http_post(url: str, body: bytes, token: str) -> tuple[str, int, bytes]:
    """host, port and the raw bytes of a keep-alive POST of ``body`` to ``url``."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    return parts.hostname, parts.port, head.encode() + b"\r\n" + body


async def caller_main(pipe: Connection, cfg: dict[str, Any]) -> None:
    """``cfg["loops"]`` callers, each on its own keep-alive connection, one call at a time."""
    check_loopback(cfg["url"])
    body = orjson.dumps({"user_id": cfg["user_id"], "device_id": cfg["device_id"],
                         "tool": "echo", "args": {"n": 1, "pad": "x" * 32}})
    host, port, request = http_post(cfg["url"], body, cfg["service_token"])
    loop = asyncio.get_running_loop()
    clients: list[HttpClient] = []
    for _ in range(cfg["loops"]):
        _transport, client = await loop.create_connection(HttpClient, host, port)
        clients.append(client)
    # One checked call per connection before the clock starts.
    for client in clients:
        status, answer = await asyncio.wait_for(client.request(request), 10)
        if status != 200 or b'"ok":true' not in answer:
            raise RuntimeError(f"warm-up call failed: {status} {answer[:200]!r}")
    pipe.send(("ready", {"pid": os.getpid()}))
    command = await recv(pipe, 120)
    assert command[0] == "go", command
    _, window_start, window_end = command
    latencies = array.array("d")
    statuses: dict[int, int] = {}
    errors: list[str] = []

    async def call_loop(client: HttpClient) -> None:
        for _ in range(MAX_REQUESTS_PER_LOOP):
            sent = time.monotonic()
            if sent >= window_end:
                return
            try:
                status, _answer = await client.request(request)
            except ConnectionError as exc:
                errors.append(repr(exc)[:200])
                return
            done = time.monotonic()
            if window_start <= done <= window_end:
                latencies.append(done - sent)
                statuses[status] = statuses.get(status, 0) + 1

    async with asyncio.timeout(window_end - time.monotonic() + 30):
        await asyncio.gather(*(call_loop(c) for c in clients))
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    pipe.send(("done", {"latencies": latencies, "statuses": statuses, "errors": errors[:5],
                        "error_count": len(errors)}))


def caller_worker(pipe: Connection, cfg: dict[str, Any]) -> None:
    run_worker(caller_main, pipe, cfg)


# ---------------------------------------------------------------- ingest


def event_payloads(count: int, size: int) -> list[bytes]:
    """``count`` distinct ``data`` values of ``size`` bytes of JSON each (at least ~20)."""
    values = []
    for i in range(1, count + 1):
        head = orjson.dumps({"i": i, "p": ""})
        pad = max(0, size - len(head))
        values.append(orjson.dumps({"i": i, "p": "x" * pad}))
    return values


async def ingest_main(pipe: Connection, cfg: dict[str, Any]) -> None:
    """Devices that stream agent_data frames into a run, then agent_complete; in rounds.

    ``cfg["rounds"]`` lists the events per device of each round (a warm-up round,
    then the measured one). Gateway: a device streams when an ``agent_run``
    arrives. Ceiling: all devices stream on the driver's ``go`` and a run ends
    with the ceiling's ``run_done``. After each round: ``("sent", figures)``.

    ``cfg["event_acks"]`` (gateway only): the hello asks for ``event_acks``, every
    agent_data carries ``seq``, and a device's round ends only once its last
    event is acknowledged; figures count the ``agent_ack`` frames.
    """
    check_loopback(cfg["ws_url"])
    mint = TokenMinter(cfg["jwt_secret"])
    payloads = {n: event_payloads(n, cfg["size"]) for n in set(cfg["rounds"])}
    ceiling = cfg["kind"] == "ceiling"
    loop = asyncio.get_running_loop()
    figures: dict[str, dict[str, float]] = {}
    tasks: list[asyncio.Task[None]] = []
    round_events = 0
    remaining = 0
    all_done: asyncio.Future[None] = loop.create_future()
    acks = bool(cfg.get("event_acks")) and not ceiling
    # device id → (the seq its round waits for, resolved when an ack reaches it)
    awaited: dict[str, tuple[int, asyncio.Future[None]]] = {}

    def finished() -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0 and not all_done.done():
            all_done.set_result(None)

    async def stream(ws: aiohttp.ClientWebSocketResponse, device_id: str, run_id: str) -> None:
        prefix = b'{"type":"agent_data","run_id":"' + run_id.encode() + b'","data":'
        first = time.monotonic()
        if acks:
            acked: asyncio.Future[None] = loop.create_future()
            awaited[device_id] = (round_events, acked)
            for seq, data in enumerate(payloads[round_events], 1):
                await ws.send_frame(prefix + data + b',"seq":' + str(seq).encode() + b"}", TEXT)
        else:
            for data in payloads[round_events]:
                await ws.send_frame(prefix + data + b"}", TEXT)
        await ws.send_frame(orjson.dumps({"type": "agent_complete", "run_id": run_id,
                                          "status": "completed"}), TEXT)
        figures[device_id].update(first_sent=first, last_sent=time.monotonic())
        if acks:  # not timed: the run's end is; this checks every event was acked
            await acked
        if not ceiling:
            finished()

    async def serve(ws: aiohttp.ClientWebSocketResponse, device_id: str) -> None:
        async for msg in ws:
            if msg.type is not TEXT:
                continue
            frame = orjson.loads(msg.data)
            kind = frame.get("type")
            if kind == "agent_run" and not ceiling:
                figures[device_id]["run_received"] = time.monotonic()
                tasks.append(asyncio.create_task(stream(ws, device_id, frame["run_id"])))
            elif kind == "agent_ack":
                mine = figures[device_id]
                mine["acks"] = mine.get("acks", 0) + 1
                want = awaited.get(device_id)
                if want is not None and frame["seq"] >= want[0] and not want[1].done():
                    want[1].set_result(None)
            elif kind == "run_done" and ceiling:
                figures[device_id]["done"] = time.monotonic()
                finished()

    async with new_session() as session:
        sockets = {}
        for user_id, device_id in cfg["devices"]:
            ws, _ = await connect_device(session, cfg["ws_url"], mint(user_id), user_id,
                                         device_id, agent_ids=["bench"],
                                         capabilities=["event_acks"] if acks else None)
            sockets[device_id] = ws
        readers = [asyncio.create_task(serve(ws, d)) for d, ws in sockets.items()]
        pipe.send(("ready", {"pid": os.getpid()}))
        deadline = time.monotonic() + cfg["max_s"]
        for number, events in enumerate(cfg["rounds"]):
            command = await recv(pipe, 60)
            assert command == ("round", number), command
            round_events, remaining = events, len(sockets)
            all_done = loop.create_future()
            figures = {d: {} for d in sockets}
            tasks.clear()
            if ceiling:
                for device_id, ws in sockets.items():
                    tasks.append(asyncio.create_task(
                        stream(ws, device_id, f"run-{device_id}-{number}")))
            async with asyncio.timeout(deadline - time.monotonic()):
                await all_done
                await asyncio.gather(*tasks)
            pipe.send(("sent", figures))
        command = await recv(pipe, deadline - time.monotonic() + 60)
        assert command == "stop", command
        for ws in sockets.values():
            await ws.close()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    pipe.send(("done", {}))


def ingest_worker(pipe: Connection, cfg: dict[str, Any]) -> None:
    run_worker(ingest_main, pipe, cfg)
