"""Frames from devices: decoding and per-type parsing into attrs values.

Every parser either returns a typed value or raises ``FrameError`` with a
message a device author can act on. Shape is checked here, before any
ownership question is asked (PROTOCOL.md §1.4).
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
import orjson

from gateway.wire import codes

MAX_ID_CHARS = 256
MAX_AGENT_IDS = 256
MAX_CALL_ID_CHARS = 256
MAX_CAPABILITIES = 32
MAX_CAPABILITY_CHARS = 64
EVENT_ACKS = "event_acks"
# C0 controls, DEL and C1 controls are refused in ids; anything printable is kept
# because field devices send machine ids and host names.
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")
_RUN_STATUSES_FROM_DEVICE = ("completed", "error")
# PROTOCOL.md §1.4: a value at most 128 arrays/objects deep, `[1]` being 1 deep.
# orjson reads up to 1024 levels but writes at most 255, so a deeper value was
# accepted and then failed to serialise (1011, 500).
MAX_NESTING = 128
# orjson keeps integers within i64/u64 and silently turns larger ones into
# floats. Every integer of at most 18 digits fits, so only a run of 19 or more
# digits (rare, and also matched inside strings and fractions) asks for the
# exact, slower check. One translate finds both that and the brackets: digits
# become "0", "[" and "{" become "[", all else "x" (a sixth of a regex's cost).
_SHAPE = bytes(0x30 if 0x30 <= c <= 0x39 else 0x5B if c in (0x5B, 0x7B) else 0x78
               for c in range(256))
_LONG_DIGITS = b"0" * 19
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
BIG_INTEGER = "integers beyond 64 bits are not supported"


class FrameError(Exception):
    """A refused frame: answered with an ``error`` frame, the connection stays."""

    def __init__(self, message: str, *, ref: str | None, code: str = codes.BAD_FRAME) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


# Frame and AgentData are built once per event on the ingest path: they are
# values (nothing assigns to them), declared with attrs.define because a frozen
# class's __init__ sets each field through object.__setattr__, three times as
# slow (benchmarks/RESULTS.md, ingest round four).
@attrs.define
class Frame:
    """A decoded frame: its type and its fields, not yet checked per type."""

    type: str
    fields: dict[str, Any]
    # The raw text had a \u0000 escape somewhere: values stored as jsonb must be
    # walked, since PostgreSQL refuses NUL in jsonb strings.
    may_hold_nul: bool


class _BigInteger(ValueError):
    pass


def _exact_int(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise _BigInteger(text)
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests arrays/objects deeper than ``limit``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False


def text_problem(raw: bytes | str, value: Any, *, envelope_levels: int = 1) -> str | None:
    """Why a decoded JSON text cannot be kept as sent, or None.

    ``envelope_levels``: levels of ``value`` around the fields the 128-level
    bound is about (a frame or a request body is itself one object). Both
    checks start with a scan of the text that is cheap next to the decoding
    (the event path is hot) and walk or re-read only when that scan hits.
    """
    limit = MAX_NESTING + envelope_levels
    shape = (raw if isinstance(raw, bytes) else raw.encode()).translate(_SHAPE)
    if shape.count(b"[") > limit and _depth_exceeds(value, limit):
        return f"values must not be nested deeper than {MAX_NESTING} levels"
    if _LONG_DIGITS in shape:
        try:
            json.loads(raw, parse_int=_exact_int)
        except _BigInteger:
            return BIG_INTEGER
        except (ValueError, RecursionError):  # orjson read it; its reading stands
            return None
    return None


def decode(raw: bytes | str) -> Frame:
    """JSON text → Frame; raises FrameError(ref=None) when the envelope is unreadable."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"invalid JSON: {exc}", ref=None) from None
    if not isinstance(value, dict):
        raise FrameError("a frame must be a JSON object", ref=None)
    frame_type = value.get("type")
    if not isinstance(frame_type, str):
        raise FrameError("a frame needs a string field 'type'", ref=None)
    if problem := text_problem(raw, value):
        raise FrameError(problem, ref=frame_type)
    # One byte is found with memchr; the six-byte search runs only if a frame
    # has escapes at all.
    if isinstance(raw, bytes):
        may_hold_nul = b"\\" in raw and b"\\u0000" in raw
    else:
        may_hold_nul = "\\" in raw and "\\u0000" in raw
    return Frame(frame_type, value, may_hold_nul)


# ---------------------------------------------------------------- field checks


def id_problem(value: Any, *, limit: int = MAX_ID_CHARS) -> str | None:
    """Why a device/agent id is unacceptable, or None (PROTOCOL.md §1.2)."""
    if not isinstance(value, str):
        return "must be a string"
    if not 1 <= len(value) <= limit:
        return f"must be 1-{limit} characters"
    if _CONTROL_CHARS.search(value):
        return "must not contain control characters"
    if not value.strip():
        return "must not be only whitespace"
    return None


def jsonb_problem(value: Any) -> str | None:
    """Why PostgreSQL jsonb cannot store a decoded JSON value, or None.

    orjson already refuses NaN/Infinity and unpaired surrogates; what remains
    is NUL inside strings and keys.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "strings must not contain \\u0000"
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    return "keys must not contain \\u0000"
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _required_str(frame: Frame, name: str, *, limit: int = MAX_CALL_ID_CHARS) -> str:
    value = frame.fields.get(name)
    if not isinstance(value, str) or not value:
        raise FrameError(f"'{name}' must be a non-empty string", ref=frame.type)
    if len(value) > limit:
        raise FrameError(f"'{name}' must be at most {limit} characters", ref=frame.type)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _storable(frame: Frame, name: str, value: Any) -> None:
    if frame.may_hold_nul and (problem := jsonb_problem(value)):
        raise FrameError(f"'{name}' cannot be stored: {problem}", ref=frame.type)


# ---------------------------------------------------------------- frame values


@attrs.frozen
class Hello:
    device_id: str
    agent_ids: tuple[str, ...]
    # Protocol extensions the device understands; unknown ones are kept and ignored.
    capabilities: frozenset[str] = frozenset()

    @property
    def event_acks(self) -> bool:
        return EVENT_ACKS in self.capabilities


def parse_hello(frame: Frame) -> Hello:
    if frame.type != "device_hello":
        raise FrameError("the first frame must be device_hello", ref=frame.type)
    device_id = frame.fields.get("device_id")
    if problem := id_problem(device_id):
        raise FrameError(f"'device_id' {problem}", ref=frame.type)
    agent_ids = frame.fields.get("agent_ids")
    if agent_ids is None:
        agent_ids = []
    if not isinstance(agent_ids, list):
        raise FrameError("'agent_ids' must be a list of strings", ref=frame.type)
    if len(agent_ids) > MAX_AGENT_IDS:
        raise FrameError(f"'agent_ids' may hold at most {MAX_AGENT_IDS} ids", ref=frame.type)
    for agent_id in agent_ids:
        if problem := id_problem(agent_id):
            raise FrameError(f"each agent id {problem}", ref=frame.type)
    capabilities = frame.fields.get("capabilities")
    if capabilities is None:
        capabilities = []
    if (not isinstance(capabilities, list) or len(capabilities) > MAX_CAPABILITIES
            or not all(isinstance(c, str) and 0 < len(c) <= MAX_CAPABILITY_CHARS
                       for c in capabilities)):
        raise FrameError(f"'capabilities' must be a list of at most {MAX_CAPABILITIES} "
                         f"strings of 1-{MAX_CAPABILITY_CHARS} characters", ref=frame.type)
    assert isinstance(device_id, str)
    # Order kept, duplicates dropped: agent_ids is a set with a stable display order.
    return Hello(device_id, tuple(dict.fromkeys(agent_ids)), frozenset(capabilities))


@attrs.frozen
class ToolResult:
    id: str
    ok: bool
    result: Any
    error_code: str
    error_message: str


def parse_tool_result(frame: Frame) -> ToolResult:
    call_id = _required_str(frame, "id")
    error = frame.fields.get("error")
    if error is None:
        # The seed passed any tool_result through; a tool with nothing to
        # return may send neither field, which reads as `result: null`.
        return ToolResult(call_id, True, frame.fields.get("result"), "", "")
    if isinstance(error, str):
        return ToolResult(call_id, False, None, codes.TOOL_ERROR, error)
    if isinstance(error, dict):
        code = error.get("code", codes.TOOL_ERROR)
        message = error.get("message", "")
        if not isinstance(code, str) or not code or not isinstance(message, str):
            raise FrameError(
                "'error' object needs a non-empty string 'code' and a string 'message'",
                ref=frame.type,
            )
        return ToolResult(call_id, False, None, code, message)
    raise FrameError("'error' must be a string or {\"code\", \"message\"}", ref=frame.type)


@attrs.frozen
class ToolProgress:
    id: str
    progress: float | None
    message: str | None


def parse_tool_progress(frame: Frame) -> ToolProgress:
    call_id = _required_str(frame, "id")
    progress = frame.fields.get("progress")
    if progress is not None and not _is_number(progress):
        raise FrameError("'progress' must be a number", ref=frame.type)
    message = frame.fields.get("message")
    if message is not None and not isinstance(message, str):
        raise FrameError("'message' must be a string", ref=frame.type)
    return ToolProgress(call_id, progress, message)


@attrs.define  # one per event: see Frame
class AgentData:
    run_id: str
    data: Any
    seq: int | None  # required, and checked, only under event_acks (PROTOCOL.md §1.8)


def parse_agent_data(frame: Frame) -> AgentData:
    # Once per event: the fields are read once each and _storable is called only
    # when the frame has a \u0000 escape at all.
    fields = frame.fields
    run_id = _required_str(frame, "run_id")
    try:
        data = fields["data"]
    except KeyError:
        raise FrameError("'data' is required", ref=frame.type) from None
    seq = fields.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
        raise FrameError("'seq' must be an integer", ref=frame.type)
    if frame.may_hold_nul:
        _storable(frame, "data", data)
    return AgentData(run_id, data, seq)


@attrs.frozen
class AgentComplete:
    run_id: str
    status: str
    errors: tuple[str, ...]
    result: Any
    has_result: bool


def parse_agent_complete(frame: Frame) -> AgentComplete:
    run_id = _required_str(frame, "run_id")
    status = frame.fields.get("status")
    if status is None:
        status = "completed"
    if status not in _RUN_STATUSES_FROM_DEVICE:
        raise FrameError("'status' must be 'completed' or 'error'", ref=frame.type)
    errors = frame.fields.get("errors")
    if errors is None:
        errors = []
    if not isinstance(errors, list) or not all(isinstance(e, str) for e in errors):
        raise FrameError("'errors' must be a list of strings", ref=frame.type)
    _storable(frame, "errors", errors)
    result = frame.fields.get("result")
    _storable(frame, "result", result)
    return AgentComplete(run_id, status, tuple(errors), result, "result" in frame.fields)


@attrs.frozen
class AuthRefresh:
    token: str


def parse_auth_refresh(frame: Frame) -> AuthRefresh:
    token = frame.fields.get("token")
    if not isinstance(token, str) or not token:
        raise FrameError("'token' must be a non-empty string", ref=frame.type)
    return AuthRefresh(token)
