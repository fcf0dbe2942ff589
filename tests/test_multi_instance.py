"""Two gateway processes on one database (here: two gateways in one event loop)."""

from __future__ import annotations

from typing import Any


async def test_cancel_through_another_gateway_reaches_the_device(make_gateway: Any) -> None:
    """A service may call any gateway: cancelling a run fed through another one still
    sends agent_cancel to the device and stops its events being accepted."""
    first = await make_gateway(instance_id="gw-a")
    second = await make_gateway(instance_id="gw-b")
    device = await first.device("u1", "d1", agent_ids=["agent"])
    status, run = await first.api("POST", "/runs", {"user_id": "u1", "agent_id": "agent"})
    assert status == 201, run
    assert run["status"] == "running", run
    await device.recv_type("agent_run")

    status, cancelled = await second.api("POST", f"/runs/{run['run_id']}/cancel")
    assert status == 200, cancelled
    assert cancelled["status"] == "cancelled"

    frame = await device.recv_type("agent_cancel")
    assert frame["run_id"] == run["run_id"]
    await device.send({"type": "agent_data", "run_id": run["run_id"], "data": {"late": True}})
    refused = await device.recv_type("error")
    assert refused["code"] == "run_finished", refused


async def test_each_gateway_marks_only_its_own_orphans(make_gateway: Any) -> None:
    """A restart sweep touches runs dispatched by this instance id, not a sibling's."""
    first = await make_gateway(instance_id="gw-a")
    device = await first.device("u1", "d1", agent_ids=["agent"])
    status, run = await first.api("POST", "/runs", {"user_id": "u1", "agent_id": "agent"})
    assert status == 201, run
    await device.recv_type("agent_run")

    await make_gateway(instance_id="gw-b")  # its start-up sweep runs now
    status, record = await first.api("GET", f"/runs/{run['run_id']}")
    assert status == 200, record
    assert record["status"] == "running", record
    assert record["gateway_instance"] == "gw-a"
