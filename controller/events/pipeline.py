"""The controller's event pipeline: store, writer, sinks, live broadcast, metrics, health.

    sensor streams -> BatchWriter (bounded queue, group commit) -> EventStore
                                      |  after each commit
                                      +-> sinks (JSON lines) -> Broadcaster (WatchEvents)

The store's health is reported as ``honeyfleet.v1.EventIngestService`` NOT_SERVING
while it cannot be written, and as the ``honeyfleet_store_up`` gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from prometheus_client import CollectorRegistry

from controller.config import ControllerConfig
from controller.events.broadcast import Broadcaster
from controller.events.linger import LingerAdvisor, LingerPolicy
from controller.events.metrics import EventMetrics, FleetCollector
from controller.events.quota import IngestQuota, Overloaded, QuotaLimits
from controller.events.rows import EventRow
from controller.events.sinks import JsonLinesSink, Sink
from controller.events.sqlite_store import SqliteEventStore
from controller.events.store import EventStore
from controller.events.writer import Ack, BatchWriter
from controller.leases import LeaseManager
from controller.registry import Registry
from honeyfleet.errors import ConfigError, HoneyfleetError
from honeyfleet.metrics_http import MetricsServer, serve_metrics
from honeyfleet.v1 import ingest_pb2

log = logging.getLogger(__name__)

INGEST_SERVICE = ingest_pb2.DESCRIPTOR.services_by_name["EventIngestService"].full_name
# While the store is down and no batch is retrying, probe it this often.
PROBE_INTERVAL = 1.0
MAINTENANCE_INTERVAL = 3600.0
# How often the store's size is measured (and the budget enforced).
BUDGET_INTERVAL = 10.0
# Most chunks deleted in one budget round, so a round ends and the size is reported.
BUDGET_ROUNDS = 100


def open_store(config: ControllerConfig) -> EventStore:
    """The configured store (not yet opened)."""
    if config.store == "postgres":
        try:
            from controller.events.postgres_store import PostgresEventStore
        except ImportError as e:
            raise ConfigError(
                "store", f"postgres needs psycopg: pip install 'honeyfleet[postgres]' ({e})"
            ) from None
        return PostgresEventStore(
            config.postgres_dsn,
            retention_days=config.retention_days,
            partition_days=config.postgres_partition_days,
        )
    return SqliteEventStore(
        config.state_dir / "events.sqlite3", retention_days=config.retention_days
    )


class EventPipeline:
    """Everything between an acknowledged batch and the operators' queries."""

    def __init__(self, config: ControllerConfig, registry: Registry, leases: LeaseManager) -> None:
        self._config = config
        self.metrics_registry = CollectorRegistry()
        self.metrics = EventMetrics(self.metrics_registry)
        self.metrics_registry.register(FleetCollector(registry, leases, self.sensors_up))
        self.store = open_store(config)
        self.broadcaster = Broadcaster(self.metrics)
        self.sinks: list[Sink] = []
        if config.jsonlines_path:
            path = config.state_dir / config.jsonlines_path
            self.sinks.append(JsonLinesSink(path, keep_days=config.jsonlines_keep_days))
        self.writer = BatchWriter(
            self.store,
            self.metrics,
            max_pending=config.ingest_queue_batches,
            max_commit_events=config.store_commit_events,
            commit_window=config.store_commit_window,
            shed_after=config.ingest_shed_after,
            retry_after=config.ingest_retry_after,
            on_stored=self._fan_out,
            on_state=self._report,
        )
        self.quota = IngestQuota(
            QuotaLimits(
                streams=config.ingest_streams_per_sensor,
                bytes=config.ingest_bytes_per_sensor,
                retry_after=config.ingest_retry_after,
            )
        )
        self.linger = LingerAdvisor(
            LingerPolicy(
                target=config.ingest_target_batches_per_second,
                max_linger=config.ingest_max_linger,
            )
        )
        self._health: health_aio.HealthServicer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: MetricsServer | None = None

    @property
    def metrics_port(self) -> int | None:
        """The port metrics are served on (None when disabled)."""
        return self._metrics_server.port if self._metrics_server else None

    async def start(self) -> None:
        """Open the store, start writing and upkeep, serve metrics."""
        await self.store.open()
        self.metrics.store_up.set(1)
        try:
            await self.store.ping()
        except HoneyfleetError as e:
            await self.writer.set_up(False, str(e))
        self._tasks = [
            asyncio.create_task(self.writer.run(), name="event-writer"),
            asyncio.create_task(self._upkeep(), name="event-store-upkeep"),
        ]
        self._metrics_server = serve_metrics(self._config.metrics_listen, self.metrics_registry)
        log.info("events: %s store, sinks: %s", self.store.kind, [s.name for s in self.sinks])

    async def attach_health(self, health: health_aio.HealthServicer) -> None:
        """Report the store's state as the ingest service's health from now on."""
        self._health = health
        await self._report(self.writer.up)

    async def stop(self) -> None:
        """Stop writing (unacknowledged batches stay with their sensors) and close."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
            self._metrics_server = None
        for sink in self.sinks:
            await sink.close()
        await self.store.close()

    async def write(self, rows: Sequence[EventRow]) -> Ack:
        """Store a batch; returns once it is durable."""
        return await self.writer.write(rows)

    @contextlib.contextmanager
    def stream(self, sensor: str) -> Iterator[None]:
        """Count an open event stream of ``sensor`` while the context lasts.

        Overloaded (counted) when the sensor already has its quota of streams open.
        """
        with contextlib.ExitStack() as stack:
            self._enter(stack, self.quota.stream(sensor))
            self.metrics.streams.inc()
            stack.callback(self.metrics.streams.dec)
            yield

    @contextlib.contextmanager
    def batch(self, sensor: str, size: int) -> Iterator[None]:
        """Account a received batch until acknowledged; Overloaded (counted) past the quota."""
        with contextlib.ExitStack() as stack:
            self._enter(stack, self.quota.batch(sensor, size))
            yield

    def _enter(
        self, stack: contextlib.ExitStack, quota: contextlib.AbstractContextManager[None]
    ) -> None:
        """Enter a quota's context, counting a refusal by its reason."""
        try:
            stack.enter_context(quota)
        except Overloaded as e:
            self.metrics.shed.labels(e.reason).inc()
            raise

    def linger_hint(self) -> float:
        """Seconds sensors should now gather events before sending a batch that is not full."""
        hint = self.linger.hint(self.quota.sensors())
        self.metrics.linger.set(hint)
        return hint

    def sensors_up(self) -> int:
        """Sensors with at least one open event stream."""
        return self.quota.sensors()

    async def _fan_out(self, rows: list[EventRow]) -> None:
        """After a commit: sinks, then live watchers."""
        if not rows:
            return
        for sink in self.sinks:
            try:
                await sink.write(rows)
            except OSError as e:
                # The store has the events; a failing extra destination must not stop ingest.
                self.metrics.sink_errors.labels(sink.name).inc()
                log.error(
                    "event sink %s failed, %d events not written: %s", sink.name, len(rows), e
                )
        self.broadcaster.publish(rows)

    async def _report(self, up: bool) -> None:
        """Publish the store's state as the ingest service's health."""
        if self._health is not None:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if up
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self._health.set(INGEST_SERVICE, status)

    async def _budget(self) -> None:
        """Measure the store; past store_max_bytes delete the oldest events, chunk by chunk.

        Runs in the upkeep task: each chunk is its own short transaction, so batches
        from sensors are written in between, never behind the whole deletion.
        """
        size = await self.store.size()
        budget = self._config.store_max_bytes
        rounds = 0
        while budget and size > budget and rounds < BUDGET_ROUNDS:
            deleted = await self.store.delete_oldest()
            if not deleted:
                log.error(
                    "event store is %d bytes, over store_max_bytes (%d), and nothing older "
                    "than today is left to delete",
                    size,
                    budget,
                )
                break
            self.metrics.budget_deleted.inc(deleted)
            rounds += 1
            size = await self.store.size()
        if rounds:
            log.warning(
                "event store over store_max_bytes (%d): deleted the oldest events in %d "
                "chunks; now %d bytes",
                budget,
                rounds,
                size,
            )
        self.metrics.store_bytes.set(size)

    async def _upkeep(self) -> None:
        """Probe a down store while no batch is retrying; run maintenance hourly and the
        budget every BUDGET_INTERVAL."""
        next_maintenance = 0.0
        next_budget = 0.0
        while True:
            if not self.writer.up and not self.writer.retrying:
                try:
                    await self.store.ping()
                except HoneyfleetError as e:
                    self.metrics.store_errors.labels("ping").inc()
                    log.debug("event store still unavailable: %s", e)
                else:
                    await self.writer.set_up(True)
            if self.writer.up and time.monotonic() >= next_maintenance:
                try:
                    await self.store.maintain(datetime.now(UTC))
                except HoneyfleetError as e:
                    self.metrics.store_errors.labels("maintain").inc()
                    log.warning("event store maintenance failed, will retry: %s", e)
                else:
                    next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL
            if self.writer.up and time.monotonic() >= next_budget:
                try:
                    await self._budget()
                except HoneyfleetError as e:
                    self.metrics.store_errors.labels("budget").inc()
                    log.warning("event store budget check failed, will retry: %s", e)
                next_budget = time.monotonic() + BUDGET_INTERVAL
            await asyncio.sleep(PROBE_INTERVAL)
