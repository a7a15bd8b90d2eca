"""Prometheus metrics of a pool node (labels are bounded: states, reasons, directions)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class PoolMetrics:
    """The node's metrics, in a registry of its own (several nodes may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.guests = Gauge("honeyfleet_poolnode_guests", "Guests by state", ["state"], registry=r)
        self.boot_seconds = Histogram(
            "honeyfleet_poolnode_boot_seconds",
            "Time from create to the node's SSH login",
            buckets=(2, 5, 10, 20, 30, 60, 120, 300),
            registry=r,
        )
        self.destroyed = Counter(
            "honeyfleet_poolnode_guests_destroyed",
            "Guests destroyed, by reason",
            ["reason"],
            registry=r,
        )
        self.health_failures = Counter(
            "honeyfleet_poolnode_health_failures", "Failed health checks", ["check"], registry=r
        )
        self.leases = Gauge("honeyfleet_poolnode_leases", "Active leases", registry=r)
        self.tunnels = Gauge("honeyfleet_poolnode_tunnels", "Open tunnels", registry=r)
        self.tunnel_bytes = Counter(
            "honeyfleet_poolnode_tunnel_bytes",
            "Bytes relayed by tunnels",
            ["direction"],
            registry=r,
        )
        self.egress_events = Counter(
            "honeyfleet_poolnode_egress_events",
            "Egress events by kind (dns, connect, download) and outcome (sent; suppressed: "
            "over the guest's bound or the spool near full)",
            ["kind", "outcome"],
            registry=r,
        )
        self.egress_refused = Counter(
            "honeyfleet_poolnode_egress_refused_connections",
            "Sinkhole connections closed at once: their guest held egress_max_connections",
            registry=r,
        )
        self.downloads_bytes = Gauge(
            "honeyfleet_poolnode_downloads_bytes",
            "Bytes in state_dir/downloads after the last pruning pass",
            registry=r,
        )
        self.downloads_pruned_files = Counter(
            "honeyfleet_poolnode_downloads_pruned_files",
            "Files pruned from state_dir/downloads, by reason (age, budget)",
            ["reason"],
            registry=r,
        )
        self.downloads_pruned_bytes = Counter(
            "honeyfleet_poolnode_downloads_pruned_bytes",
            "Bytes pruned from state_dir/downloads, by reason (age, budget)",
            ["reason"],
            registry=r,
        )
        self.disk_diffs = Counter(
            "honeyfleet_poolnode_disk_diffs",
            "Disk diffs of destroyed guests, by outcome (done, failed, dropped)",
            ["outcome"],
            registry=r,
        )
        self.disk_diff_seconds = Histogram(
            "honeyfleet_poolnode_disk_diff_seconds",
            "Time a disk diff took, its appliance's boot included",
            buckets=(5, 10, 20, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.disk_diff_files = Counter(
            "honeyfleet_poolnode_disk_diff_files",
            "Files reported by disk diffs: content kept (stored) or hashed only",
            ["kept"],
            registry=r,
        )
