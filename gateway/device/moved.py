"""A device that said hello to another gateway process: let this connection of it go.

The process taking the device over NOTIFYs (``gateway/cluster/notify.py``);
this closes our connection with 4000 and, without waiting for the close
handshake, fails its pending calls, detaches its runs and deletes its presence
row, which is what the new process waits for before it resumes those runs.
"""

from __future__ import annotations

import structlog

from gateway.cluster.presence import Presence
from gateway.device.registry import Registry
from gateway.runs.lifecycle import Runs
from gateway.wire import codes
from gateway.wire.codes import CloseCode

log = structlog.get_logger(__name__)


async def let_go(registry: Registry, runs: Runs, presence: Presence, *, user_id: str,
                 device_id: str, connection_id: str) -> bool:
    """True when we held that connection and let it go."""
    conn = registry.get(user_id, device_id)
    if conn is None or conn.connection_id != connection_id:
        return False
    log.info("device_replaced_remotely", user_id=user_id, device_id=device_id,
             connection_id=connection_id)
    registry.remove(conn)
    conn.request_close(CloseCode.REPLACED, "replaced")
    conn.fail_pending(codes.DEVICE_DISCONNECTED, "the device disconnected")
    async with runs.continuity.turn(user_id, device_id):
        await runs.target_gone(conn, codes.RUN_ERROR_DEVICE_DISCONNECTED)
    await presence.device_down(conn)
    return True
