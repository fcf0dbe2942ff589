"""Registry of live device connections, keyed by (user_id, device_id)."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
from aiohttp import web

from gateway.device.connection import Connection

# Agent-id lists shared between connections (see ``register``): at most this
# many distinct ones, of at most this many ids each (with ids of at most 256
# characters, what is held for ever stays under 512 KiB); any other list stays
# its connection's own.
MAX_SHARED_AGENT_LISTS = 256
MAX_SHARED_AGENT_IDS = 8


@attrs.define
class Registry:
    """Who is connected. Held in an AppKey; tests build fresh ones."""

    _by_user: dict[str, dict[str, Connection]] = attrs.Factory(dict)
    _count: int = 0
    # One tuple per distinct agent-id list, for every connection advertising it:
    # a fleet runs few kinds of agent, and a tuple of strings per device is
    # memory per idle device. Bounded, never pruned.
    _agent_lists: dict[tuple[str, ...], tuple[str, ...]] = attrs.Factory(dict)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Connection]:
        for devices in list(self._by_user.values()):
            yield from list(devices.values())

    def get(self, user_id: str, device_id: str) -> Connection | None:
        return self._by_user.get(user_id, {}).get(device_id)

    def devices_of(self, user_id: str) -> list[Connection]:
        """The user's connections, oldest first."""
        return sorted(self._by_user.get(user_id, {}).values(), key=lambda c: c.connected_at)

    def other_device_count(self, user_id: str, device_id: str) -> int:
        """Devices the user holds besides ``device_id`` (ones already closing don't count)."""
        devices = self._by_user.get(user_id, {})
        return sum(1 for d, c in devices.items() if d != device_id and not c.closing)

    def register(self, conn: Connection) -> Connection | None:
        """Make ``conn`` the current connection of its device; returns the one it replaces."""
        shared = self._agent_lists.get(conn.agent_ids)
        if shared is not None:
            conn.agent_ids = shared
        elif (len(self._agent_lists) < MAX_SHARED_AGENT_LISTS
              and len(conn.agent_ids) <= MAX_SHARED_AGENT_IDS):
            self._agent_lists[conn.agent_ids] = conn.agent_ids
        devices = self._by_user.setdefault(conn.user_id, {})
        previous = devices.get(conn.device_id)
        if previous is None:
            self._count += 1
        devices[conn.device_id] = conn
        return previous

    def remove(self, conn: Connection) -> bool:
        """Unregister ``conn`` only if it is still the current one (never its replacement)."""
        devices = self._by_user.get(conn.user_id)
        if devices is None or devices.get(conn.device_id) is not conn:
            return False
        del devices[conn.device_id]
        self._count -= 1
        if not devices:
            del self._by_user[conn.user_id]
        return True

    def pick(self, user_id: str, device_id: str | None) -> Connection | None:
        """The named device, or the user's most recently connected one."""
        if device_id is not None:
            conn = self.get(user_id, device_id)
            return conn if conn is not None and not conn.closing else None
        candidates = [c for c in self._by_user.get(user_id, {}).values() if not c.closing]
        return max(candidates, key=lambda c: c.connected_at, default=None)

    def locate_agent(
        self, user_id: str, agent_id: str, device_id: str | None
    ) -> Connection | None:
        """A live connection of the user that advertises ``agent_id`` (newest first)."""
        candidates = [
            c for c in self._by_user.get(user_id, {}).values()
            if not c.closing and agent_id in c.agent_ids
            and (device_id is None or c.device_id == device_id)
        ]
        return max(candidates, key=lambda c: c.connected_at, default=None)


REGISTRY = web.AppKey("registry", Registry)
