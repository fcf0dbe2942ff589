"""GATEWAY_WS_COMPRESS (PROTOCOL.md §4): permessage-deflate only when enabled.

Real devices offer it (Chromium and Node's ``ws`` do by default); accepting it
costs ~100 KB of deflate state per device, so the default refuses it and the
devices fall back to plain frames. When enabled, the frame limit applies to
the inflated message: a small compressed frame must not inflate past it.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from harness import WS_PATH, Harness, mint

MakeGateway = Callable[..., Awaitable[Harness]]


async def _raw_upgrade(gateway: Harness, extensions: str) -> dict[str, str]:
    """The 101's headers for a handshake offering ``extensions`` (read at the socket)."""
    host, port = gateway.public.host, gateway.public.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write((
            f"GET {WS_PATH}?token={mint('user-1')} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Extensions: {extensions}\r\n\r\n").encode())
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 101"), lines[0]
    return {k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in lines[1:] if line)}


async def _hello(ws: aiohttp.ClientWebSocketResponse, device_id: str) -> None:
    await ws.send_str(orjson.dumps({"type": "device_hello", "device_id": device_id}).decode())
    async with asyncio.timeout(5):
        msg = await ws.receive()
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    assert orjson.loads(msg.data)["type"] == "hello_ack", msg.data


async def test_default_refuses_deflate_and_plain_frames_work(gateway: Harness) -> None:
    """By default the 101 names no extension, and the client speaks plain frames."""
    assert gateway.settings.ws_compress is False
    offer = "permessage-deflate; client_max_window_bits"  # what Node's ws sends
    headers = await _raw_upgrade(gateway, offer)
    assert "sec-websocket-extensions" not in headers, headers

    ws = await gateway.connect(mint("user-1"), compress=15)  # offers deflate too
    assert ws.compress == 0, ws.compress  # nothing was negotiated
    await _hello(ws, "d1")
    await ws.send_str(orjson.dumps({"type": "ping"}).decode())
    async with asyncio.timeout(5):
        msg = await ws.receive()
    assert orjson.loads(msg.data) == {"type": "pong"}
    await ws.close()


async def test_enabled_negotiates_deflate(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(ws_compress=True)
    headers = await _raw_upgrade(gateway, "permessage-deflate; client_max_window_bits")
    assert headers.get("sec-websocket-extensions", "").startswith("permessage-deflate"), headers

    ws = await gateway.connect(mint("user-1"), compress=15)
    assert ws.compress == 15, ws.compress
    await _hello(ws, "d1")
    await ws.send_str(orjson.dumps({"type": "ping", "pad": "x" * 500}).decode())
    async with asyncio.timeout(5):
        msg = await ws.receive()
    assert orjson.loads(msg.data) == {"type": "pong"}
    await ws.close()


async def test_deflate_bomb_closes_1009(make_gateway: MakeGateway) -> None:
    """A small compressed frame inflating past the limit closes 1009; others carry on."""
    limit = 64 * 1024
    gateway = await make_gateway(ws_compress=True, max_frame_bytes=limit)
    bystander = await gateway.connect(mint("user-2"), compress=15)
    await _hello(bystander, "d2")

    ws = await gateway.connect(mint("user-1"), compress=15)
    assert ws.compress == 15  # the frame below really is sent compressed
    await _hello(ws, "d1")
    bomb = orjson.dumps({"type": "ping", "pad": "x" * (16 * limit)})
    assert len(zlib.compress(bomb)) < limit // 16  # on the wire it is small
    await ws.send_str(bomb.decode())
    async with asyncio.timeout(5):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                assert msg.data == 1009, (msg.data, msg.extra)
                break
            assert msg.type is not aiohttp.WSMsgType.TEXT, msg.data
            if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                assert ws.close_code == 1009, ws.close_code
                break
    await gateway.wait_for(lambda: len(gateway.svc.registry) == 1)

    # The process is unharmed: the bystander still answers, a new device connects.
    await bystander.send_str(orjson.dumps({"type": "ping"}).decode())
    async with asyncio.timeout(5):
        msg = await bystander.receive()
    assert orjson.loads(msg.data) == {"type": "pong"}
    again = await gateway.connect(mint("user-3"), compress=15)
    await _hello(again, "d3")
    await again.close()
    await bystander.close()
