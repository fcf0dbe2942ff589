"""A gateway in the test's own event loop: real PostgreSQL, real sockets, real apps.

``make_gateway(**settings)`` (fixture in conftest) returns a ``Harness``:
the public app and the internal app each behind a real TCP test server,
sharing one ``Services``. Devices are real aiohttp WebSocket clients.
Import as ``from harness import ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import attrs
import jwt
import orjson
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import Gateway, build_internal_app, build_public_app, drain, open_gateway
from gateway.config import Secrets, Settings

JWT_SECRET = "test-jwt-secret-0123456789abcdef"
SERVICE_TOKEN = "test-service-token-0123456789"
OTHER_SERVICE_TOKEN = "test-service-token-rotated-987654"
WS_PATH = "/api/v1/ws/device"
RECV_TIMEOUT_S = 5.0


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "jwt_secret": JWT_SECRET,
        "internal_tokens": (SERVICE_TOKEN, OTHER_SERVICE_TOKEN),
        "instance_id": "test-instance",
        "app_ping": False,
        "public_port": 0,
        "internal_port": 0,
        "shutdown_timeout_s": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


def mint(sub: str = "user-1", *, ttl_s: float = 3600, secret: str = JWT_SECRET,
         algorithm: str = "HS256", **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl_s)}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, secret, algorithm=algorithm)


@attrs.define(eq=False)
class Device:
    """A device as the field's Electron app is: a WebSocket client speaking JSON frames."""

    ws: aiohttp.ClientWebSocketResponse
    user_id: str
    device_id: str
    hello_ack: dict[str, Any] | None = None

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            await self.ws.send_str(orjson.dumps(frame).decode())
        elif isinstance(frame, bytes):
            await self.ws.send_bytes(frame)
        else:
            await self.ws.send_str(frame)

    async def recv(self, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        """The next frame; fails the test if the socket closes instead."""
        # asyncio.timeout, not receive(timeout=): aiohttp restarts the latter on
        # every ping/pong it handles, so it never fires under a short heartbeat.
        async with asyncio.timeout(timeout):
            msg = await self.ws.receive()
        assert msg.type is aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg!r}"
        frame: dict[str, Any] = orjson.loads(msg.data)
        return frame

    async def recv_type(self, frame_type: str, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        """The next frame of ``frame_type``, skipping legacy pings."""
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if frame["type"] == frame_type:
                return frame
            assert frame["type"] == "ping", f"expected {frame_type}, got {frame}"

    async def expect_close(self, timeout: float = RECV_TIMEOUT_S) -> int | None:
        """Read until the socket closes; returns the close code."""
        deadline = time.monotonic() + timeout
        while True:
            async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                msg = await self.ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                # The close frame's own code (see test_device_ws.close_of for why).
                code: int = msg.data
                return code
            if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                return self.ws.close_code

    async def expect_silence(self, seconds: float = 0.2) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                msg = await self.ws.receive()
            raise AssertionError(f"expected no frame, got {msg!r}")

    async def close(self) -> None:
        await self.ws.close()

    def drop(self) -> None:
        """Lose the TCP connection: no close frame (a Wi-Fi blip, a sleeping laptop)."""
        connection = self.ws._response.connection
        assert connection is not None and connection.transport is not None
        connection.transport.abort()


@attrs.define(eq=False)
class Harness:
    svc: Gateway
    public: TestClient[Any, Any]
    internal: TestClient[Any, Any]

    @property
    def settings(self) -> Settings:
        return self.svc.settings

    async def connect(self, token: str | None = None, *, user_id: str = "user-1",
                      headers: dict[str, str] | None = None,
                      **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        """Only the WebSocket handshake (raises WSServerHandshakeError when refused)."""
        params = {} if token == "" else {"token": token or mint(user_id)}
        return await self.public.ws_connect(WS_PATH, params=params, headers=headers,
                                            autoping=True, **kwargs)

    async def device(self, user_id: str = "user-1", device_id: str = "device-1",
                     agent_ids: list[str] | None = None, *, token: str | None = None,
                     capabilities: list[str] | None = None) -> Device:
        """A connected device that said hello and got its hello_ack."""
        ws = await self.connect(token or mint(user_id))
        device = Device(ws, user_id, device_id)
        hello: dict[str, Any] = {"type": "device_hello", "device_id": device_id}
        if agent_ids is not None:
            hello["agent_ids"] = agent_ids
        if capabilities is not None:
            hello["capabilities"] = capabilities
        await device.send(hello)
        device.hello_ack = await device.recv_type("hello_ack")
        return device

    async def api(self, method: str, path: str, body: Any = None, *,
                  token: str | None = SERVICE_TOKEN, raw: bytes | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """Call the internal API; returns (status, decoded JSON body)."""
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        async with self.internal.request(method, f"/internal/v1{path}", data=data,
                                         headers=all_headers) as response:
            text = await response.read()
            try:
                decoded = orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                decoded = text.decode(errors="replace")
            return response.status, decoded

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> None:
        """Poll a condition of the gateway's state (not a timing assertion)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not reached in time"
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings) -> Any:
    """Services + both apps on real sockets; drained and closed in order afterwards."""
    assert settings.database_url is not None
    secrets = Secrets(jwt_secret=settings.jwt_secret, internal_tokens=settings.internal_tokens)
    async with open_gateway(settings, secrets, settings.database_url) as svc:
        public = TestClient(TestServer(build_public_app(svc)))
        internal = TestClient(TestServer(build_internal_app(svc), handler_cancellation=True))
        await public.start_server()
        await internal.start_server()
        # Where sibling gateways forward to (serve() does this with its listener).
        await svc.presence.advertise(f"http://{internal.host}:{internal.port}")
        try:
            yield Harness(svc, public, internal)
        finally:
            svc.draining = True
            try:
                async with asyncio.timeout(settings.shutdown_timeout_s):
                    await drain(svc)
            finally:
                await internal.close()
                await public.close()
