"""A device simulator: what an Electron device does, for people trying the gateway and tests.

It says hello, answers the built-in tools ``echo`` (returns its args),
``sleep`` (``{"seconds": S}``, with a tool_progress every second) and
``fail`` (a tool error), runs the built-in agent ``stream`` (``{"events": N,
"size": B}``: N agent_data events of B bytes, then agent_complete), answers
``ping`` with ``pong``, and logs every frame.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import attrs
import orjson
import structlog

log = structlog.get_logger("gateway.simulator")

MAX_SLEEP_S = 3600.0


@attrs.frozen
class SimulatorOptions:
    url: str
    token: str
    device_id: str
    agent_ids: tuple[str, ...] = ("stream",)
    verbose: bool = True


@attrs.define(eq=False)
class Simulator:
    ws: aiohttp.ClientWebSocketResponse
    verbose: bool
    _work: dict[str, asyncio.Task[None]] = attrs.Factory(dict)

    async def send(self, frame: dict[str, Any]) -> None:
        if self.verbose:
            log.info("frame_out", frame=_shorten(frame))
        await self.ws.send_str(orjson.dumps(frame).decode())

    def start(self, key: str, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._work[key] = task
        task.add_done_callback(lambda _t: self._work.pop(key, None))

    def stop(self, key: str) -> None:
        task = self._work.get(key)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        for task in list(self._work.values()):
            task.cancel()
        await asyncio.gather(*self._work.values(), return_exceptions=True)

    async def on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "ping":
            await self.send({"type": "pong"})
        elif kind == "tool_call":
            self.start(f"call:{frame['id']}", self.run_tool(frame))
        elif kind == "tool_cancel":
            self.stop(f"call:{frame['id']}")
        elif kind == "agent_run":
            self.start(f"run:{frame['run_id']}", self.run_agent(frame))
        elif kind == "agent_cancel":
            self.stop(f"run:{frame['run_id']}")

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

    async def run_agent(self, frame: dict[str, Any]) -> None:
        run_id = frame["run_id"]
        given = frame.get("input")
        spec: dict[str, Any] = given if isinstance(given, dict) else {}
        count = int(spec.get("events", 10))
        payload = "x" * int(spec.get("size", 16))
        delay = float(spec.get("delay_s", 0))
        for i in range(1, count + 1):
            await self.send({"type": "agent_data", "run_id": run_id,
                             "data": {"i": i, "payload": payload}})
            if delay:
                await asyncio.sleep(delay)
        await self.send({"type": "agent_complete", "run_id": run_id, "status": "completed",
                         "result": {"events": count}})


def _shorten(frame: dict[str, Any]) -> dict[str, Any]:
    text = orjson.dumps(frame)
    return frame if len(text) <= 300 else {"type": frame.get("type"), "bytes": len(text)}


async def run_simulator(options: SimulatorOptions) -> int:
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(options.url, params={"token": options.token},
                                          heartbeat=30, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            log.error("device_handshake_refused", status=exc.status, detail=exc.message)
            return 1
        except aiohttp.ClientError as exc:
            log.error("device_connect_failed", error=str(exc))
            return 1
        simulator = Simulator(ws, options.verbose)
        await simulator.send({"type": "device_hello", "device_id": options.device_id,
                              "agent_ids": list(options.agent_ids)})
        try:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                frame = orjson.loads(msg.data)
                if options.verbose:
                    log.info("frame_in", frame=_shorten(frame))
                await simulator.on_frame(frame)
        finally:
            await simulator.close()
            with contextlib.suppress(Exception):
                await ws.close()
        log.info("device_closed", close_code=ws.close_code)
        return 0
