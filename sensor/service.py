"""The sensor process: frontends, the event spool and its uploader, leases, metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc

from honeyfleet.heap import release_periodically
from honeyfleet.instance import instance_uuid
from honeyfleet.jsonlines import JsonLinesLog
from honeyfleet.metrics_http import MetricsServer, serve_metrics
from honeyfleet.outbox import Outbox, OutboxMetrics
from honeyfleet.renewal import Renewer, controller_signer
from honeyfleet.spool import Spool
from honeyfleet.systemd import notify
from honeyfleet.tls import SMALL_ANSWERS, ChannelCache
from honeyfleet.uploader import Uploader
from honeyfleet.v1 import certificate_pb2, certificate_pb2_grpc
from sensor.artefacts import ArtefactWriter, DiskBudget, LocalCopies, disk_usage
from sensor.capture import FileStore
from sensor.config import SensorConfig
from sensor.eventbudget import EventBudget, EventLimits
from sensor.events import EventLog
from sensor.leases import LeaseClient
from sensor.metrics import SensorMetrics
from sensor.recording import Recordings
from sensor.session.admission import Admission
from sensor.session.budget import LeaseBudget
from sensor.session.core import Services
from sensor.ssh import SshFrontend, load_or_create, server_options
from sensor.ssh.connection import Shared
from sensor.ssh.faildelay import FailDelay, timing_secret
from sensor.ssh.gex import GroupChooser, load_moduli
from sensor.tunnel import TunnelConnector
from sensor.userdb import UserDB

if TYPE_CHECKING:
    from sensor.telnet import TelnetFrontend

log = logging.getLogger(__name__)

# How long stop() waits for the uploader and registration tasks after cancelling them.
STOP_TIMEOUT = 10.0
# Seconds between handing freed C heap back to the system (honeyfleet.heap).
HEAP_RELEASE_INTERVAL = 60.0


class Sensor:
    """A running sensor; ``start`` then ``stop`` (or use :func:`serve`)."""

    def __init__(self, config: SensorConfig) -> None:
        self.config = config
        self.metrics = SensorMetrics()
        self.ports: list[int] = []
        self.telnet_ports: list[int] = []
        self.spool: Spool | None = None
        self.uploader: Uploader | None = None
        self.admission: Admission | None = None
        self._events: EventLog | None = None
        self._frontend: SshFrontend | None = None
        self._telnet: TelnetFrontend | None = None
        self._controller: ChannelCache | None = None
        self.renewer: Renewer | None = None
        self._tunnels: TunnelConnector | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._metrics_server: MetricsServer | None = None
        self._jsonlines: JsonLinesLog | None = None
        self._leases: LeaseClient | None = None
        self._artefact_writer: ArtefactWriter | None = None
        self.outbox: Outbox | None = None
        """Captures and recordings on their way to the controller (None before start)."""
        self._stopped = False

    async def start(self) -> list[int]:
        """Open the spool, listen for attackers, start delivering events (SSH ports).

        A start that fails half-way (a port in use, say) undoes what it had done.
        """
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> list[int]:
        """The work of :meth:`start`."""
        config = self.config
        identity = config.tls.identity()
        host_keys = await asyncio.to_thread(
            load_or_create, config.state_dir / "keys", config.persona.host_keys
        )
        userdb = UserDB.load(config.userdb)
        self._jsonlines = JsonLinesLog(config.json_log) if config.json_log is not None else None
        # Opening the spool reads its database: off the event loop.
        self.spool = await asyncio.to_thread(
            Spool,
            config.state_dir / "spool.sqlite3",
            max_bytes=config.spool_max_bytes,
            near_full=config.spool_near_full,
            reserve_bytes=config.spool_reserve_bytes,
            mirror=self._jsonlines.write if self._jsonlines is not None else None,
        )
        sensor_uuid = await asyncio.to_thread(instance_uuid, config.uuid, config.state_dir)
        limits = EventLimits(
            session_max_events=config.session_max_events,
            session_events_per_minute=config.session_events_per_minute,
            source_max_events=config.source_max_events,
            source_events_per_minute=config.source_events_per_minute,
        )
        self._events = EventLog(
            self.spool, self.metrics, EventBudget(limits, self.metrics), sensor_uuid=sensor_uuid
        )
        # Leases and revocation lists: small answers only (uploads have channels of their own).
        self._controller = ChannelCache(config.tls, SMALL_ANSWERS)
        leases = self._leases = LeaseClient(
            self._controller.get(config.controller),
            timeout=config.lease_timeout,
            labels=config.guest_labels,
        )
        self._tunnels = TunnelConnector(config.tls)
        self.admission = Admission(config, self.metrics)
        used = await asyncio.to_thread(disk_usage, config.downloads_dir, config.recordings_dir)
        disk = DiskBudget(config.artefact_max_bytes, used, self.metrics)
        writer = self._artefact_writer = ArtefactWriter()
        outbox = self.outbox = Outbox(
            config.state_dir / "outbox",
            config.controller,
            config.tls,
            OutboxMetrics("honeyfleet_sensor", self.metrics.registry),
            max_bytes=config.artefact_outbox_max_bytes,
            max_files=config.artefact_outbox_max_files,
            on_delivered=None if config.artefact_keep_local else LocalCopies(config, disk).free,
        )
        await outbox.open()
        recordings = Recordings(
            config.recordings_dir,
            max_bytes=config.recording_max_bytes,
            held_bytes=config.recording_held_bytes,
            budget=disk,
            writer=writer,
        )
        services = Services(
            config=config,
            sensor=identity.name,
            events=self._events,
            metrics=self.metrics,
            userdb=userdb,
            leases=leases,
            tunnels=self._tunnels,
            admission=self.admission,
            budget=LeaseBudget(per_source=config.max_leases_per_source, total=config.max_leases),
            recordings=recordings,
            outbox=outbox,
        )
        self._frontend = SshFrontend(
            Shared(
                services=services,
                store=FileStore(
                    config.downloads_dir,
                    max_bytes=config.capture_max_bytes,
                    max_open=config.capture_max_open,
                    budget=disk,
                    writer=writer,
                ),
                options=server_options(config, host_keys),
                dh_groups=GroupChooser(
                    await asyncio.to_thread(load_moduli, config.moduli_file),
                    config.persona.dh_group_bits,
                ),
                fail_delay=FailDelay(timing_secret(host_keys), config.auth_fail_delay),
            )
        )
        self.ports = await self._frontend.start()
        if config.telnet_listen:
            # telnetlib3 and wcwidth are 3 MiB a sensor without Telnet never needs.
            from sensor.telnet import TelnetFrontend

            self._telnet = TelnetFrontend(services)
            self.telnet_ports = await self._telnet.start()
        listen = [f"{a}/ssh" for a in config.ssh_listen]
        listen += [f"{a}/telnet" for a in config.telnet_listen]
        self.uploader = Uploader(
            self.spool,
            config.controller,
            config.tls,
            batch=config.upload_batch,
            linger=config.upload_linger,
            max_linger=config.upload_max_linger,
        )
        renewer = self.renewer = Renewer(
            config.tls,
            controller_signer(config.controller, config.tls),
            on_renewed=self._use_renewed_certificate,
        )
        self._tasks = [
            asyncio.create_task(self.uploader.run()),
            asyncio.create_task(outbox.run()),
            asyncio.create_task(leases.register(listen)),
            asyncio.create_task(renewer.run()),
            asyncio.create_task(self._follow_revocations()),
            asyncio.create_task(release_periodically(HEAP_RELEASE_INTERVAL)),
        ]
        self._metrics_server = serve_metrics(config.metrics_listen, self.metrics.registry)
        log.info("sensor %s: SSH on %s, Telnet on %s", identity, self.ports, self.telnet_ports)
        return self.ports

    async def _follow_revocations(self) -> None:
        """Fetch the controller's revocation list every ``revocation_interval`` seconds."""
        assert self._controller is not None and self._tunnels is not None
        while True:
            stub = certificate_pb2_grpc.CertificateServiceStub(
                self._controller.get(self.config.controller)
            )
            try:
                reply = await stub.ListRevoked(
                    certificate_pb2.ListRevokedRequest(), timeout=self.config.lease_timeout
                )
                self._tunnels.update_revoked(frozenset(int(s, 16) for s in reply.serials))
            except grpc.aio.AioRpcError as e:
                log.warning("cannot fetch the revocation list: %s", e.code().name)
            except ValueError:
                log.warning("the controller sent a malformed revocation list")
            await asyncio.sleep(self.config.revocation_interval)

    def _use_renewed_certificate(self) -> None:
        """New channels from now on; running sessions keep their established connections."""
        assert self._controller is not None and self._leases is not None
        assert self._tunnels is not None
        self._controller.retire()
        self._tunnels.channels.retire()
        self._leases.use(self._controller.get(self.config.controller))

    @property
    def tunnels(self) -> TunnelConnector | None:
        """How this sensor reaches pool nodes (None before start)."""
        return self._tunnels

    @property
    def metrics_port(self) -> int | None:
        """The port metrics are served on (useful with port 0); None when they are off."""
        return self._metrics_server.port if self._metrics_server is not None else None

    async def stop(self) -> None:
        """Close every session (their last events are spooled), then stop (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        frontends = [f for f in (self._frontend, self._telnet) if f is not None]
        for frontend in frontends:
            frontend.close()
        if self.admission is not None:
            # Every session of both protocols; their last events are spooled.
            self.admission.close_all("sensor shutting down")
            await self.admission.drain()
        for frontend in frontends:
            await frontend.wait_closed()
        for task in self._tasks:
            task.cancel()
        # Bounded: a task that ignores its cancellation must not hang the shutdown.
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
            for task in stuck:
                log.error("sensor task %s did not stop within %.0fs", task, STOP_TIMEOUT)
        if self._leases is not None:
            # Leases granted to sessions that ended while waiting are released first
            # (bounded: every call has a deadline).
            await self._leases.drain()
            await self._leases.abandon_retries()
            self._leases.close()
        if self._tunnels is not None:
            await self._tunnels.close()
        if self._controller is not None:
            await self._controller.close()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self._artefact_writer is not None:
            await asyncio.to_thread(self._artefact_writer.close)  # the sessions' last writes
        if self.outbox is not None:
            await self.outbox.close()  # what waits is uploaded after the next start
        if self._events is not None:
            await self._events.flush()
            await self._events.close()
        if self._jsonlines is not None:
            self._jsonlines.close()


async def serve(config: SensorConfig, stop: asyncio.Event) -> None:
    """Run a sensor until ``stop`` is set."""
    sensor = Sensor(config)
    await sensor.start()
    notify("READY=1")
    try:
        await stop.wait()
        notify("STOPPING=1")
    finally:
        await sensor.stop()
