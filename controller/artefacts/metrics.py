"""The artefact store's metrics: its size against the budget, uploads, removals."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ArtefactMetrics:
    """Gauges and counters of one store, in a registry of their own (the controller
    registers it with its metrics endpoint)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.bytes = Gauge(
            "honeyfleet_artefact_store_bytes",
            "Bytes of artefact content stored (bounded by artefact_store_max_bytes)",
            registry=r,
        )
        self.uploads = Counter(
            "honeyfleet_artefact_uploads",
            "Artefact uploads by result: stored (new content), already_stored (a reference "
            "only), busy (too many at once: retry hint), refused (malformed or over a limit)",
            ["result"],
            registry=r,
        )
        self.removed = Counter(
            "honeyfleet_artefacts_removed",
            "Stored contents removed: budget (evicted to make room), retention (expired)",
            ["reason"],
            registry=r,
        )
