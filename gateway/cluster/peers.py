"""Calls to the other gateway processes' internal APIs: one pooled keep-alive session.

A tool call or a run dispatch for a device another process holds is sent to
that process's ``/internal/v1/peer/...`` route (its advertised URL, our first
service token), which serves it exactly as a local call and never forwards
again. Its status and body come back verbatim, so the service sees what a call
to the owner would have shown. When our caller goes away, our handler is
cancelled, and with it this request: the owner sees its client disconnect,
its handler is cancelled, and the device gets ``tool_cancel`` ``caller_gone``.
"""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import attrs
import orjson
import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

PEER_PREFIX = "/internal/v1/peer"
# Beyond the call's own max_timeout_s: the owner answers 504 itself first.
FORWARD_MARGIN_S = 5.0
CONNECT_TIMEOUT_S = 2.0
DISPATCH_TIMEOUT_S = 10.0
# Idle keep-alive connections kept per peer, and in all.
POOL_PER_HOST = 0  # unbounded: a busy peer needs as many as there are calls in flight
POOL_TOTAL = 0
KEEPALIVE_S = 60.0


class PeerUnreachable(Exception):
    """The owning process could not be reached at all (nothing was delivered)."""


class PeerFailed(Exception):
    """The request reached the owner but no answer came back (it went mid-call)."""


@attrs.frozen
class PeerAnswer:
    status: int
    body: bytes
    content_type: str


@attrs.define(eq=False)
class Peers:
    token: str
    _session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=POOL_TOTAL, limit_per_host=POOL_PER_HOST,
                                             keepalive_timeout=KEEPALIVE_S)
            self._session = aiohttp.ClientSession(
                connector=connector, json_serialize=lambda v: orjson.dumps(v).decode(),
                headers={"Authorization": f"Bearer {self.token}"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, url: str, body: Any, total_s: float) -> PeerAnswer:
        timeout = aiohttp.ClientTimeout(total=total_s, sock_connect=CONNECT_TIMEOUT_S)
        try:
            async with self._client().post(url, data=orjson.dumps(body), timeout=timeout,
                                           headers={"Content-Type": "application/json"}
                                           ) as resp:
                return PeerAnswer(resp.status, await resp.read(),
                                  resp.headers.get("Content-Type", "application/json"))
        except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as exc:
            raise PeerUnreachable(repr(exc)) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PeerFailed(repr(exc)) from None

    async def tool_call(self, base_url: str, body: dict[str, Any],
                        max_timeout_s: float) -> PeerAnswer:
        return await self._post(f"{base_url}{PEER_PREFIX}/tool-calls", body,
                                max_timeout_s + FORWARD_MARGIN_S)

    async def dispatch(self, base_url: str, run_id: uuid.UUID) -> PeerAnswer:
        return await self._post(f"{base_url}{PEER_PREFIX}/runs/{run_id}/dispatch", {},
                                DISPATCH_TIMEOUT_S)


PEERS = web.AppKey("peers", Peers)


async def dispatch_elsewhere(presence: Any, peers: Peers, run_id: uuid.UUID, user_id: str,
                             agent_id: str, device_id: str | None) -> bool:
    """A due run whose device is on another process: that process dispatches it.

    ``presence`` is the ``Presence`` (typed loosely: peers.py stays below it).
    False when no live process holds a fitting device, or it could not be
    reached: the run stays pending for the device's next hello (§3.3).
    """
    row = await presence.locate_agent(user_id, agent_id, device_id)
    if row is None or not row.advertise_url:
        return False
    try:
        answer = await peers.dispatch(row.advertise_url, run_id)
    except (PeerUnreachable, PeerFailed) as exc:
        log.warning("run_dispatch_forward_failed", run_id=str(run_id),
                    instance_id=row.instance_id, error=str(exc))
        return False
    log.info("run_dispatch_forwarded", run_id=str(run_id), instance_id=row.instance_id,
             status=answer.status)
    return answer.status == 200
