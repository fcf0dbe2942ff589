"""Prometheus metrics, one registry per gateway (tests build as many as they like)."""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator

import attrs
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000)


def _metrics_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
    # ...: the default registry has them, a registry of our own does not.
    ProcessCollector(registry=registry)
    return registry


@attrs.define(eq=False)
class LabelledTally:
    """A counter by one label, for the per-call and per-frame paths.

    prometheus_client takes a lock per ``inc`` (two per histogram observation)
    and a children lookup per ``.labels()``: five of those per tool call were
    ~2.5 µs of a ~50 µs call. Everything that counts here runs on the event
    loop's thread, and so does the scrape, so a plain dict is exact; the text
    exported is the same as a ``Counter``'s (``_total`` and ``_created``).
    """

    name: str  # without "_total"
    documentation: str
    label: str
    counts: dict[str, float] = attrs.Factory(dict)
    created: dict[str, float] = attrs.Factory(dict)

    def inc(self, value: str) -> None:
        try:
            self.counts[value] += 1
        except KeyError:
            self.counts[value] = 1
            self.created[value] = time.time()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, count in self.counts.items():
            family.add_metric([value], count, created=self.created[value])
        yield family


@attrs.define(eq=False)
class HistogramTally:
    """An unlabelled histogram counted like LabelledTally; exported as a ``Histogram``."""

    name: str
    documentation: str
    bounds: tuple[float, ...]
    _counts: list[int] = attrs.field(init=False)
    _sum: float = 0.0
    _created: float = attrs.field(init=False, factory=time.time)

    def __attrs_post_init__(self) -> None:
        self._counts = [0] * (len(self.bounds) + 1)  # the last: +Inf

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, as Prometheus' "le" wants.
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation)
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self._counts, strict=True):
            total += count
            buckets.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]
        family.add_metric([], buckets, self._sum)
        family.samples.append(Sample(f"{self.name}_created", {}, self._created))
        yield family


@attrs.define
class Metrics:
    """Every metric the gateway exports (PROTOCOL.md §2.4)."""

    registry: CollectorRegistry = attrs.field(factory=_metrics_registry)
    devices_connected: Gauge = attrs.field(init=False)
    connections_opened: Counter = attrs.field(init=False)
    connections_closed: Counter = attrs.field(init=False)
    handshakes_refused: Counter = attrs.field(init=False)
    frames_in: LabelledTally = attrs.field(init=False)
    frames_out: LabelledTally = attrs.field(init=False)
    bad_frames: Counter = attrs.field(init=False)
    tool_calls: LabelledTally = attrs.field(init=False)
    tool_call_seconds: HistogramTally = attrs.field(init=False)
    runs: Counter = attrs.field(init=False)
    runs_detached: Counter = attrs.field(init=False)
    runs_resumed: Counter = attrs.field(init=False)
    runs_expired: Counter = attrs.field(init=False)
    events_duplicate: Counter = attrs.field(init=False)
    events_stored: Counter = attrs.field(init=False)
    events_dropped: Counter = attrs.field(init=False)
    frame_handler_failures: Counter = attrs.field(init=False)
    asyncio_tasks: Gauge = attrs.field(init=False)
    event_batch_size: Histogram = attrs.field(init=False)
    event_queue_depth: Gauge = attrs.field(init=False)
    event_queue_capacity: Gauge = attrs.field(init=False)
    db_errors: Counter = attrs.field(init=False)
    ready: Gauge = attrs.field(init=False)
    retention_days: Gauge = attrs.field(init=False)
    retention_removed: Counter = attrs.field(init=False)
    retention_oldest_age: Gauge = attrs.field(init=False)
    calls_forwarded: Counter = attrs.field(init=False)
    instances_reaped: Counter = attrs.field(init=False)
    listener_connections: Counter = attrs.field(init=False)
    events_announced: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.devices_connected = Gauge(
            "gateway_devices_connected", "Device WebSockets currently registered", registry=r)
        self.connections_opened = Counter(
            "gateway_connections_opened_total", "Device WebSockets upgraded", registry=r)
        self.connections_closed = Counter(
            "gateway_connections_closed_total", "Device WebSockets closed, by close code",
            ["code"], registry=r)
        self.handshakes_refused = Counter(
            "gateway_handshakes_refused_total", "Device handshakes refused before the upgrade",
            ["reason"], registry=r)
        self.frames_in = LabelledTally(
            "gateway_frames_received", "Frames received from devices, by type", "type")
        self.frames_out = LabelledTally(
            "gateway_frames_sent", "Frames sent to devices, by type", "type")
        self.bad_frames = Counter(
            "gateway_bad_frames_total", "Device frames refused, by error code",
            ["code"], registry=r)
        self.tool_calls = LabelledTally("gateway_tool_calls", "Tool calls, by outcome", "outcome")
        self.tool_call_seconds = HistogramTally(
            "gateway_tool_call_duration_seconds", "Tool call latency, send to result",
            CALL_BUCKETS)
        for tally in (self.frames_in, self.frames_out, self.tool_calls, self.tool_call_seconds):
            r.register(tally)
        self.runs = Counter(
            "gateway_runs_total", "Run status transitions, by new status", ["status"], registry=r)
        self.runs_detached = Counter(
            "gateway_runs_detached_total",
            "Running runs detached from a connection that ended, waiting for a resume",
            registry=r)
        self.runs_resumed = Counter(
            "gateway_runs_resumed_total",
            "Running runs attached to a new connection of their device: by a hello that "
            "resumed them, or by a replacement that took them over", ["how"], registry=r)
        self.runs_expired = Counter(
            "gateway_runs_expired_total",
            "Detached runs not resumed within GATEWAY_RUN_RESUME_S (marked error)",
            registry=r)
        self.events_duplicate = Counter(
            "gateway_events_duplicate_total",
            "agent_data resent under event_acks with a seq already accepted (not stored again)",
            registry=r)
        self.events_stored = Counter(
            "gateway_events_stored_total", "agent_data events durably stored", registry=r)
        self.events_dropped = Counter(
            "gateway_events_dropped_total", "agent_data events the database refused for good "
            "(their run deleted, or data it cannot store): logged by run and seq, run ended",
            registry=r)
        self.frame_handler_failures = Counter(
            "gateway_frame_handler_failures_total", "Device frames whose handler failed "
            "unexpectedly (answered internal_error, connection kept), by frame type",
            ["type"], registry=r)
        self.asyncio_tasks = Gauge(
            "gateway_asyncio_tasks", "asyncio tasks alive in the process, at each scrape "
            "(a leak shows as growth at a steady load)", registry=r)
        self.event_batch_size = Histogram(
            "gateway_event_batch_size", "Events per database write", buckets=BATCH_BUCKETS,
            registry=r)
        self.event_queue_depth = Gauge(
            "gateway_event_queue_depth", "Events waiting for the database", registry=r)
        self.event_queue_capacity = Gauge(
            "gateway_event_queue_capacity", "GATEWAY_EVENT_QUEUE_MAX: at this depth devices "
            "are paused", registry=r)
        self.db_errors = Counter(
            "gateway_db_errors_total", "Database operations that failed, by operation",
            ["operation"], registry=r)
        self.ready = Gauge(
            "gateway_ready", "1 when /readyz would answer 200 (database answers, not "
            "draining), evaluated at each scrape", registry=r)
        self.retention_days = Gauge(
            "gateway_retention_days", "GATEWAY_RETENTION_DAYS in force (0: runs are kept "
            "forever)", registry=r)
        self.retention_removed = Counter(
            "gateway_retention_rows_removed_total", "Rows removed by retention (background "
            "loop of this process), by table", ["table"], registry=r)
        self.retention_oldest_age = Gauge(
            "gateway_retention_oldest_run_age_seconds", "Seconds since the oldest finished "
            "run still stored ended (0: none stored); updated by each retention pass",
            registry=r)
        for table in ("agent_run_logs", "agent_run_events"):
            self.retention_removed.labels(table)
        # Several processes (PROTOCOL.md §5).
        self.calls_forwarded = Counter(
            "gateway_tool_calls_forwarded_total", "Tool calls for a device held by another "
            "gateway process, sent there, by outcome (forwarded: its answer came back)",
            ["outcome"], registry=r)
        self.instances_reaped = Counter(
            "gateway_instances_reaped_total", "Dead gateway processes (heartbeat older than "
            "GATEWAY_INSTANCE_TTL_S) whose devices and runs this process cleaned up",
            registry=r)
        self.listener_connections = Counter(
            "gateway_listener_connections_total", "LISTEN connections made (more than one: "
            "a connection was lost or went silent and was replaced)", registry=r)
        self.events_announced = Counter(
            "gateway_event_notifications_total", "NOTIFYs sent for committed event batches "
            "(one per run per batch) so readers on other processes follow", registry=r)

    def frame_in(self, frame_type: str) -> None:
        self.frames_in.inc(frame_type)

    def frame_out(self, frame_type: str) -> None:
        self.frames_out.inc(frame_type)

    def tool_call(self, outcome: str, seconds: float) -> None:
        self.tool_calls.inc(outcome)
        self.tool_call_seconds.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)
