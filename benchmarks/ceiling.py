"""The ceiling: the same three jobs in bare aiohttp, with no auth, no database, no logging.

- ``GET /api/v1/ws/device``: a WebSocket that takes a ``device_hello``, answers
  ``hello_ack`` and keeps the device in a dict; ``tool_result`` frames resolve
  their call; ``agent_data`` frames are JSON-decoded and discarded;
  ``agent_complete`` is answered with ``{"type": "run_done"}``.
- ``POST /internal/v1/tool-calls``: forwards ``tool_call`` to the device over
  its WebSocket and returns the device's answer (HTTP→WS→HTTP echo).
- ``GET /internal/v1/devices``: presence, for the cleanup scenario.

It mirrors what a gateway with zero features of its own would cost: the same
aiohttp, the same heartbeat settings, the same orjson, the same event loop
choice (uvloop when installed). ``python -m benchmarks.ceiling --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from benchmarks.servers import LOOPBACK, raise_nofile_limit

HEARTBEAT_S = 30.0
HELLO_TIMEOUT_S = 15.0
MAX_FRAME_BYTES = 4 * 1024 * 1024


class DeviceGone(Exception):
    pass


@dataclass(eq=False)
class Device:
    device_id: str
    user_id: str
    ws: web.WebSocketResponse
    pending: dict[str, asyncio.Future[Any]] = field(default_factory=dict)


@dataclass
class State:
    devices: dict[str, Device] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=itertools.count)


STATE = web.AppKey("state", State)
# Mirrors GATEWAY_WS_COMPRESS (off by default): whether permessage-deflate is negotiated.
COMPRESS = web.AppKey("compress", bool)


async def device_ws(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, autoping=True,
                               max_msg_size=MAX_FRAME_BYTES, decode_text=False,
                               compress=request.app[COMPRESS])
    await ws.prepare(request)
    try:
        msg = await ws.receive(timeout=HELLO_TIMEOUT_S)
    except TimeoutError:
        await ws.close(code=1008)
        return ws
    if msg.type is not WSMsgType.TEXT:
        await ws.close(code=1008)
        return ws
    hello = orjson.loads(msg.data)
    device = Device(str(hello["device_id"]), request.query.get("user_id", ""), ws)
    previous = state.devices.get(device.device_id)
    state.devices[device.device_id] = device
    if previous is not None:
        await previous.ws.close(code=4000)
    await ws.send_frame(b'{"type":"hello_ack"}', WSMsgType.TEXT)
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            frame = orjson.loads(msg.data)
            kind = frame.get("type")
            if kind == "tool_result":
                future = device.pending.pop(frame.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(frame)
            elif kind == "agent_complete":
                await ws.send_frame(
                    orjson.dumps({"type": "run_done", "run_id": frame.get("run_id")}),
                    WSMsgType.TEXT)
            # agent_data: decoded above, discarded.
    finally:
        if state.devices.get(device.device_id) is device:
            del state.devices[device.device_id]
        for future in device.pending.values():
            if not future.done():
                future.set_exception(DeviceGone())
    return ws


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def tool_call(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = orjson.loads(await request.read())
    device = state.devices.get(body.get("device_id", ""))
    if device is None:
        return _json({"error": "device_offline"}, 404)
    call_id = str(next(state.ids))
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    device.pending[call_id] = future
    try:
        await device.ws.send_frame(orjson.dumps({
            "type": "tool_call", "id": call_id, "tool": body.get("tool"),
            "args": body.get("args", {}), "timeout_ms": 30000,
        }), WSMsgType.TEXT)
        async with asyncio.timeout(float(body.get("timeout_s", 30))):
            frame = await future
    except DeviceGone:
        return _json({"error": "device_disconnected"}, 503)
    except TimeoutError:
        return _json({"error": "timeout"}, 504)
    finally:
        device.pending.pop(call_id, None)
    return _json({"call_id": call_id, "device_id": device.device_id, "ok": True,
                  "result": frame.get("result")})


async def devices(request: web.Request) -> web.Response:
    user_id = request.query.get("user_id", "")
    return _json({"devices": [{"device_id": d.device_id, "user_id": d.user_id}
                              for d in request.app[STATE].devices.values()
                              if d.user_id == user_id]})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def build_app(*, compress: bool = False) -> web.Application:
    app = web.Application()
    app[STATE] = State()
    app[COMPRESS] = compress
    app.router.add_get("/api/v1/ws/device", device_ws)
    app.router.add_post("/internal/v1/tool-calls", tool_call)
    app.router.add_get("/internal/v1/devices", devices)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--compress", action="store_true",
                        help="negotiate permessage-deflate (like GATEWAY_WS_COMPRESS=true)")
    args = parser.parse_args()
    raise_nofile_limit()
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(args.port, args.compress))


async def _serve(port: int, compress: bool) -> None:
    runner = web.AppRunner(build_app(compress=compress), access_log=None, handle_signals=False,
                           shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, port, backlog=4096).start()  # as the gateway's
    print(f"ceiling listening on {LOOPBACK}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
