"""A client for services calling the gateway's internal API (PROTOCOL.md §2), aiohttp only.

    async with GatewayClient("http://127.0.0.1:8081", token) as gw:
        result = await gw.call_tool("user-1", "echo", {"hi": 1})

Every failure is a ``GatewayError`` subclass named after what happened
(``DeviceOffline``, ``ToolTimeout``, ``ToolFailed``, ...). ``follow_run`` reads
the SSE form of ``/runs/{id}/events``: its ``end`` event says the run is over,
and a stream that stops without it (a dropped connection, a draining gateway)
is resumed with ``?after=`` the last seq seen, so no event is lost or repeated.

It imports nothing of the gateway, so a service may also copy this one file;
that is also why it is one file, longer than the gateway's other modules.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiohttp

API_PREFIX = "/internal/v1"
DEFAULT_TIMEOUT_S = 30.0
# The gateway's own bound on max_timeout_s (README "Limits on the internal API").
MAX_HARD_TIMEOUT_S = 86400.0
# How long past the gateway's own deadline the HTTP request may take: the
# gateway answers 504 itself, this only catches a gateway that never answers.
HTTP_MARGIN_S = 10.0
REQUEST_TIMEOUT_S = 30.0
# One SSE line holds one event; a device frame is at most GATEWAY_MAX_FRAME_BYTES (4 MiB).
MAX_EVENT_BYTES = 64 * 1024 * 1024
FINISHED = frozenset({"completed", "error", "cancelled"})


# ---------------------------------------------------------------- errors


class GatewayError(Exception):
    """Any failure of a gateway request; ``code`` is the body's ``error`` when there is one."""

    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.body = body or {}

    @property
    def device_id(self) -> str | None:
        """Tool-call failures: the device the gateway had chosen."""
        value = self.body.get("device_id")
        return value if isinstance(value, str) else None


class GatewayUnavailable(GatewayError):
    """The gateway could not be reached or did not answer properly (connection, 5xx)."""


class GatewayShuttingDown(GatewayUnavailable):
    """503 ``gateway_shutdown``: this gateway process is draining; try another or later."""


class Unauthorized(GatewayError):
    """401: the service token is missing or not accepted."""


class BadRequest(GatewayError):
    """400 (or 413 for a body too large): ``detail`` says what to fix."""


class DeviceOffline(GatewayError):
    """404 ``device_offline``: no connected device for the user (or not the one named)."""


class ToolTimeout(GatewayError):
    """504 ``timeout``: the device sent no result in time; it was told to cancel."""


class DeviceDisconnected(GatewayError):
    """503 ``device_disconnected``: the device dropped while the call ran."""


class TooManyCalls(GatewayError):
    """429 ``too_many_calls``: the device already runs its limit of calls; retry later."""


class ToolFailed(GatewayError):
    """The tool itself failed on the device (200 with ``ok: false``)."""

    @property
    def call_id(self) -> str | None:
        value = self.body.get("call_id")
        return value if isinstance(value, str) else None


class RunNotFound(GatewayError):
    """404 ``run_not_found``."""


class RunFinished(GatewayError):
    """409 ``run_finished``: the run had already ended; ``run`` is its record."""

    @property
    def run(self) -> Run:
        return Run.from_json(self.body["run"])


_BY_CODE: dict[str, type[GatewayError]] = {
    "unauthorized": Unauthorized,
    "bad_request": BadRequest,
    "payload_too_large": BadRequest,
    "device_offline": DeviceOffline,
    "timeout": ToolTimeout,
    "device_disconnected": DeviceDisconnected,
    "gateway_shutdown": GatewayShuttingDown,
    "too_many_calls": TooManyCalls,
    "run_not_found": RunNotFound,
    "run_finished": RunFinished,
}


def error_for(status: int, body: Any) -> GatewayError:
    """The typed exception for an error answer (``{"error", "detail"}``, or whatever came)."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code: str = body["error"]
        detail = str(body.get("detail", code))
        kind = _BY_CODE.get(code)
        if kind is None:
            kind = GatewayUnavailable if status >= 500 else GatewayError
        return kind(detail, status=status, code=code, body=body)
    kind = GatewayUnavailable if status >= 500 else GatewayError
    return kind(f"HTTP {status} without an error body", status=status)


# ---------------------------------------------------------------- values


def _time(value: Any) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else None


@dataclass(frozen=True)
class Device:
    """A connected device (§2.1)."""

    user_id: str
    device_id: str
    agent_ids: tuple[str, ...]
    connection_id: str
    connected_at: dt.datetime

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Device:
        connected_at = _time(value["connected_at"])
        assert connected_at is not None
        return cls(user_id=value["user_id"], device_id=value["device_id"],
                   agent_ids=tuple(value["agent_ids"]), connection_id=value["connection_id"],
                   connected_at=connected_at)


@dataclass(frozen=True)
class Run:
    """A run record (§2.3, §3.1); ``raw`` is the JSON as the gateway sent it."""

    run_id: str
    user_id: str
    agent_id: str
    device_id: str | None
    status: str
    input: Any
    result: Any
    errors: tuple[str, ...]
    event_count: int
    scheduled_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    detached_at: dt.datetime | None
    detach_reason: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Run:
        return cls(
            run_id=value["run_id"], user_id=value["user_id"], agent_id=value["agent_id"],
            device_id=value.get("device_id"), status=value["status"], input=value.get("input"),
            result=value.get("result"), errors=tuple(value.get("errors") or ()),
            event_count=int(value.get("event_count") or 0),
            scheduled_at=_time(value.get("scheduled_at")),
            started_at=_time(value.get("started_at")),
            finished_at=_time(value.get("finished_at")),
            detached_at=_time(value.get("detached_at")),
            detach_reason=value.get("detach_reason"), raw=value,
        )


@dataclass(frozen=True)
class RunEvent:
    """One stored event of a run: ``data`` is what the device's agent emitted."""

    seq: int
    data: Any
    received_at: dt.datetime

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> RunEvent:
        received_at = _time(value["received_at"])
        assert received_at is not None
        return cls(seq=int(value["seq"]), data=value["data"], received_at=received_at)


# ---------------------------------------------------------------- the client


class GatewayClient:
    """The internal API as coroutines. Use as ``async with GatewayClient(url, token) as gw``.

    ``url`` is the internal listener (``http://127.0.0.1:8081``; a trailing
    ``/internal/v1`` is accepted too). ``session``: an aiohttp session of the
    caller's to share; it is not closed here.
    """

    def __init__(self, url: str, token: str, *, session: aiohttp.ClientSession | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S,
                 reconnect_for_s: float = 60.0) -> None:
        base = url.rstrip("/")
        if not base.endswith(API_PREFIX):
            base += API_PREFIX
        self.base_url = base
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session = session
        self._own_session = session is None
        self.request_timeout_s = request_timeout_s
        # follow_run: how long it keeps reconnecting without getting anywhere.
        self.reconnect_for_s = reconnect_for_s

    async def __aenter__(self) -> Self:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use `async with GatewayClient(...)` (or pass session=)")
        return self._session

    # ------------------------------------------------------------ requests

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       params: dict[str, str] | None = None,
                       timeout_s: float | None = None) -> tuple[int, Any]:
        """One request; (status, decoded body) for 2xx, else the typed error is raised."""
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.request_timeout_s)
        try:
            async with self.session.request(
                    method, self.base_url + path, json=json_body, params=params,
                    headers=self._headers, timeout=timeout) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            raise GatewayUnavailable(f"no answer to {method} {path} in time") from None
        except aiohttp.ClientError as exc:
            raise GatewayUnavailable(f"{method} {path}: {exc!r}") from exc
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if status >= 400:
            raise error_for(status, body)
        if body is None:
            raise GatewayUnavailable(f"{method} {path}: HTTP {status} without a JSON body",
                                     status=status)
        return status, body

    async def devices(self, user_id: str) -> list[Device]:
        """The user's connected devices (§2.1)."""
        _status, body = await self._request("GET", "/devices", params={"user_id": user_id})
        return [Device.from_json(item) for item in body["devices"]]

    # `timeout` is the gateway's timeout_s, sent with the call, not a local
    # deadline around it (what ASYNC109 warns about): the gateway cancels on the device.
    async def call_tool(self, user_id: str, tool: str, args: dict[str, Any] | None = None, *,
                        device_id: str | None = None,
                        timeout: float = DEFAULT_TIMEOUT_S,  # noqa: ASYNC109
                        max_timeout: float | None = None) -> Any:
        """Run ``tool`` on a device of the user and return its result (§2.2).

        ``timeout`` (seconds) is restarted by each ``tool_progress``; ``max_timeout``
        (default 10 times ``timeout``) bounds the whole call. Without ``device_id``,
        the user's most recently connected device answers. Raises ``ToolFailed``
        when the tool reported an error, else the error of what went wrong.
        """
        body: dict[str, Any] = {"user_id": user_id, "tool": tool, "args": args or {},
                                "timeout_s": timeout}
        if device_id is not None:
            body["device_id"] = device_id
        if max_timeout is not None:
            body["max_timeout_s"] = max_timeout
        hard = max_timeout if max_timeout is not None else min(10 * timeout, MAX_HARD_TIMEOUT_S)
        # The gateway's deadline, not ours, must end a slow call: it cancels on the device.
        _status, answer = await self._request("POST", "/tool-calls", json_body=body,
                                              timeout_s=hard + HTTP_MARGIN_S)
        if answer.get("ok"):
            return answer.get("result")
        error = answer.get("error") or {}
        raise ToolFailed(str(error.get("message", "")), status=200,
                         code=str(error.get("code", "tool_error")), body=answer)

    async def start_run(self, user_id: str, agent_id: str, input: Any = None, *,
                        device_id: str | None = None,
                        scheduled_at: dt.datetime | None = None) -> Run:
        """Create a run (§2.3): dispatched now if a device of the user runs ``agent_id``."""
        body: dict[str, Any] = {"user_id": user_id, "agent_id": agent_id,
                                "input": {} if input is None else input}
        if device_id is not None:
            body["device_id"] = device_id
        if scheduled_at is not None:
            if scheduled_at.tzinfo is None:
                raise ValueError("scheduled_at must carry a time zone")
            body["scheduled_at"] = scheduled_at.isoformat()
        _status, record = await self._request("POST", "/runs", json_body=body)
        return Run.from_json(record)

    async def get_run(self, run_id: str) -> Run:
        _status, record = await self._request("GET", f"/runs/{run_id}")
        return Run.from_json(record)

    async def list_runs(self, user_id: str, *, status: str | None = None,
                        limit: int = 50) -> list[Run]:
        """The user's runs, newest first."""
        params = {"user_id": user_id, "limit": str(limit)}
        if status is not None:
            params["status"] = status
        _status, body = await self._request("GET", "/runs", params=params)
        return [Run.from_json(item) for item in body["runs"]]

    async def cancel_run(self, run_id: str) -> Run:
        """Cancel a pending or running run; ``RunFinished`` if it had already ended."""
        _status, record = await self._request("POST", f"/runs/{run_id}/cancel")
        return Run.from_json(record)

    # ------------------------------------------------------------ following a run

    async def follow_run(self, run_id: str, *, after: int = 0) -> AsyncIterator[RunEvent]:
        """The run's events with a seq above ``after``, stored then live, until the run ends.

        The iteration ends when the gateway says the run ended (SSE ``end``);
        ``get_run`` then gives the final record. A connection that drops, or a
        gateway that drains, is followed by a reconnect with ``after=`` the last
        seq seen (random back-off, 0.1 s doubling to 5 s); after
        ``reconnect_for_s`` without a single answer it raises ``GatewayUnavailable``.
        """
        last = after
        backoff = 0.1
        failing_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                async for event in self._event_stream(run_id, last):
                    if event is None:  # `end`: the run is over, every event was sent
                        return
                    failing_since = None
                    backoff = 0.1
                    if event.seq > last:
                        last = event.seq
                        yield event
                problem = "the stream ended before the run did"
            except GatewayUnavailable as exc:
                problem = str(exc)
            now = loop.time()
            if failing_since is None:
                failing_since = now
            elif now - failing_since > self.reconnect_for_s:
                raise GatewayUnavailable(
                    f"following run {run_id}: {problem} (gave up after "
                    f"{self.reconnect_for_s:g} s)")
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 5.0)

    async def _event_stream(self, run_id: str, after: int) -> AsyncIterator[RunEvent | None]:
        """One SSE response: its events, then None if it ended with ``end``.

        Raises the typed error for an error answer (RunNotFound, Unauthorized...),
        GatewayUnavailable for a broken connection or a 5xx.
        """
        headers = {**self._headers, "Accept": "text/event-stream"}
        # No total timeout: a run may stream for hours. Only connecting is bounded.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout_s)
        url = f"{self.base_url}/runs/{run_id}/events"
        try:
            async with self.session.get(url, params={"after": str(after)}, headers=headers,
                                        timeout=timeout) as response:
                if response.status >= 400:
                    raw = await response.read()
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        body = None
                    raise error_for(response.status, body)
                event_type = "message"
                data: list[str] = []
                async for line in _lines(response.content):
                    if line == "":
                        if event_type == "agent_data" and data:
                            yield RunEvent.from_json(json.loads("\n".join(data)))
                        elif event_type == "end":
                            yield None
                            return
                        event_type, data = "message", []
                    elif line.startswith("event:"):
                        event_type = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
        except (aiohttp.ClientError, ValueError) as exc:
            raise GatewayUnavailable(f"events of run {run_id}: {exc!r}") from exc


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[str]:
    """Lines without their end, bounded by MAX_EVENT_BYTES (aiohttp's readline caps at 128 KiB)."""
    parts: list[bytes] = []  # the line so far; joined once, not re-scanned per chunk
    size = 0
    async for chunk in stream.iter_any():
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            line = b"".join([*parts, piece]) if parts else piece
            parts, size = [], 0
            yield line.removesuffix(b"\r").decode()
        if rest:
            parts.append(rest)
            size += len(rest)
            if size > MAX_EVENT_BYTES:
                raise ValueError(f"an event stream line above {MAX_EVENT_BYTES} bytes")
