"""GET /metrics (PROTOCOL.md §2.4): Prometheus text that counts what devices and services did."""

from __future__ import annotations

import asyncio
from typing import Any

from harness import SERVICE_TOKEN, Harness
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


async def scrape(gateway: Harness) -> list[Sample]:
    response = await gateway.public.get("/metrics")
    text = await response.text()
    assert response.status == 200, text
    assert response.content_type == "text/plain"
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample called ``name`` whose labels include ``labels`` (0 when absent:
    a labelled counter only appears once it has been incremented)."""
    found = [s for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, found
    return found[0].value if found else 0.0


async def tool_call(gateway: Harness, **body: Any) -> asyncio.Task[tuple[int, Any]]:
    return asyncio.create_task(gateway.api("POST", "/tool-calls", {"user_id": "user-1",
                                                                    "tool": "echo", **body}))


async def test_metrics_count_connections_frames_calls_runs_and_events(gateway: Harness) -> None:
    """After known traffic every counter says exactly what happened."""
    device = await gateway.device("user-1", "device-1", agent_ids=["agent-a"])

    for n in (1, 2):  # two calls answered
        pending = await tool_call(gateway, args={"n": n})
        call = await device.recv_type("tool_call")
        await device.send({"type": "tool_result", "id": call["id"], "result": n})
        status, body = await pending
        assert status == 200 and body["ok"], body
    pending = await tool_call(gateway, timeout_s=0.05)  # one left unanswered
    await device.recv_type("tool_call")
    status, body = await pending
    assert (status, body["error"]) == (504, "timeout"), body
    await device.recv_type("tool_cancel")

    # Three frames refused before their type could be read: not counted by type.
    for bad in ("not json", "[1, 2]", '{"no_type": true}'):
        await device.send(bad)
        error = await device.recv_type("error")
        assert error["code"] == "bad_frame", error

    status, run = await gateway.api("POST", "/runs", {"user_id": "user-1", "agent_id": "agent-a"})
    assert status == 201, run
    await device.recv_type("agent_run")
    for n in range(5):
        await device.send({"type": "agent_data", "run_id": run["run_id"], "data": {"n": n}})
    await device.send({"type": "agent_complete", "run_id": run["run_id"]})
    # The run reads completed only once its events are stored (§3.4).
    for _ in range(200):
        status, record = await gateway.api("GET", f"/runs/{run['run_id']}")
        if record["status"] == "completed":
            break
        await asyncio.sleep(0.01)
    assert record["status"] == "completed", record

    samples = await scrape(gateway)
    assert value(samples, "gateway_connections_opened_total") == 1
    assert value(samples, "gateway_devices_connected") == 1
    assert value(samples, "gateway_frames_received_total", type="tool_result") == 2
    assert value(samples, "gateway_frames_received_total", type="agent_data") == 5
    assert value(samples, "gateway_frames_received_total", type="agent_complete") == 1
    assert value(samples, "gateway_bad_frames_total", code="bad_frame") == 3
    assert value(samples, "gateway_frames_sent_total", type="hello_ack") == 1
    assert value(samples, "gateway_frames_sent_total", type="tool_call") == 3
    assert value(samples, "gateway_frames_sent_total", type="tool_cancel") == 1
    assert value(samples, "gateway_frames_sent_total", type="error") == 3
    assert value(samples, "gateway_frames_sent_total", type="agent_run") == 1
    assert value(samples, "gateway_tool_calls_total", outcome="ok") == 2
    assert value(samples, "gateway_tool_calls_total", outcome="timeout") == 1
    assert value(samples, "gateway_tool_call_duration_seconds_count") == 3
    assert value(samples, "gateway_tool_call_duration_seconds_bucket", le="+Inf") == 3
    assert value(samples, "gateway_tool_call_duration_seconds_sum") >= 0.05  # the timeout
    assert value(samples, "gateway_runs_total", status="pending") == 1
    assert value(samples, "gateway_runs_total", status="running") == 1
    assert value(samples, "gateway_runs_total", status="completed") == 1
    assert value(samples, "gateway_runs_total", status="error") == 0
    assert value(samples, "gateway_events_stored_total") == 5

    await device.close()
    await gateway.wait_for(lambda: len(gateway.svc.registry) == 0)
    samples = await scrape(gateway)
    assert value(samples, "gateway_devices_connected") == 0
    assert value(samples, "gateway_connections_closed_total", code="1000") == 1


async def test_metrics_are_not_served_on_the_internal_listener(gateway: Harness) -> None:
    """Operations routes live on the public listener only (the internal one says 404)."""
    response = await gateway.internal.get(
        "/metrics", headers={"Authorization": f"Bearer {SERVICE_TOKEN}"})
    assert response.status == 404, await response.text()


async def test_each_gateway_has_its_own_metrics(make_gateway: Any) -> None:
    """Two gateways in one process (as tests build them) never share counters."""
    first = await make_gateway()
    second = await make_gateway()
    await first.device("user-1", "device-1")
    assert value(await scrape(first), "gateway_connections_opened_total") == 1
    assert value(await scrape(second), "gateway_connections_opened_total") == 0


def test_tallied_metrics_export_as_prometheus_counters_and_a_histogram() -> None:
    """The per-call metrics, counted without prometheus_client's locks, read as the
    client's own Counter and Histogram would: _total and _created per label, cumulative
    buckets where a value on a bound counts in that bound's bucket, +Inf, count and sum."""
    from gateway.metrics import CALL_BUCKETS, Metrics

    metrics = Metrics()
    for seconds in (0.001, 0.0011, 0.5, 61.0):
        metrics.tool_call("ok", seconds)
    metrics.tool_call("timeout", 30.0)
    metrics.tool_calls.inc("device_offline")
    metrics.frame_in("tool_result")
    metrics.frame_in("tool_result")
    metrics.frame_out("tool_call")
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}

    calls = families["gateway_tool_calls"]
    assert calls.type == "counter"
    totals = {s.labels["outcome"]: s.value for s in calls.samples if s.name.endswith("_total")}
    assert totals == {"ok": 4, "timeout": 1, "device_offline": 1}
    created = families["gateway_tool_calls_created"].samples
    assert {s.labels["outcome"] for s in created} == {"ok", "timeout", "device_offline"}
    received = families["gateway_frames_received"].samples
    assert [(s.labels, s.value) for s in received if s.name.endswith("_total")] == [
        ({"type": "tool_result"}, 2)]
    sent = families["gateway_frames_sent"].samples
    assert [(s.labels, s.value) for s in sent if s.name.endswith("_total")] == [
        ({"type": "tool_call"}, 1)]

    latency = families["gateway_tool_call_duration_seconds"]
    assert latency.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in latency.samples if s.name.endswith("_bucket")}
    assert len(buckets) == len(CALL_BUCKETS) + 1
    assert buckets["0.001"] == 1  # on the bound: counted in it (le)
    assert buckets["0.0025"] == 2
    assert buckets["0.5"] == 3
    assert buckets["30.0"] == 4 and buckets["60.0"] == 4
    assert buckets["+Inf"] == 5
    by_name = {s.name: s.value for s in latency.samples}
    assert by_name["gateway_tool_call_duration_seconds_count"] == 5
    assert abs(by_name["gateway_tool_call_duration_seconds_sum"] - 91.5021) < 1e-9
    assert len(families["gateway_tool_call_duration_seconds_created"].samples) == 1
