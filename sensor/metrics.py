"""Prometheus metrics of a sensor (labels are bounded: outcomes and refusal reasons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from honeyfleet.eventlog import SpoolMetrics


class SensorMetrics:
    """The sensor's metrics, in a registry of its own (tests run several sensors)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "honeyfleet_sensor_open_connections", "Open connections", registry=r
        )
        self.sessions = Gauge(
            "honeyfleet_sensor_active_sessions", "Sessions proxied into a guest now", registry=r
        )
        self.sessions_total = Counter(
            "honeyfleet_sensor_sessions", "Sessions that reached a guest", registry=r
        )
        self.logins = Counter(
            "honeyfleet_sensor_logins", "Login attempts by result", ["result"], registry=r
        )
        self.refusals = Counter(
            "honeyfleet_sensor_refusals", "Connections refused, by reason", ["reason"], registry=r
        )
        self.evictions = Counter(
            "honeyfleet_sensor_evictions",
            "Unauthenticated connections closed to make room for another source",
            registry=r,
        )
        self.penalties = Counter(
            "honeyfleet_sensor_penalties",
            "Penalties given to sources, by kind (authfail, noauth, grace-exceeded)",
            ["kind"],
            registry=r,
        )
        self.lease_failures = Counter(
            "honeyfleet_sensor_lease_failures", "Logins that got no guest", registry=r
        )
        self.spool = SpoolMetrics("honeyfleet_sensor", r)
        self.events_over_budget = Counter(
            "honeyfleet_sensor_events_over_budget",
            "Events not written because a session or source ran out of event budget",
            ["budget"],
            registry=r,
        )
        self.artefact_bytes = Gauge(
            "honeyfleet_sensor_artefact_bytes",
            "Bytes of captures and recordings counted against the artefact budget",
            registry=r,
        )
        self.artefact_budget_reached = Gauge(
            "honeyfleet_sensor_artefact_budget_reached",
            "1 while the artefact budget is spent (new captures and recordings are not kept)",
            registry=r,
        )
        self.artefacts_refused = Counter(
            "honeyfleet_sensor_artefacts_refused",
            "Captures and recordings not kept (or cut short) for want of artefact budget",
            ["kind"],
            registry=r,
        )
        self.artefacts_failed = Counter(
            "honeyfleet_sensor_artefacts_failed",
            "Captures and recordings given up after an I/O error",
            ["kind"],
            registry=r,
        )
