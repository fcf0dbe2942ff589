"""A token bucket per connection for frames that cost the gateway more than a reply.

``auth_refresh`` (a signature check and a log line), a repeated
``device_hello`` (a query for pending runs) and a frame for a run the
connection does not own (a query to tell ``unknown_run`` from
``run_finished``) were free to repeat at any rate.
"""

from __future__ import annotations

import time

import attrs


@attrs.define
class Allowance:
    """``burst`` at once, refilled at ``per_minute``."""

    per_minute: float
    burst: float
    _tokens: float = attrs.field(init=False)
    _at: float = attrs.field(init=False, factory=time.monotonic)

    def __attrs_post_init__(self) -> None:
        self._tokens = self.burst

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_minute / 60)
        self._at = now

    def take(self) -> bool:
        """Spend one; False (nothing spent) when none is left."""
        self._refill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    @property
    def exhausted(self) -> bool:
        self._refill()
        return self._tokens < 1
