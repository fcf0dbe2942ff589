"""Wire constants: close codes, device error codes, HTTP error codes (PROTOCOL.md)."""

from __future__ import annotations

import enum
from typing import Final


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway sends (PROTOCOL.md §1.7)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # gateway shutting down
    POLICY = 1008  # auth, hello, abuse
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    REPLACED = 4000
    TOKEN_EXPIRED = 4001
    TOO_MANY_DEVICES = 4002


# `error` frame codes sent to devices (PROTOCOL.md §1.4).
BAD_FRAME: Final = "bad_frame"
UNKNOWN_CALL: Final = "unknown_call"
UNKNOWN_RUN: Final = "unknown_run"
RUN_FINISHED: Final = "run_finished"
AUTH_REFRESH_REJECTED: Final = "auth_refresh_rejected"

# Tool-call failure codes (PROTOCOL.md §2.2); also the `error` of HTTP bodies.
DEVICE_OFFLINE: Final = "device_offline"
DEVICE_DISCONNECTED: Final = "device_disconnected"
GATEWAY_SHUTDOWN: Final = "gateway_shutdown"
TIMEOUT: Final = "timeout"
TOO_MANY_CALLS: Final = "too_many_calls"
TOOL_ERROR: Final = "tool_error"

# HTTP error codes.
UNAUTHORIZED: Final = "unauthorized"
OVER_CAPACITY: Final = "over_capacity"
TOO_MANY_HANDSHAKES: Final = "too_many_handshakes"
SHUTTING_DOWN: Final = "shutting_down"
BAD_REQUEST: Final = "bad_request"
PAYLOAD_TOO_LARGE: Final = "payload_too_large"
NOT_FOUND: Final = "not_found"
METHOD_NOT_ALLOWED: Final = "method_not_allowed"
RUN_NOT_FOUND: Final = "run_not_found"
INTERNAL: Final = "internal_error"

# Run errors written to agent_run_logs.errors (PROTOCOL.md §1.7, §3.1).
RUN_ERROR_DEVICE_DISCONNECTED: Final = "device disconnected"
RUN_ERROR_GATEWAY_SHUTDOWN: Final = "gateway shutdown"
RUN_ERROR_GATEWAY_RESTARTED: Final = "gateway restarted"
