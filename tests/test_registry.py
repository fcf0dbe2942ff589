"""``gateway.device.registry``: who is connected, and agent-id lists shared."""

from __future__ import annotations

import attrs

from gateway.device.connection import Connection
from gateway.device.registry import MAX_SHARED_AGENT_IDS, MAX_SHARED_AGENT_LISTS, Registry


@attrs.define
class NoSocket:
    async def send(self, frame: bytes) -> None:
        raise AssertionError("nothing is sent here")

    async def close(self, code: int, reason: str) -> None:
        raise AssertionError("nothing is closed here")


def connection(user_id: str, device_id: str, agent_ids: list[str]) -> Connection:
    # A fresh tuple of fresh strings, as each device_hello's parse makes.
    return Connection(user_id=user_id, device_id=device_id,
                      agent_ids=tuple("".join(a) for a in agent_ids),
                      socket=NoSocket(), max_inflight_calls=4)


async def test_connections_advertising_the_same_agents_share_one_list() -> None:
    registry = Registry()
    first = connection("u1", "d1", ["coder", "browser"])
    second = connection("u2", "d2", ["coder", "browser"])
    other = connection("u3", "d3", ["browser", "coder"])  # another order: another list
    for conn in (first, second, other):
        registry.register(conn)
    assert second.agent_ids is first.agent_ids == ("coder", "browser")
    assert other.agent_ids == ("browser", "coder") and other.agent_ids is not first.agent_ids
    assert registry.locate_agent("u2", "coder", None) is second


async def test_shared_lists_are_bounded() -> None:
    registry = Registry()
    for i in range(MAX_SHARED_AGENT_LISTS + 10):
        registry.register(connection(f"u{i}", "d", [f"agent-{i}"]))
    late_a = connection("late-a", "d", [f"agent-{MAX_SHARED_AGENT_LISTS + 5}"])
    late_b = connection("late-b", "d", [f"agent-{MAX_SHARED_AGENT_LISTS + 5}"])
    registry.register(late_a)
    registry.register(late_b)
    # Past the bound a list is its connection's own: equal, not shared, and it works.
    assert late_a.agent_ids == late_b.agent_ids and late_a.agent_ids is not late_b.agent_ids
    assert len(registry._agent_lists) == MAX_SHARED_AGENT_LISTS
    assert registry.locate_agent("late-b", f"agent-{MAX_SHARED_AGENT_LISTS + 5}", None) is late_b


async def test_long_lists_are_not_kept_for_ever() -> None:
    registry = Registry()
    agents = [f"agent-{i}" for i in range(MAX_SHARED_AGENT_IDS + 1)]
    first, second = connection("u1", "d1", agents), connection("u2", "d2", agents)
    registry.register(first)
    registry.register(second)
    assert first.agent_ids == second.agent_ids and first.agent_ids is not second.agent_ids
    assert registry._agent_lists == {}
