"""Frames to devices (PROTOCOL.md §1.5), built as UTF-8 JSON bytes ready to send."""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

import orjson

# Constant frames are serialised once.
PING: Final = b'{"type":"ping"}'
PONG: Final = b'{"type":"pong"}'


_TYPE_PREFIX = b'{"type":"'


def frame_type(frame: bytes) -> str:
    """The type of a frame built here (each starts with its "type" key)."""
    if not frame.startswith(_TYPE_PREFIX):
        return "unknown"
    end = frame.find(b'"', len(_TYPE_PREFIX))
    return frame[len(_TYPE_PREFIX):end].decode() if end > 0 else "unknown"


def hello_ack(*, connection_id: str, heartbeat_s: float) -> bytes:
    return orjson.dumps({
        "type": "hello_ack",
        "connection_id": connection_id,
        "heartbeat_s": int(heartbeat_s) if float(heartbeat_s).is_integer() else heartbeat_s,
        "server_time": dt.datetime.now(dt.UTC).isoformat(),
    })


def tool_call(*, call_id: str, tool: str, args: Any, timeout_s: float) -> bytes:
    return orjson.dumps({
        "type": "tool_call", "id": call_id, "tool": tool, "args": args,
        # round, not int(): 1.005 s * 1000 is 1004.999… in binary floating point.
        "timeout_ms": round(timeout_s * 1000),
    })


def tool_cancel(*, call_id: str, reason: str) -> bytes:
    return orjson.dumps({"type": "tool_cancel", "id": call_id, "reason": reason})


def agent_run(*, run_id: str, agent_id: str, input_json: str) -> bytes:
    return orjson.dumps({
        "type": "agent_run", "run_id": run_id, "agent_id": agent_id,
        "input": orjson.Fragment(input_json),
    })


def agent_cancel(*, run_id: str, reason: str) -> bytes:
    return orjson.dumps({"type": "agent_cancel", "run_id": run_id, "reason": reason})


def error(*, code: str, message: str, ref: str | None) -> bytes:
    return orjson.dumps({"type": "error", "code": code, "message": message, "ref": ref})
