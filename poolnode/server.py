"""The pool node process: serves its pool to the controller and keeps the controller link."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from pathlib import Path

import grpc

from honeyfleet import __version__
from honeyfleet.authz import Authorizer
from honeyfleet.eventlog import EventLog, SpoolMetrics
from honeyfleet.grpcserver import add_health_and_reflection, bind, mark_serving, new_server
from honeyfleet.instance import instance_uuid
from honeyfleet.jsonlines import JsonLinesLog
from honeyfleet.metrics_http import MetricsServer, serve_metrics
from honeyfleet.outbox import Outbox, OutboxMetrics
from honeyfleet.pki import write_private
from honeyfleet.pki.identity import Role
from honeyfleet.renewal import Renewer, controller_signer
from honeyfleet.spool import Spool
from honeyfleet.systemd import notify
from honeyfleet.tls import server_credentials
from honeyfleet.uploader import Uploader
from honeyfleet.v1 import poolnode_pb2, poolnode_pb2_grpc, registry_pb2
from poolnode.backend import Backend
from poolnode.config import PoolNodeConfig
from poolnode.controller_link import ControllerLink
from poolnode.diskdiff import DiskDiffer
from poolnode.downloads import Downloads
from poolnode.egress import Egress
from poolnode.events import NodeEvents
from poolnode.pool import GuestPool
from poolnode.service import PoolNodeServicer, allocate_guest
from poolnode.tunnel import TunnelServicer, add_tunnel_service

log = logging.getLogger(__name__)

POLICY = {
    "honeyfleet.v1.PoolNodeService": frozenset({Role.CONTROLLER}),
    "honeyfleet.v1.TunnelService": frozenset({Role.SENSOR}),
}
SERVICES = [
    poolnode_pb2.DESCRIPTOR.services_by_name["PoolNodeService"].full_name,
    poolnode_pb2.DESCRIPTOR.services_by_name["TunnelService"].full_name,
]
SHUTDOWN_GRACE = 5.0
REVOKED_FILE = "revoked-serials"


class PoolNode:
    """A running pool node; ``start`` then ``stop``."""

    def __init__(self, config: PoolNodeConfig, backend: Backend) -> None:
        self.config = config
        self.pool = GuestPool(config, backend)
        if backend.name == "libvirt":
            # A static backend's hosts are the operator's own: their network is theirs.
            self.pool.egress = Egress(
                config,
                self.pool.guest_at,
                metrics=self.pool.metrics,
                address_of_mac=self.pool.address_of_mac,
            )
        self.draining = False
        self.address = config.advertised
        self.authorizer: Authorizer | None = None
        self.link: ControllerLink | None = None
        self._server: grpc.aio.Server | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._renewer_task: asyncio.Task[None] | None = None
        self.renewer: Renewer | None = None
        self._metrics: MetricsServer | None = None
        self.events: NodeEvents | None = None
        """The node's own events (egress, guests' disks, life cycle); None before start."""
        self.uploader: Uploader | None = None
        self.outbox = Outbox(
            config.state_dir / "outbox",
            config.controller,
            config.tls,
            OutboxMetrics("honeyfleet_poolnode", self.pool.metrics.registry),
            max_bytes=config.artefact_outbox_max_bytes,
            max_files=config.artefact_outbox_max_files,
        )
        """Files from guests' disks on their way to the controller's artefact store."""
        self.downloads = Downloads(
            config.state_dir / "downloads",
            max_bytes=config.downloads_max_bytes,
            max_age=config.downloads_max_age,
            queued=self.outbox.queued,
            metrics=self.pool.metrics,
        )
        """Prunes what fetches and disk diffs keep in state_dir/downloads."""
        if config.disk_diff:
            self.pool.disk_diff = DiskDiffer(config, self.pool.metrics, artefacts=self.outbox)
        if self.pool.egress is not None:
            self.pool.egress.sinkhole.artefacts = self.outbox
            self.pool.egress.sinkhole.downloads = self.downloads
        self._outbox_task: asyncio.Task[None] | None = None
        self._downloads_task: asyncio.Task[None] | None = None
        self._outbox_open = False
        self._event_log: EventLog | None = None
        self._jsonlines: JsonLinesLog | None = None
        self._uploader_task: asyncio.Task[None] | None = None
        # The controller's revocation list, kept in state_dir so that a restarted node
        # refuses revoked certificates from its first RPC, before it reaches the controller.
        self._revoked_path = config.state_dir / REVOKED_FILE
        self._revoked: frozenset[int] = frozenset()

    async def start(self) -> int:
        """Serve the pool and connect to the controller; returns the bound port."""
        config = self.config
        identity = config.tls.identity()
        self.authorizer = Authorizer(identity.fleet, POLICY)
        await self._open_events(identity.name)
        await self.outbox.open()
        self._outbox_open = True
        self._revoked = await asyncio.to_thread(_load_revoked, self._revoked_path)
        self.authorizer.update_revoked(self._revoked)
        self._server = server = new_server(self.authorizer)
        poolnode_pb2_grpc.add_PoolNodeServiceServicer_to_server(PoolNodeServicer(self.pool), server)
        add_tunnel_service(TunnelServicer(self.pool), server)
        health = add_health_and_reflection(server, SERVICES)
        port = bind(server, config.listen, server_credentials(config.tls))
        await server.start()
        await mark_serving(health, SERVICES)
        if not config.advertise and config.listen.endswith(":0"):
            self.address = f"{config.listen.rpartition(':')[0]}:{port}"
        self.link = ControllerLink(
            config.controller,
            config.tls,
            registration=self._registration,
            snapshot=self.pool.snapshot,
            table_version=lambda: self.pool.table_version,
            on_response=self._on_heartbeat_reply,
            allocate=functools.partial(allocate_guest, self.pool),
        )
        self.pool.set_on_change(self.link.nudge)
        self._metrics = serve_metrics(config.metrics_listen, self.pool.metrics.registry)
        await self.pool.start()
        self._link_task = asyncio.create_task(self.link.run())
        self.renewer = Renewer(config.tls, controller_signer(config.controller, config.tls))
        self._renewer_task = asyncio.create_task(self.renewer.run())
        assert self._event_log is not None
        self.uploader = Uploader(
            self._event_log.spool,
            config.controller,
            config.tls,
            batch=config.upload_batch,
            linger=config.upload_linger,
            max_linger=config.upload_max_linger,
        )
        self._uploader_task = asyncio.create_task(self.uploader.run())
        self._outbox_task = asyncio.create_task(self.outbox.run())
        self._downloads_task = asyncio.create_task(self.downloads.run())
        log.info(
            "pool node %s serving on port %d (%s backend, %d guests)",
            identity,
            port,
            self.pool.backend,
            self.pool.capacity,
        )
        return port

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop serving, destroy every guest and leave the controller."""
        if self._server is not None:
            await self._server.stop(grace)
        await self.pool.stop()
        if self._metrics is not None:
            await self._metrics.stop()
            self._metrics = None
        tasks = (
            self._link_task,
            self._renewer_task,
            self._uploader_task,
            self._outbox_task,
            self._downloads_task,
        )
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # After the pool: destroying guests writes their last events.
        if self._event_log is not None:
            await self._event_log.flush()
            await self._event_log.close()
            self._event_log = None
        if self._jsonlines is not None:
            self._jsonlines.close()
            self._jsonlines = None
        if self._outbox_open:
            self._outbox_open = False
            await self.outbox.close()  # what waits is uploaded after the next start

    async def _open_events(self, name: str) -> None:
        """Open the event spool (its database is read off the event loop)."""
        config = self.config
        self._jsonlines = JsonLinesLog(config.json_log) if config.json_log is not None else None
        spool = await asyncio.to_thread(
            Spool,
            config.spool,
            max_bytes=config.spool_max_bytes,
            near_full=config.spool_near_full,
            reserve_bytes=config.spool_reserve_bytes,
            mirror=self._jsonlines.write if self._jsonlines is not None else None,
        )
        uuid = await asyncio.to_thread(instance_uuid, config.uuid, config.state_dir)
        metrics = SpoolMetrics("honeyfleet_poolnode", self.pool.metrics.registry)
        self._event_log = EventLog(spool, metrics, instance_uuid=uuid)
        self.events = self.pool.events = NodeEvents(self._event_log, pool_node=name)
        if self.pool.disk_diff is not None:
            self.pool.disk_diff.events = self.events
        if self.pool.egress is not None:
            self.pool.egress.events = self.events

    def _registration(self) -> registry_pb2.RegisterPoolNodeRequest:
        return registry_pb2.RegisterPoolNodeRequest(
            address=self.address,
            capacity=self.pool.capacity,
            labels=dict(self.config.labels),
            share_guests=self.config.share_guests,
            version=__version__,
            backend=self.pool.backend,
        )

    async def _on_heartbeat_reply(self, reply: registry_pb2.HeartbeatResponse) -> None:
        """Apply the controller's revocations, drain state, and the leases it ended or
        no longer knows (releasing is idempotent: an end may be told twice)."""
        assert self.authorizer is not None
        revoked = frozenset(int(serial, 16) for serial in reply.revoked_serials)
        if revoked != self._revoked:
            self._revoked = revoked
            self.authorizer.update_revoked(revoked)
            await asyncio.to_thread(_save_revoked, self._revoked_path, revoked)
        if reply.draining != self.draining:
            self.draining = reply.draining
            log.info("controller %s this node", "drained" if reply.draining else "resumed")
        for ended in reply.ended_leases:
            await self.pool.release(ended.lease_id, ended.reason or "ended by the controller")
        for lease_id in reply.stale_lease_ids:
            await self.pool.release(lease_id, "the controller no longer knows this lease")


def _load_revoked(path: Path) -> frozenset[int]:
    """The revoked serials saved by an earlier run (hex, one a line); none if never saved."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return frozenset()
    except (OSError, UnicodeDecodeError) as e:
        # Refusing to start would keep the node down; it learns the list on its heartbeat.
        log.warning("cannot read the saved revocation list %s (%s)", path, e)
        return frozenset()
    serials = set()
    for line in text.split():
        try:
            serials.add(int(line, 16))
        except ValueError:
            log.warning("ignoring a bad serial %r in %s", line[:40], path)
    return frozenset(serials)


def _save_revoked(path: Path, serials: frozenset[int]) -> None:
    """Save the revoked serials for the next start (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{serial:x}\n" for serial in sorted(serials))
    write_private(path, text.encode(), overwrite=True)


async def serve(config: PoolNodeConfig, stop: asyncio.Event) -> None:
    """Run a pool node until ``stop`` is set; stopping destroys its guests."""
    from poolnode.backends import build_backend

    node = PoolNode(config, build_backend(config))
    await node.start()
    notify("READY=1")
    try:
        await stop.wait()
        notify("STOPPING=1")
    finally:
        await node.stop()
