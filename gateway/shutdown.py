"""Whether the process is draining, and by when it must be gone.

Set once by the composition root when a stop signal arrives; read by the
handshake (503 ``shutting_down``), the internal API (503 ``gateway_shutdown``),
event streams (cut short) and /readyz, and by every teardown step that must
keep to the one budget of ``GATEWAY_SHUTDOWN_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio

import attrs
from aiohttp import web


@attrs.define(eq=False)
class Shutdown:
    draining: bool = False
    # Loop time by which a stopping gateway must be gone; None while serving.
    deadline: float | None = None

    def begin(self, budget_s: float) -> None:
        """The stop signal came: drain, and be gone within ``budget_s``."""
        self.draining = True
        self.deadline = asyncio.get_running_loop().time() + budget_s

    def time_left(self, default: float) -> float:
        """Seconds until the deadline (``default`` when no stop is under way)."""
        if self.deadline is None:
            return default
        return max(0.0, self.deadline - asyncio.get_running_loop().time())


SHUTDOWN = web.AppKey("shutdown", Shutdown)
