"""The simulated fleet of bench/fleet_scale.py: pool nodes and sensors in one worker process.

A pool node serves the real PoolNodeService (``poolnode.service.PoolNodeServicer``) over
mTLS on loopback in front of pretend guests (:class:`SimPool`), and keeps the real
``ControllerLink``: it registers, heartbeats every interval (with its guest table only
when that changed) and is nudged when guests change by themselves, as a real node is.
A sensor has the real ``LeaseClient`` (its lease stream) on one channel and the real ``Uploader`` on
another, fed from an in-memory spool instead of SQLite so that the simulator's disk does
not cap the event rate.

A worker takes commands from the parent over a pipe: run a phase (lease and event rates
between two wall-clock times, then a bounded drain), report its figures, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from honeyfleet import __version__
from honeyfleet.authz import Authorizer
from honeyfleet.errors import ResourceExhausted
from honeyfleet.events import Event, make_event, new_session_id, to_json
from honeyfleet.grpcserver import bind, new_server
from honeyfleet.spool import Spool, Spooled
from honeyfleet.tls import SMALL_ANSWERS, TlsFiles, secure_channel, server_credentials
from honeyfleet.uploader import Uploader
from honeyfleet.v1 import common_pb2, poolnode_pb2_grpc, registry_pb2
from poolnode.controller_link import ControllerLink
from poolnode.server import POLICY as NODE_POLICY
from poolnode.service import Allocation, PoolNodeServicer, allocate_guest
from sensor.leases import LeaseClient, LeaseFailed

log = logging.getLogger(__name__)

TICK = 0.02
LAG_PERIOD = 0.05
START_TIMEOUT = 90.0
START_PARALLEL = 32
EVENTS_PER_SESSION = 20
CODE_NAMES = frozenset(code.name for code in grpc.StatusCode)
VARYING = re.compile(r"[0-9a-f]{32}|[\w.\[\]:-]+:\d+")


@dataclass(frozen=True)
class Member:
    """One simulated fleet member and its certificate."""

    name: str
    """Its name in the certificate (``poolnode/<name>`` or ``sensor/<name>``)."""
    tls: TlsFiles
    """Its own certificate issued by the fleet CA."""


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker process plays."""

    controller: str
    """host:port of the controller's fleet API."""
    fleet: str
    """The fleet name (trust domain) of the CA."""
    nodes: tuple[Member, ...]
    """Pool nodes this worker plays."""
    sensors: tuple[Member, ...]
    """Sensors this worker plays."""
    guests: int
    """Guests per pool node."""
    hold: float
    """Seconds a session keeps its lease before releasing it."""
    idle: float
    """Seconds a released guest stays idle before it is replaced."""
    boot: float
    """Seconds a replacement guest boots before it is pristine."""
    lease_timeout: float
    """The sensors' lease deadline (the sensor's lease_timeout)."""
    upload_batch: int
    """Most events per uploaded batch (the sensor's upload_batch)."""
    upload_linger: float
    """Seconds the uploader lets a burst gather (the sensor's upload_linger)."""
    upload_max_linger: float
    """Most seconds the controller's hint may make it gather (the sensor's upload_max_linger)."""
    nice: int = 0
    """Added to the worker's niceness, so that on a shared machine it yields to the controller."""


@dataclass(frozen=True)
class Phase:
    """One stretch of load, the same for every worker but for its share of the rates."""

    name: str
    """Shown in the tables."""
    start: float
    """Wall-clock time (``time.time()``) at which load starts."""
    seconds: float
    """How long load is generated."""
    lease_rate: float
    """Sessions (acquire, hold, release) this worker starts per second."""
    event_rate: float
    """Events this worker's sensors spool per second."""
    drain: float
    """At most this long after the load for outstanding answers."""


@dataclass
class Stats:
    """One worker's figures for one phase (pickled back to the parent)."""

    latency: dict[str, list[float]] = field(default_factory=dict)
    """Seconds per sample: acquire, release, heartbeat, event ack, loop lag."""
    codes: Counter[str] = field(default_factory=Counter)
    """Outcomes of calls and logged client errors, "<call> <code>"."""
    counts: Counter[str] = field(default_factory=Counter)
    """Everything else counted (leases, events, refusals, stale ids...)."""
    details: dict[str, str] = field(default_factory=dict)
    """The details of the first failed call of each "<call> <code>": what the code meant."""
    cpu: float = 0.0
    """This worker's CPU seconds during the phase."""

    def record(self, what: str, seconds: float) -> None:
        """Add one latency sample."""
        self.latency.setdefault(what, []).append(seconds)


class Recorder:
    """Where the worker's parts put their figures; the phase swaps in fresh Stats."""

    def __init__(self) -> None:
        self.stats = Stats()


class CallRecorder(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Records the latency and status code of every unary call on a sensor's channel."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        """Time the call; the caller gets the call object (and its outcome) unchanged."""
        started = time.monotonic()
        call = await continuation(client_call_details, request)
        code = await call.code()
        method = client_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        name = method.rsplit("/", 1)[-1]
        stats = self._recorder.stats
        key = f"{name} {code.name}"
        stats.codes[key] += 1
        if code is grpc.StatusCode.OK:
            stats.record(name, time.monotonic() - started)
        elif key not in stats.details:
            stats.details[key] = await call.details() or ""
        return call


class ErrorCounter(logging.Handler):
    """Counts the warnings the real client code logs (stream errors), by logger and code."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(logging.WARNING)
        self._recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        """Count one record under its gRPC code, its exception or else its message."""
        args = record.args if isinstance(record.args, tuple) else ()
        texts = [str(a) for a in args if isinstance(a, str | Exception)]
        # "RESOURCE_EXHAUSTED" or "RESOURCE_EXHAUSTED (details)": the code is the row.
        code = next((t.split()[0] for t in texts if t and t.split()[0] in CODE_NAMES), None)
        # Else the first argument that is neither an address nor an id: one row per kind
        # of problem, never one per lease.
        other = next((t for t in texts if not VARYING.fullmatch(t)), None)
        detail = code or other or str(record.msg)
        self._recorder.stats.codes[f"{record.name.rsplit('.', 1)[-1]}: {detail[:60]}"] += 1


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class SimGuest:
    """A pretend guest: only its place in the guest state machine."""

    def __init__(self, guest_id: str, state: common_pb2.GuestState.ValueType) -> None:
        self.id = guest_id
        self.state = state
        self.src_ips: list[str] = []
        self.sensor = ""
        self.created = self.changed = time.time()

    def move(self, state: common_pb2.GuestState.ValueType) -> None:
        """Enter ``state``."""
        self.state = state
        self.changed = time.time()

    def to_proto(self) -> common_pb2.Guest:
        """As reported in heartbeats and allocations."""
        return common_pb2.Guest(
            id=self.id,
            state=self.state,
            src_ips=self.src_ips,
            lease_count=int(self.state == common_pb2.GUEST_STATE_LEASED),
            create_time=_timestamp(self.created),
            state_change_time=_timestamp(self.changed),
        )


class SimPool:
    """The Pool a real node's service serves, with guests that change on timers.

    A guest is pristine, leased, idle for ``idle`` seconds after its lease ends, then
    replaced by a new guest that boots for ``boot`` seconds: as many guest changes (and
    so heartbeat nudges) per lease as a real pool makes.
    """

    backend = "bench"

    def __init__(
        self, node: str, size: int, *, idle: float, boot: float, recorder: Recorder
    ) -> None:
        self._node = node
        self._idle = idle
        self._boot = boot
        self._recorder = recorder
        self._ids = itertools.count()
        self.guests: dict[str, SimGuest] = {}
        self._leases: dict[str, SimGuest] = {}
        self.on_change: Callable[[], None] = lambda: None
        # As a real pool's: up with every change; heartbeats and answers carry it.
        self.table_version = 1
        for _ in range(size):
            guest = self._new_guest(common_pb2.GUEST_STATE_PRISTINE)
            self.guests[guest.id] = guest

    @property
    def capacity(self) -> int:
        """Guests kept alive."""
        return len(self.guests)

    def _new_guest(self, state: common_pb2.GuestState.ValueType) -> SimGuest:
        return SimGuest(f"{self._node}-g{next(self._ids)}", state)

    async def allocate(
        self,
        lease_id: str,
        src_ip: str,
        sensor: str,
        *,
        allow_shared: bool,
        session: str = "-",
        protocol: str = "-",
    ) -> Allocation:
        """Lease the first pristine guest, or refuse as a real node does."""
        counts = self._recorder.stats.counts
        guest = next(
            (g for g in self.guests.values() if g.state == common_pb2.GUEST_STATE_PRISTINE), None
        )
        if lease_id in self._leases or guest is None:
            counts["node: AllocateGuest refused"] += 1
            raise ResourceExhausted("no pristine guest left on this node")
        counts["node: AllocateGuest granted"] += 1
        guest.move(common_pb2.GUEST_STATE_LEASED)
        guest.src_ips.append(src_ip)
        guest.sensor = sensor
        self._leases[lease_id] = guest
        self.table_version += 1  # the controller's own change: no early heartbeat
        return Allocation(
            guest=guest.to_proto(),
            credentials=common_pb2.GuestCredentials(username="root", password="-"),  # noqa: S106
            shared=False,
            table_version=self.table_version,
        )

    async def release(self, lease_id: str, reason: str) -> int:
        """End a lease: the guest idles, then is replaced by a booting one."""
        guest = self._leases.pop(lease_id, None)
        if guest is None:
            return self.table_version
        self._recorder.stats.counts["node: releases"] += 1
        guest.move(common_pb2.GUEST_STATE_IDLE)
        self.table_version += 1
        asyncio.get_running_loop().call_later(self._idle, self._replace, guest)
        return self.table_version

    def _replace(self, old: SimGuest) -> None:
        if self.guests.pop(old.id, None) is None:
            return
        guest = self._new_guest(common_pb2.GUEST_STATE_BOOTING)
        self.guests[guest.id] = guest
        self.table_version += 1
        self.on_change()
        asyncio.get_running_loop().call_later(self._boot, self._booted, guest)

    def _booted(self, guest: SimGuest) -> None:
        if guest.id in self.guests:
            guest.move(common_pb2.GUEST_STATE_PRISTINE)
            self.table_version += 1
            self.on_change()

    def lease_sensor(self, lease_id: str) -> str | None:
        """The sensor a live lease was issued to."""
        guest = self._leases.get(lease_id)
        return guest.sensor if guest else None

    def snapshot(self) -> registry_pb2.HeartbeatRequest:
        """The guest table, as a real pool sends it."""
        states = Counter(g.state for g in self.guests.values())
        counts = common_pb2.GuestCounts(
            booting=states[common_pb2.GUEST_STATE_BOOTING],
            pristine=states[common_pb2.GUEST_STATE_PRISTINE],
            leased=states[common_pb2.GUEST_STATE_LEASED],
            idle=states[common_pb2.GUEST_STATE_IDLE],
        )
        return registry_pb2.HeartbeatRequest(
            guest_counts=counts,
            guests=[g.to_proto() for g in self.guests.values()],
            lease_ids=sorted(self._leases),
            table_version=self.table_version,
        )


class SimNode:
    """A pool node: PoolNodeService over mTLS and the real controller link."""

    def __init__(self, member: Member, plan: WorkerPlan, recorder: Recorder) -> None:
        self._member = member
        self._plan = plan
        self._recorder = recorder
        self.pool = SimPool(
            member.name, plan.guests, idle=plan.idle, boot=plan.boot, recorder=recorder
        )
        self.address = ""
        self.link: ControllerLink | None = None
        self._server: grpc.aio.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve the pool and start the link."""
        self._server = new_server(Authorizer(self._plan.fleet, NODE_POLICY))
        poolnode_pb2_grpc.add_PoolNodeServiceServicer_to_server(
            PoolNodeServicer(self.pool), self._server
        )
        port = bind(self._server, "127.0.0.1:0", server_credentials(self._member.tls))
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        self.link = ControllerLink(
            self._plan.controller,
            self._member.tls,
            registration=self._registration,
            snapshot=self.pool.snapshot,
            table_version=lambda: self.pool.table_version,
            on_response=self._on_response,
            allocate=functools.partial(allocate_guest, self.pool),
            on_round_trip=self._round_trip,
        )
        self.pool.on_change = self.link.nudge
        self._task = asyncio.create_task(self.link.run())

    async def stop(self) -> None:
        """Stop the link and the server."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            await self._server.stop(1)

    def _registration(self) -> registry_pb2.RegisterPoolNodeRequest:
        return registry_pb2.RegisterPoolNodeRequest(
            address=self.address,
            capacity=self.pool.capacity,
            version=__version__,
            backend=SimPool.backend,
        )

    def _round_trip(self, seconds: float) -> None:
        self._recorder.stats.record("heartbeat", seconds)

    async def _on_response(self, reply: registry_pb2.HeartbeatResponse) -> None:
        stats = self._recorder.stats
        if reply.between_heartbeats:
            stats.counts["node: messages between heartbeats"] += 1
        else:
            stats.counts["node: heartbeats answered"] += 1
        for ended in reply.ended_leases:
            await self.pool.release(ended.lease_id, ended.reason)
        for lease_id in reply.stale_lease_ids:
            stats.counts["node: stale lease ids"] += 1
            await self.pool.release(lease_id, "the controller no longer knows this lease")


class MemorySpool:
    """What the Uploader uses of a Spool, in memory; times each batch until its ack, and
    each event from its append until its batch's ack (delivery, lingering included)."""

    def __init__(self, recorder: Recorder) -> None:
        self.path = Path("(memory)")
        self.count = 0
        self.bytes = 0
        self._appended: dict[int, float] = {}
        self.changed = asyncio.Event()
        self._recorder = recorder
        self._events: dict[int, Spooled] = {}
        self._seq = itertools.count(1)
        self._batch_sent = 0.0

    def append(self, event: Event) -> None:
        """Queue an event for the uploader."""
        seq = next(self._seq)
        text = to_json(event)
        item = self._events[seq] = Spooled(seq, event, text, len(text))
        self._appended[seq] = time.monotonic()
        self.count += 1
        self.bytes += item.size
        self.changed.set()

    async def oldest(self, limit: int, max_bytes: int) -> list[Spooled]:
        """The oldest events; the uploader sends them at once."""
        batch = list(itertools.islice(self._events.values(), limit))
        # The uploader reads again after lingering, and resends after a broken stream:
        # the last read before an ack is when that batch went out. (Resent events show in
        # the controller's duplicate counter.)
        self._batch_sent = time.monotonic()
        return batch

    async def delete(self, batch: list[Spooled]) -> None:
        """The controller acknowledged ``batch``."""
        stats = self._recorder.stats
        now = time.monotonic()
        stats.record("event ack", now - self._batch_sent)
        stats.counts["sensor: events acked"] += len(batch)
        stats.counts["sensor: batches acked"] += 1
        for item in batch:
            # Gone already if the phase abandoned it while the batch was in flight.
            if self._events.pop(item.seq, None) is not None:
                self.count -= 1
                self.bytes -= item.size
                stats.record("event delivery", now - self._appended.pop(item.seq))

    def abandon(self) -> int:
        """Drop what is still waiting (the phase is over); how many events that was."""
        dropped = len(self._events)
        self._events.clear()
        self._appended.clear()
        self.count = 0
        self.bytes = 0
        return dropped


class SimSensor:
    """A sensor: lease client and uploader on channels of their own, as a real one has."""

    def __init__(self, member: Member, plan: WorkerPlan, recorder: Recorder) -> None:
        self.name = member.name
        self._plan = plan
        self._recorder = recorder
        self._channel = secure_channel(
            plan.controller,
            member.tls,
            interceptors=[cast(grpc.aio.ClientInterceptor, CallRecorder(recorder))],
            extra_options=SMALL_ANSWERS,  # as the sensor's lease channel
        )
        self.leases = LeaseClient(self._channel, timeout=plan.lease_timeout, labels={})
        self.spool = MemorySpool(recorder)
        # The uploader only reads, deletes and waits on the spool: the memory one will do.
        self._uploader = Uploader(
            cast(Spool, self.spool),
            plan.controller,
            member.tls,
            batch=plan.upload_batch,
            linger=plan.upload_linger,
            max_linger=plan.upload_max_linger,
        )
        self._task: asyncio.Task[None] | None = None
        self._session = new_session_id()
        self._session_events = 0

    async def start(self) -> None:
        """Register and start uploading."""
        await self.leases.register([])
        self._task = asyncio.create_task(self._uploader.run())

    async def stop(self) -> None:
        """Stop uploading and retrying, close the lease channel."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.leases.abandon_retries()
        self.leases.close()
        await self._channel.close(None)

    def emit(self) -> None:
        """Spool one command event of the current attacker session."""
        if self._session_events >= EVENTS_PER_SESSION:
            self._session, self._session_events = new_session_id(), 0
        self._session_events += 1
        self.spool.append(
            make_event(
                "cowrie.command.input",
                "CMD: uname -a",
                session=self._session,
                src_ip="203.0.113.7",
                sensor=self.name,
                sensor_uuid=f"{self.name}-uuid",
                protocol="ssh",
                input="uname -a",
            )
        )

    async def session(self) -> None:
        """An attacker session: acquire a lease, hold it, release it."""
        counts = self._recorder.stats.counts
        src_ip = f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"
        stats = self._recorder.stats
        started = time.monotonic()
        try:
            lease = await self.leases.acquire(src_ip, new_session_id(), common_pb2.PROTOCOL_SSH)
        except LeaseFailed as e:
            # Its text names the code, as "AcquireLease: RESOURCE_EXHAUSTED: ..."
            code = next((w for w in str(e).replace(":", " ").split() if w in CODE_NAMES), None)
            key = f"AcquireLease {code or 'failed'}"
            stats.codes[key] += 1
            stats.details.setdefault(key, str(e))
            counts["sensor: leases failed"] += 1
            return
        stats.record("AcquireLease", time.monotonic() - started)
        stats.codes["AcquireLease OK"] += 1
        counts["sensor: leases granted"] += 1
        await asyncio.sleep(self._plan.hold)
        started = time.monotonic()
        await self.leases.release(lease, "bench session ended")
        stats.record("ReleaseLease", time.monotonic() - started)
        stats.codes["ReleaseLease OK"] += 1


class Worker:
    """The nodes and sensors of one process, and the phases it runs."""

    def __init__(self, plan: WorkerPlan, recorder: Recorder) -> None:
        self.recorder = recorder
        self.nodes = [SimNode(m, plan, self.recorder) for m in plan.nodes]
        self.sensors: list[SimSensor] = []
        self._plan = plan

    async def start(self) -> dict[str, int]:
        """Start every node, then register every sensor; how many came up in time."""
        gate = asyncio.Semaphore(START_PARALLEL)

        async def bounded(start: Callable[[], Awaitable[object]]) -> bool:
            async with gate:
                try:
                    async with asyncio.timeout(START_TIMEOUT):
                        await start()
                except TimeoutError:
                    return False
            return True

        await asyncio.gather(*(node.start() for node in self.nodes))
        links = [node.link.connected.wait for node in self.nodes if node.link is not None]
        linked = sum(await asyncio.gather(*(bounded(wait) for wait in links)))
        self.sensors = [SimSensor(m, self._plan, self.recorder) for m in self._plan.sensors]
        registered = sum(await asyncio.gather(*(bounded(s.start) for s in self.sensors)))
        return {"nodes linked": linked, "sensors registered": registered}

    async def stop(self) -> None:
        """Stop every sensor and node."""
        await asyncio.gather(*(s.stop() for s in self.sensors), return_exceptions=True)
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)

    async def run_phase(self, phase: Phase) -> Stats:
        """Generate the phase's load, drain, and return its figures."""
        stats = self.recorder.stats = Stats()
        cpu = time.process_time()
        await asyncio.sleep(max(0.0, phase.start - time.time()))
        lag = asyncio.create_task(self._watch_lag(stats))
        sessions: set[asyncio.Task[None]] = set()

        def start_session() -> None:
            task = asyncio.create_task(random.choice(self.sensors).session())
            sessions.add(task)
            task.add_done_callback(sessions.discard)

        def emit() -> None:
            random.choice(self.sensors).emit()

        if self.sensors:
            await asyncio.gather(
                _at_rate(phase.lease_rate, phase.seconds, start_session),
                _at_rate(phase.event_rate, phase.seconds, emit),
            )
        # An idle phase (or a worker without sensors) still lasts the phase.
        await asyncio.sleep(max(0.0, phase.start + phase.seconds - time.time()))
        deadline = time.monotonic() + phase.drain
        if sessions:
            await asyncio.wait(set(sessions), timeout=phase.drain)
        # Polled: one wait over hundreds of spools, bounded by the deadline.
        while any(s.spool.count for s in self.sensors) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        stats.counts["sensor: sessions unfinished after drain"] += len(sessions)
        # Left over, they would be delivered (and paid for) in the next phase.
        stats.counts["sensor: events abandoned after drain"] += sum(
            s.spool.abandon() for s in self.sensors
        )
        for task in list(sessions):
            task.cancel()
        lag.cancel()
        stats.cpu = time.process_time() - cpu
        return stats

    async def _watch_lag(self, stats: Stats) -> None:
        """How late this process's event loop wakes up (the simulator's own saturation)."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(LAG_PERIOD)
            stats.record("sim loop lag", time.monotonic() - before - LAG_PERIOD)


async def _at_rate(rate: float, seconds: float, action: Callable[[], None]) -> None:
    """Call ``action`` ``rate`` times a second for ``seconds`` (bounded in count and time)."""
    total = int(rate * seconds)
    done = 0
    started = time.monotonic()
    while done < total:
        elapsed = time.monotonic() - started
        if elapsed > seconds + 1:
            break
        due = min(total, int(elapsed * rate) + 1)
        for _ in range(due - done):
            action()
        done = due
        await asyncio.sleep(TICK)


def worker_main(plan: WorkerPlan, conn: Connection) -> None:
    """Process entry point: play ``plan`` and obey the parent's commands on ``conn``."""
    if plan.nice:
        os.nice(plan.nice)
    recorder = Recorder()
    # Client warnings are counted, not printed: thousands of them would swamp the tables.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger().addHandler(ErrorCounter(recorder))

    async def serve() -> None:
        worker = Worker(plan, recorder)
        try:
            conn.send(("ready", await worker.start()))
            while True:
                try:
                    command, phase = await asyncio.to_thread(conn.recv)
                except (EOFError, OSError):  # the parent is gone
                    return
                if command != "phase":
                    return
                conn.send(("done", await worker.run_phase(phase)))
        finally:
            await worker.stop()

    asyncio.run(serve())
