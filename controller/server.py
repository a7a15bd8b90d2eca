"""The controller process: fleet API over mTLS, enrolment over TLS, background upkeep."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from controller.artefacts import ArtefactServicer, ArtefactStore
from controller.certificate_service import CertificateServicer, local_signer
from controller.config import ControllerConfig
from controller.enrollment_service import EnrollmentServicer
from controller.events import EventPipeline
from controller.events.ingest_service import EventIngestServicer
from controller.events.query_service import EventQueryServicer
from controller.fleet_service import FleetServicer
from controller.lease_service import LeaseServicer, SensorServicer
from controller.leases import LeaseManager
from controller.nodeclient import NodeClients
from controller.ratelimit import RateLimiter
from controller.registry import Registry
from controller.registry_service import PoolNodeRegistryServicer
from controller.stall import LoopLag, StallMeter
from controller.statestore import StateStore
from controller.waiters import CapacityWaiters
from honeyfleet.authz import ALL_ROLES, Authorizer
from honeyfleet.grpcserver import add_health_and_reflection, bind, mark_serving, new_server
from honeyfleet.pki import RevocationList, load_ca
from honeyfleet.pki.identity import Role
from honeyfleet.renewal import Renewer
from honeyfleet.systemd import notify
from honeyfleet.tls import server_credentials
from honeyfleet.v1 import (
    artefact_pb2,
    artefact_pb2_grpc,
    certificate_pb2,
    certificate_pb2_grpc,
    enrollment_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    lease_pb2,
    lease_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    sensor_pb2,
    sensor_pb2_grpc,
)

log = logging.getLogger(__name__)

# Who may call which controller service.
POLICY = {
    "honeyfleet.v1.PoolNodeRegistryService": frozenset({Role.POOLNODE}),
    "honeyfleet.v1.LeaseService": frozenset({Role.SENSOR}),
    "honeyfleet.v1.SensorService": frozenset({Role.SENSOR}),
    # Pool nodes report their own events, on the sessions of their leases.
    "honeyfleet.v1.EventIngestService": frozenset({Role.SENSOR, Role.POOLNODE}),
    "honeyfleet.v1.FleetService": frozenset({Role.ADMIN}),
    "honeyfleet.v1.EventQueryService": frozenset({Role.ADMIN}),
    # Members upload what they captured; only operators read it back.
    "honeyfleet.v1.ArtefactService": frozenset({Role.ADMIN}),
    "honeyfleet.v1.ArtefactService/Upload": frozenset({Role.SENSOR, Role.POOLNODE}),
    # Every member renews its own certificate; the certificate is the authorization.
    "honeyfleet.v1.CertificateService": ALL_ROLES,
}
SERVICES = [
    registry_pb2.DESCRIPTOR.services_by_name["PoolNodeRegistryService"].full_name,
    lease_pb2.DESCRIPTOR.services_by_name["LeaseService"].full_name,
    sensor_pb2.DESCRIPTOR.services_by_name["SensorService"].full_name,
    fleet_pb2.DESCRIPTOR.services_by_name["FleetService"].full_name,
    ingest_pb2.DESCRIPTOR.services_by_name["EventIngestService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventQueryService"].full_name,
    certificate_pb2.DESCRIPTOR.services_by_name["CertificateService"].full_name,
    artefact_pb2.DESCRIPTOR.services_by_name["ArtefactService"].full_name,
]
SHUTDOWN_GRACE = 5.0
REVOCATION_POLL = 1.0
ENROLL_MAX_MESSAGE = 64 * 1024
ENROLL_MAX_RPCS = 16
# A joiner needs one RPC: connections that idle or linger are closed.
ENROLL_IDLE_MS = 15_000
ENROLL_AGE_MS = 30_000
# Seconds between writes of nodes' heartbeat times and sensors' last-seen times.
PERSIST_SECONDS = 30.0
# Seconds between artefact retention runs.
ARTEFACT_UPKEEP_SECONDS = 3600.0


@dataclass(frozen=True)
class Ports:
    """Where a started controller listens (useful when configured with port 0)."""

    api: int
    enroll: int | None


class Controller:
    """A running controller; ``start`` then ``stop`` (or use :func:`serve`)."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.store = StateStore(config.state_dir / "controller.sqlite3")
        dead_after = config.heartbeat_interval * config.missed_heartbeats
        self.registry = Registry(
            self.store,
            CapacityWaiters(config.max_waiting_acquires),
            dead_after=dead_after,
            heartbeat_interval=config.heartbeat_interval,
            max_node_guests=config.max_node_guests,
        )
        self.loop_lag = LoopLag()
        self.nodes = NodeClients(config.tls, timeout=config.allocate_timeout)
        self.leases = LeaseManager(
            self.registry,
            self.store,
            self.nodes,
            ttl=config.lease_ttl,
            wait=config.lease_wait,
            max_per_sensor=config.max_leases_per_sensor,
            max_in_flight=config.max_acquires_in_flight,
            loop_lag=lambda: self.loop_lag.seconds,
            max_loop_lag=config.shed_loop_lag,
        )
        self.artefacts = ArtefactStore(
            config.artefacts,
            max_bytes=config.artefact_store_max_bytes,
            max_upload_bytes=config.artefact_max_upload_bytes,
            max_uploads=config.artefact_max_uploads,
            retention_days=config.artefact_retention_days,
        )
        self.events = EventPipeline(config, self.registry, self.leases)
        self.events.metrics_registry.register(self.leases.metrics.registry)
        self.events.metrics_registry.register(self.artefacts.metrics.registry)
        self._servers: list[grpc.aio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.authorizer: Authorizer | None = None
        self.ports: Ports | None = None
        self._revocations: RevocationList | None = None

    async def start(self) -> Ports:
        """Open the store, bind the servers and start background upkeep."""
        config = self.config
        identity = config.tls.identity()
        await self.store.open()
        # Nodes get two TTLs: their leases get one from now, and a node reconnecting
        # with backoff must be back before those leases would fail with it.
        await self.registry.load(grace=2 * config.lease_ttl)
        await self.leases.load()
        await self.events.start()
        await self.artefacts.open()
        ca = load_ca(config.ca_dir) if config.ca_dir is not None else None
        if ca is not None:
            self._revocations = RevocationList(ca.revoked_path)
        self.authorizer = Authorizer(identity.fleet, POLICY)
        self.authorizer.update_revoked(self._revoked())

        server = new_server(self.authorizer, max_concurrent_streams=config.max_concurrent_streams)
        registry_pb2_grpc.add_PoolNodeRegistryServiceServicer_to_server(
            PoolNodeRegistryServicer(
                self.registry,
                self.leases,
                self.nodes,
                heartbeat_interval=config.heartbeat_interval,
                revoked_serials=self._revoked,
            ),
            server,
        )
        lease_pb2_grpc.add_LeaseServiceServicer_to_server(
            LeaseServicer(self.registry, self.leases, max_calls=config.max_concurrent_streams),
            server,
        )
        sensor_pb2_grpc.add_SensorServiceServicer_to_server(SensorServicer(self.registry), server)
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(
            FleetServicer(self.registry, self.leases, self.store), server
        )
        ingest_pb2_grpc.add_EventIngestServiceServicer_to_server(
            EventIngestServicer(self.events, self.registry, self.leases.get), server
        )
        events_pb2_grpc.add_EventQueryServiceServicer_to_server(
            EventQueryServicer(self.events.store, self.events.broadcaster), server
        )
        artefact_pb2_grpc.add_ArtefactServiceServicer_to_server(
            ArtefactServicer(self.artefacts), server
        )
        if ca is not None:
            certificate_pb2_grpc.add_CertificateServiceServicer_to_server(
                CertificateServicer(
                    ca, validity_days=config.cert_validity_days, revoked=self._revoked
                ),
                server,
            )
        health = add_health_and_reflection(server, SERVICES)

        api_port = bind(server, config.listen, server_credentials(config.tls))
        await server.start()
        self._servers.append(server)
        await mark_serving(health, SERVICES)
        # The ingest service is only as healthy as the event store behind it.
        await self.events.attach_health(health)

        enroll_port = None
        if ca is not None and config.enroll_listen:
            enroll = grpc.aio.server(
                # Unauthenticated callers: few at once, small messages, short connections.
                maximum_concurrent_rpcs=ENROLL_MAX_RPCS,
                options=[
                    ("grpc.so_reuseport", 0),
                    ("grpc.max_receive_message_length", ENROLL_MAX_MESSAGE),
                    ("grpc.max_connection_idle_ms", ENROLL_IDLE_MS),
                    ("grpc.max_connection_age_ms", ENROLL_AGE_MS),
                    ("grpc.max_connection_age_grace_ms", ENROLL_AGE_MS),
                ],
            )
            enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server(
                EnrollmentServicer(
                    ca,
                    self.store,
                    RateLimiter(config.enroll_per_minute, config.enroll_burst),
                    validity_days=config.cert_validity_days,
                ),
                enroll,
            )
            credentials = server_credentials(config.tls, client_auth=False)
            enroll_port = bind(enroll, config.enroll_listen, credentials)
            await enroll.start()
            self._servers.append(enroll)
            log.info("enrolment endpoint on port %d", enroll_port)

        liveness = config.heartbeat_interval / 2
        self._spawn(self._every(liveness, self._check_liveness(StallMeter(liveness))))
        expiry = min(config.lease_ttl / 4, 5.0)
        self._spawn(self._every(expiry, self._expire_leases(StallMeter(expiry))))
        self._spawn(self.loop_lag.run())
        self._spawn(self._every(REVOCATION_POLL, self._refresh_revocations))
        if ca is not None:
            signer = local_signer(ca, config.tls, validity_days=config.cert_validity_days)
            # Client channels to pool nodes are rebuilt with the new certificate.
            self._spawn(Renewer(config.tls, signer, on_renewed=self.nodes.channels.retire).run())
        else:
            log.warning(
                "no ca_dir: this controller cannot renew its own certificate; replace "
                "%s before it expires",
                config.tls.cert,
            )
        self._spawn(self._every(PERSIST_SECONDS, self.registry.persist))
        self._spawn(self._every(ARTEFACT_UPKEEP_SECONDS, self._expire_artefacts))
        log.info("controller %s serving the fleet API on port %d", identity, api_port)
        self.ports = Ports(api=api_port, enroll=enroll_port)
        return self.ports

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop serving, finish upkeep and close the store."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await asyncio.gather(*(s.stop(grace) for s in self._servers))
        self._servers.clear()
        await self.events.stop()
        await self.artefacts.close()
        await self.registry.persist()
        await self.nodes.close()
        await self.store.close()

    def _revoked(self) -> frozenset[int]:
        return self._revocations.serials() if self._revocations else frozenset()

    async def _refresh_revocations(self) -> None:
        if self._revocations is not None and self._revocations.refresh():
            assert self.authorizer is not None
            self.authorizer.update_revoked(self._revoked())

    async def _expire_artefacts(self) -> None:
        await self.artefacts.expire(time.time_ns() // 1000)

    def _check_liveness(self, stall: StallMeter) -> Callable[[], Awaitable[None]]:
        """The liveness job: nodes silent for missed_heartbeats intervals die."""

        async def check_liveness() -> None:
            for node in self.registry.find_dead(stall.stalled()):
                missed = self.config.missed_heartbeats
                log.warning("pool node %s missed %d heartbeats: marked dead", node.name, missed)
                self.leases.metrics.nodes_dead.inc()
                self.leases.fail_node(
                    node.name, f"pool node {node.name} stopped heartbeating (missed {missed})"
                )

        return check_liveness

    def _expire_leases(self, stall: StallMeter) -> Callable[[], Awaitable[None]]:
        """The expiry job: leases not renewed within lease_ttl expire."""

        async def expire_leases() -> None:
            self.leases.expire_due(stall.stalled())

        return expire_leases

    def _spawn(self, coro: Awaitable[None]) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    async def _every(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` every ``seconds``; a failing run is logged, never fatal."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                log.exception("controller upkeep %s failed", getattr(job, "__name__", job))


async def serve(config: ControllerConfig, stop: asyncio.Event) -> None:
    """Run a controller until ``stop`` is set, then shut down gracefully."""
    controller = Controller(config)
    await controller.start()
    notify("READY=1")
    try:
        await stop.wait()
        notify("STOPPING=1")
    finally:
        await controller.stop()
