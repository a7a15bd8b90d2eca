"""The controller's Prometheus metrics, served over plain HTTP on ``metrics_listen``.

Labels only ever take values from small fixed sets (an operation name, a sink name,
a rejection stage): never addresses, usernames, sensors or session ids, so the number
of series stays bounded whatever attackers do. Fleet gauges (pool nodes, sensors,
leases, sessions) are read from the registry and lease manager at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.leases import LeaseManager
from controller.models import NodeState
from controller.registry import Registry

log = logging.getLogger(__name__)

LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class EventMetrics:
    """Ingest, store, watch and sink metrics, in a registry of the controller's own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.ingested = Counter(
            "honeyfleet_events_ingested", "Events stored for the first time", registry=r
        )
        self.duplicates = Counter(
            "honeyfleet_events_duplicate", "Events received again and not stored twice", registry=r
        )
        self.rejected = Counter(
            "honeyfleet_events_rejected",
            "Events dropped as malformed, by stage (validation or store)",
            ["stage"],
            registry=r,
        )
        self.sensor_rewritten = Counter(
            "honeyfleet_events_sensor_rewritten",
            "Events whose sensor field was replaced by the sender's certificate name",
            registry=r,
        )
        self.batches = Counter(
            "honeyfleet_ingest_batches", "Event batches acknowledged to sensors", registry=r
        )
        self.lag = Histogram(
            "honeyfleet_ingest_lag_seconds",
            "Seconds from an event's timestamp to its storage",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.write_seconds = Histogram(
            "honeyfleet_store_write_seconds",
            "Seconds one store transaction of events took",
            buckets=WRITE_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "honeyfleet_store_errors",
            "Failed event store operations, by operation",
            ["operation"],
            registry=r,
        )
        self.store_up = Gauge(
            "honeyfleet_store_up", "1 while the event store accepts writes, else 0", registry=r
        )
        self.queue = Gauge(
            "honeyfleet_ingest_queue_batches", "Batches waiting to be written", registry=r
        )
        self.streams = Gauge(
            "honeyfleet_ingest_streams", "Open event streams from sensors", registry=r
        )
        self.linger = Gauge(
            "honeyfleet_ingest_linger_seconds",
            "Seconds the last acknowledgement asked its sensor to gather events before "
            "sending (0 while the fleet sends fewer events a second than the batch target)",
            registry=r,
        )
        self.store_bytes = Gauge(
            "honeyfleet_store_bytes",
            "Bytes the event store takes, as store_max_bytes counts them",
            registry=r,
        )
        self.budget_deleted = Counter(
            "honeyfleet_store_budget_deleted",
            "Events deleted (oldest first) to keep the store under store_max_bytes",
            registry=r,
        )
        self.shed = Counter(
            "honeyfleet_ingest_shed",
            "Event batches or streams refused with RESOURCE_EXHAUSTED, by reason "
            "(queue: the store is behind; sensor_streams, sensor_bytes: a sensor's quota)",
            ["reason"],
            registry=r,
        )
        self.watchers = Gauge("honeyfleet_event_watchers", "Open WatchEvents calls", registry=r)
        self.watchers_dropped = Counter(
            "honeyfleet_event_watchers_dropped",
            "WatchEvents calls ended because they fell behind",
            registry=r,
        )
        self.sink_errors = Counter(
            "honeyfleet_sink_errors",
            "Failed writes to an event sink, by sink",
            ["sink"],
            registry=r,
        )
        self.sessions_started = Counter(
            "honeyfleet_sessions_started",
            "Sessions whose cowrie.session.connect event was stored",
            registry=r,
        )


class FleetCollector(Collector):
    """Gauges of fleet state, computed at scrape time (on the HTTP server's thread)."""

    def __init__(
        self, registry: Registry, leases: LeaseManager, sensors_up: Callable[[], int]
    ) -> None:
        self._registry = registry
        self._leases = leases
        self._sensors_up = sensors_up

    def collect(self) -> Iterable[Metric]:
        """Yield the fleet gauges."""
        # list() copies a dict's values in one C call, atomic under the GIL, so a
        # concurrent change on the event loop cannot break the iteration.
        nodes = list(self._registry.nodes.values())
        leases = list(self._leases.active.values())
        alive = [n for n in nodes if n.state is NodeState.ALIVE]
        values = (
            ("honeyfleet_pool_nodes_up", "Pool nodes sending heartbeats", len(alive)),
            ("honeyfleet_pool_nodes_known", "Registered pool nodes", len(nodes)),
            (
                "honeyfleet_pool_nodes_draining",
                "Drained pool nodes",
                sum(n.draining for n in nodes),
            ),
            ("honeyfleet_sensors_up", "Sensors with an open event stream", self._sensors_up()),
            ("honeyfleet_sensors_known", "Sensors ever seen", len(self._registry.sensors)),
            ("honeyfleet_leases_active", "Active leases", len(leases)),
            (
                "honeyfleet_sessions_active",
                "Sessions holding a lease",
                len({le.session for le in leases}),
            ),
        )
        for name, text, value in values:
            yield GaugeMetricFamily(name, text, value=value)
