"""The controller's configuration (the ``[controller]`` section)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from honeyfleet.config import host_port, non_negative, optional_host_port, positive, setting
from honeyfleet.errors import ConfigError
from honeyfleet.tls import TlsFiles


@dataclass(frozen=True)
class ControllerConfig:
    """Settings of the controller process."""

    listen: str = setting("127.0.0.1:7300", "host:port of the mTLS fleet API", check=host_port)
    enroll_listen: str = setting(
        "127.0.0.1:7301",
        "host:port of the enrolment endpoint (server-authenticated TLS, join tokens); "
        "empty to disable",
        check=optional_host_port,
    )
    state_dir: Path = setting(Path("state/controller"), "where the controller keeps its store")
    ca_dir: Path | None = setting(
        None,
        "fleet CA directory (from `honeyfleet pki init`): needed to enrol members with join "
        "tokens and to read revoked serials",
    )
    cert_validity_days: int = setting(
        7,
        "days the certificates the controller signs (enrolment, renewal) are valid; members "
        "renew theirs when a third of the lifetime is left",
        check=positive,
    )
    enroll_per_minute: float = setting(
        6.0, "enrolment attempts one address may make per minute", check=positive
    )
    enroll_burst: int = setting(
        5, "enrolment attempts one address may make back to back", check=positive
    )
    tls_ca: Path = setting(Path("tls/ca.pem"), "fleet CA certificate")
    tls_cert: Path = setting(Path("tls/cert.pem"), "the controller's certificate")
    tls_key: Path = setting(Path("tls/key.pem"), "the controller's private key")
    heartbeat_interval: float = setting(5.0, "seconds between pool-node heartbeats", check=positive)
    missed_heartbeats: int = setting(
        3, "heartbeat intervals without one before a pool node is dead", check=positive
    )
    lease_ttl: float = setting(
        120.0, "seconds a lease lives without renewal before it expires", check=positive
    )
    lease_wait: float = setting(
        20.0,
        "seconds a lease request waits for a guest to boot before giving up; keep it below "
        "the sensors' lease_timeout so they hear the controller's answer (the caller's "
        "deadline bounds it too)",
        check=positive,
    )
    max_waiting_acquires: int = setting(
        1000,
        "lease requests that may wait for a guest at once; beyond that the controller sheds "
        "new ones at once with RESOURCE_EXHAUSTED and a retry-after-ms hint",
        check=positive,
    )
    max_acquires_in_flight: int = setting(
        256,
        "lease requests being placed at once (not counting those waiting for a guest); "
        "beyond that the controller is saturated and sheds new ones at once",
        check=positive,
    )
    shed_loop_lag: float = setting(
        1.0,
        "seconds the controller's event loop may run behind, or a lease request may have "
        "waited in gRPC's intake (as its sensor's hf-timeout-ms tells), before new lease "
        "requests are shed at once (each would wait that long anyway, and delay heartbeats "
        "and events)",
        check=positive,
    )
    max_leases_per_sensor: int = setting(
        1024,
        "active leases (and requests for one) a single sensor may hold, so one compromised "
        "sensor cannot take every guest",
        check=positive,
    )
    max_node_guests: int = setting(
        256,
        "most guests counted for one pool node, whatever capacity it registers or reports, "
        "so one compromised node cannot attract every lease",
        check=positive,
    )
    allocate_timeout: float = setting(
        10.0, "seconds to wait for a pool node to allocate a guest", check=positive
    )
    max_concurrent_streams: int = setting(
        1000, "concurrent RPCs per client connection", check=positive
    )
    store: Literal["sqlite", "postgres"] = setting(
        "sqlite",
        'where events are stored: "sqlite" (state_dir/events.sqlite3) or "postgres" '
        "(postgres_dsn; needs honeyfleet[postgres])",
    )
    postgres_dsn: str = setting(
        "",
        "libpq connection string or URI of the PostgreSQL event store, e.g. "
        '"postgresql://honeyfleet@db.example.net/honeyfleet"; the controller creates and '
        "migrates its schema",
    )
    retention_days: int = setting(
        0,
        "delete events older than this many days (PostgreSQL drops whole daily "
        "partitions); 0 keeps everything",
        check=non_negative,
    )
    postgres_partition_days: int = setting(
        30,
        "PostgreSQL: events up to this many days old (and at most retention_days) go to a "
        "daily partition; older ones (a long spool backlog, a wrong or lying sensor "
        "clock) share one partition, events_old, so no sensor can make the store create "
        "a partition per past day; their times are kept as sent",
        check=positive,
    )
    store_max_bytes: int = setting(
        0,
        "bound on the event store's size in bytes (SQLite: pages in use; PostgreSQL: "
        "events partitions and sessions); past it the oldest events are deleted first, "
        "in chunks, off the ingest path (PostgreSQL: a whole past day at a time, never "
        "today's); 0: no bound",
        check=non_negative,
    )
    jsonlines_path: str = setting(
        "cowrie.json",
        "Cowrie-format JSON lines log of every stored event, rotated daily, for ELK, "
        "Splunk and friends; relative to state_dir; empty to disable",
    )
    jsonlines_keep_days: int = setting(
        30, "days of rotated JSON lines files to keep", check=positive
    )
    metrics_listen: str = setting(
        "127.0.0.1:9464",
        "host:port of the Prometheus metrics endpoint (plain HTTP); empty to disable",
        check=optional_host_port,
    )
    ingest_queue_batches: int = setting(
        64,
        "event batches waiting for the store across all sensor streams; when full, "
        "streams stop reading until the store catches up (backpressure)",
        check=positive,
    )
    store_commit_events: int = setting(
        5000, "most events written to the store in one transaction", check=positive
    )
    store_commit_window: float = setting(
        0.05,
        "seconds a batch may wait, from its arrival, for more batches to share its "
        "transaction (fewer commits per event under a fleet's trickle, at most this much "
        "added to an acknowledgement); 0: commit at once",
        check=non_negative,
    )
    ingest_target_batches_per_second: float = setting(
        100.0,
        "event batches a second the controller aims at from all sensors together: once "
        "the fleet sends more events a second than this, every acknowledgement asks its "
        "sensor to gather new events for a while before sending (fewer, fuller batches, "
        "less CPU per event); below it sensors send at once",
        check=positive,
    )
    ingest_max_linger: float = setting(
        5.0,
        "most seconds the controller asks a sensor to gather events before sending (the "
        "delay added to delivery at full load); 0: never ask",
        check=non_negative,
    )
    ingest_shed_after: float = setting(
        10.0,
        "seconds a batch may wait for room in the ingest queue before it is refused with "
        "RESOURCE_EXHAUSTED and a retry hint; keep it well under the sensors' 30 s "
        "acknowledgement timeout",
        check=positive,
    )
    ingest_retry_after: float = setting(
        2.0,
        "seconds a sensor refused for overload is told to wait before trying again (it "
        "adds its own jitter and backoff)",
        check=positive,
    )
    ingest_streams_per_sensor: int = setting(
        4,
        "event streams one sensor (by certificate name, over all its connections) may "
        "have open at once; a sensor uses one, more are refused with RESOURCE_EXHAUSTED",
        check=positive,
    )
    ingest_bytes_per_sensor: int = setting(
        16 * 1024 * 1024,
        "bytes of event batches one sensor may have received and not yet acknowledged, "
        "over all its streams; a batch past it is refused with RESOURCE_EXHAUSTED",
        check=positive,
    )

    artefact_dir: Path | None = setting(
        None,
        "where the controller keeps artefacts (captured files, recordings, files from "
        "guests' disks, downloads), one file per sha256, with their index; default "
        "state_dir/artefacts",
    )
    artefact_store_max_bytes: int = setting(
        10 * 1024**3,
        "bytes of artefacts the controller keeps; storing a new one first evicts the least "
        "recently uploaded ones until it fits",
        check=positive,
    )
    artefact_max_upload_bytes: int = setting(
        256 * 1024**2,
        "largest artefact accepted in one upload; larger ones are refused (and stay on "
        "their sensor or pool node)",
        check=positive,
    )
    artefact_max_uploads: int = setting(
        16,
        "artefact uploads received at once from the whole fleet; more are refused with "
        "RESOURCE_EXHAUSTED and a retry hint (uploaders come back later)",
        check=positive,
    )
    artefact_retention_days: int = setting(
        0,
        "forget artefacts no sensor or pool node uploaded for this many days; 0 keeps "
        "them (within artefact_store_max_bytes)",
        check=non_negative,
    )

    def __post_init__(self) -> None:
        """Cross-field checks."""
        if self.store == "postgres" and not self.postgres_dsn:
            raise ConfigError("postgres_dsn", 'required when store = "postgres"')
        if self.lease_wait >= self.lease_ttl:
            raise ConfigError("lease_wait", "must be below lease_ttl")

    @property
    def artefacts(self) -> Path:
        """Where the artefact store lives."""
        return self.artefact_dir or self.state_dir / "artefacts"

    @property
    def tls(self) -> TlsFiles:
        """The controller's TLS files."""
        return TlsFiles(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key)
