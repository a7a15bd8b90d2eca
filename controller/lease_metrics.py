"""Prometheus metrics of the lease path (labels from small fixed sets only)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ACQUIRE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class LeaseMetrics:
    """Acquire latency, node calls and shedding, in a registry the controller serves."""

    def __init__(self, waiting: Callable[[], int], heard_late: Callable[[], float]) -> None:
        self.registry = r = CollectorRegistry()
        self.acquire_seconds = Histogram(
            "honeyfleet_lease_acquire_seconds",
            "Time to grant a lease",
            buckets=ACQUIRE_BUCKETS,
            registry=r,
        )
        self.allocate_calls = Counter(
            "honeyfleet_lease_allocate_calls",
            "AllocateGuest calls to pool nodes, by result (granted, refused, failed)",
            ["result"],
            registry=r,
        )
        self.shed = Counter(
            "honeyfleet_leases_shed",
            "Lease requests refused with RESOURCE_EXHAUSTED, by reason "
            "(queue_full, wait_timeout, sensor_quota, in_flight, loop_lag, queued)",
            ["reason"],
            registry=r,
        )
        self.stale = Counter(
            "honeyfleet_lease_stale_reported",
            "Leases a pool node reported that the controller no longer knows",
            registry=r,
        )
        self.nodes_dead = Counter(
            "honeyfleet_pool_nodes_marked_dead",
            "Pool nodes marked dead for missed heartbeats (each time)",
            registry=r,
        )
        waiting_gauge = Gauge(
            "honeyfleet_leases_waiting", "Lease requests waiting for a guest", registry=r
        )
        waiting_gauge.set_function(waiting)
        late_gauge = Gauge(
            "honeyfleet_pool_nodes_heard_late_seconds",
            "How much later than one heartbeat interval the controller last heard its "
            "typical pool node (forgiven to every node when judging liveness)",
            registry=r,
        )
        late_gauge.set_function(heard_late)
