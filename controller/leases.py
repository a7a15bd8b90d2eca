"""Leases: placing sessions on guests, renewing, releasing, expiring and failing them.

Every lease is indexed by node and sensor, so a heartbeat is checked against its own
node's leases only. A lease ends in memory at once (its record is group-committed
without waiting) and is then told to its node on the node's heartbeat stream (no call
of its own: it rides along with the next allocation to the node or, after END_LINGER,
in a message with every end queued meanwhile). Until a table of the node's no longer
shows it, it is *ending*: never reported back as stale, and told again while a table
still shows it (the message may have been lost with a stream).
Acquires that find no guest wait in a bounded queue (controller.waiters); above that,
past their wait, or when more than max_acquires_in_flight are being placed at once
(the controller is saturated: more would only queue for the CPU), they are shed with
RESOURCE_EXHAUSTED and a retry hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import grpc

from controller.lease_metrics import LeaseMetrics
from controller.models import LeaseRecord, LeaseState, PoolNodeRecord
from controller.nodeclient import NodeClients
from controller.registry import Registry
from controller.scheduler import Placement, choose
from controller.statestore import StateStore
from honeyfleet.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RPCError,
)
from honeyfleet.v1 import common_pb2, lease_pb2, poolnode_pb2, registry_pb2

log = logging.getLogger(__name__)

MAX_SESSION_ID = 128
MAX_LABELS = 16
MAX_LABEL_TEXT = 128
# Seconds a shed caller is told to wait before asking again.
SHED_RETRY_AFTER = 5.0
# Seconds kept back from the caller's deadline so it hears the answer, not its timeout.
ANSWER_MARGIN = 0.5
# Most seconds a lease's end waits to ride along with an allocation to its node before
# it is sent in a message of its own. Nothing waits for it: the session is over, and the
# node gives the attacker's own guest to a new lease of that attacker meanwhile. At
# 1.5 s a node allocating twice a second takes 95 % of its ends along (0.5 s: 63 %).
END_LINGER = 1.5


class LeaseManager:
    """Every active lease, kept in memory and mirrored in the state store."""

    def __init__(
        self,
        registry: Registry,
        store: StateStore,
        nodes: NodeClients,
        *,
        ttl: float,
        wait: float,
        max_per_sensor: int,
        max_in_flight: int,
        loop_lag: Callable[[], float],
        max_loop_lag: float,
    ) -> None:
        self._registry = registry
        self._store = store
        self._nodes = nodes
        self.ttl = ttl
        self._wait = wait
        self._max_per_sensor = max_per_sensor
        self._max_in_flight = max_in_flight
        self._loop_lag = loop_lag
        self._max_loop_lag = max_loop_lag
        self._in_flight = 0
        self.active: dict[str, LeaseRecord] = {}
        self._by_node: dict[str, dict[str, LeaseRecord]] = {}
        # Active leases and acquires in flight, per sensor (together: its quota).
        self._sensor_leases: Counter[str] = Counter()
        self._sensor_acquiring: Counter[str] = Counter()
        self._allocating: set[str] = set()
        # Per node: ended leases its tables still may show, and why they ended.
        self._ending: dict[str, dict[str, str]] = {}
        # Per node: ends not yet handed to its heartbeat stream, and the stream's wake-up.
        self._untold: dict[str, dict[str, str]] = {}
        self._listeners: dict[str, Callable[[], None]] = {}
        self.metrics = LeaseMetrics(lambda: len(registry.waiters), lambda: registry.fleet_lateness)

    async def load(self) -> None:
        """Reload active leases after a restart.

        Each gets at least one full TTL from now: its sensor may have renewed in vain
        while the controller was away and must get the chance to renew again.
        """
        grace = time.time() + self.ttl
        for lease in await self._store.load_active_leases():
            lease.expire_time = max(lease.expire_time, grace)
            self._add(lease)
        if self.active:
            log.info("resumed %d active leases", len(self.active))

    def count_by(self, attribute: str) -> Counter[str]:
        """Active leases per pool node ("pool_node") or per sensor ("sensor")."""
        if attribute == "pool_node":
            return Counter({node: len(leases) for node, leases in self._by_node.items()})
        if attribute == "sensor":
            return Counter(self._sensor_leases)
        raise ValueError(f"cannot count leases by {attribute!r}")

    async def acquire(
        self,
        sensor: str,
        request: lease_pb2.AcquireLeaseRequest,
        time_remaining: float | None = None,
        *,
        queued: float | None = None,
    ) -> tuple[LeaseRecord, common_pb2.GuestCredentials]:
        """Place a session on a guest, waiting up to lease_wait (and the caller's deadline).

        ``queued`` is how long the request waited in gRPC before it got here, if known.
        """
        _validate_acquire(request)
        if self._sensor_leases[sensor] + self._sensor_acquiring[sensor] >= self._max_per_sensor:
            self.metrics.shed.labels("sensor_quota").inc()
            raise ResourceExhausted(
                f"{sensor} already holds {self._max_per_sensor} leases (max_leases_per_sensor)",
                retry_after=SHED_RETRY_AFTER,
            )
        if (lag := self._loop_lag()) > self._max_loop_lag:
            # Requests wait this long for the loop before they are even read: placing
            # one more would only make every other request (and heartbeat) later.
            self.metrics.shed.labels("loop_lag").inc()
            raise ResourceExhausted(
                f"the controller is saturated: {lag:.1f}s behind (shed_loop_lag)",
                retry_after=SHED_RETRY_AFTER,
            )
        if queued is not None and queued > self._max_loop_lag:
            # The request waited in gRPC's intake, where no handler could shed it: its
            # caller's peers are still sending more. Refusing it now (cheaply) makes them
            # back off, which is what drains that queue.
            self.metrics.shed.labels("queued").inc()
            raise ResourceExhausted(
                f"the controller is saturated: this request waited {queued:.1f}s before "
                "it could be read (shed_loop_lag)",
                retry_after=SHED_RETRY_AFTER,
            )
        if self._in_flight - len(self._registry.waiters) >= self._max_in_flight:
            self.metrics.shed.labels("in_flight").inc()
            raise ResourceExhausted(
                f"the controller is saturated: {self._max_in_flight} lease requests are "
                "being placed already (max_acquires_in_flight)",
                retry_after=SHED_RETRY_AFTER,
            )
        started = time.monotonic()
        wait = self._wait
        if time_remaining is not None:
            wait = min(wait, time_remaining - ANSWER_MARGIN)
        deadline = started + wait
        self._sensor_acquiring[sensor] += 1
        self._in_flight += 1
        try:
            result = await self._place(sensor, request, deadline)
        finally:
            self._in_flight -= 1
            self._sensor_acquiring[sensor] -= 1
            if not self._sensor_acquiring[sensor]:
                del self._sensor_acquiring[sensor]
        self.metrics.acquire_seconds.observe(time.monotonic() - started)
        return result

    async def _place(
        self, sensor: str, request: lease_pb2.AcquireLeaseRequest, deadline: float
    ) -> tuple[LeaseRecord, common_pb2.GuestCredentials]:
        """Try nodes best first; wait in the queue for capacity when none has a guest."""
        labels = dict(request.labels)
        tried: set[str] = set()
        woken = False
        while True:
            placement = choose(
                self._registry.nodes,
                self._registry.nodes_for(request.src_ip),
                labels,
                self._by_node,
                tried,
            )
            if placement is not None:
                granted = await self._try(placement, sensor, request)
                if granted is not None:
                    return granted
                tried.add(placement.node.name)
                continue
            try:
                woken = await self._registry.waiters.wait(
                    labels, deadline - time.monotonic(), again=woken
                )
            except ResourceExhausted:
                self.metrics.shed.labels("queue_full").inc()
                self._store.add_counter("leases_refused")
                raise ResourceExhausted(
                    "the controller is at capacity: too many lease requests already wait "
                    "for a guest (max_waiting_acquires)",
                    retry_after=SHED_RETRY_AFTER,
                ) from None
            if not woken:
                self.metrics.shed.labels("wait_timeout").inc()
                self._store.add_counter("leases_refused")
                log.warning(
                    "no guest for session %s from %s within lease_wait",
                    request.session,
                    request.src_ip,
                )
                raise ResourceExhausted(
                    f"no guest available within {self._wait:.0f}s (lease_wait); "
                    "add pool nodes or raise max_vms",
                    retry_after=SHED_RETRY_AFTER,
                )
            tried.clear()

    async def _try(
        self, placement: Placement, sensor: str, request: lease_pb2.AcquireLeaseRequest
    ) -> tuple[LeaseRecord, common_pb2.GuestCredentials] | None:
        """Ask one node for a guest; None if it could not give one."""
        node, view = placement.node, placement.node.view
        lease_id = uuid.uuid4().hex
        # Promised before the call: a concurrent acquire counts this guest as taken.
        if placement.takes_pristine:
            view.reserve()
        # Counted with the promise: a table arriving during the call may already show
        # the allocation, so only this count tells how many guests the answer frees.
        free = view.free
        self._allocating.add(lease_id)
        try:
            response = await self._nodes.allocate(
                node.name,
                node.address,
                poolnode_pb2.AllocateGuestRequest(
                    lease_id=lease_id,
                    src_ip=request.src_ip,
                    protocol=request.protocol,
                    sensor=sensor,
                    allow_shared=placement.allow_shared,
                    session=request.session,
                ),
            )
        except RPCError as e:
            self._allocating.discard(lease_id)
            if placement.takes_pristine:
                view.unreserve()
            if e.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.metrics.allocate_calls.labels("refused").inc()
                view.refused()
            else:
                # Asking it again at once would fail again: its next heartbeat says
                # when it is worth asking, and wakes waiters for its guests.
                self.metrics.allocate_calls.labels("failed").inc()
                view.unreachable = True
            log.info(
                "pool node %s could not allocate (%s): %s", node.name, placement.reason, e.details
            )
            return None
        except asyncio.CancelledError:
            # The caller left mid-call. Were the guest kept, nobody would be woken for
            # it; if the node did allocate, its next table reports the lease as stale.
            self._allocating.discard(lease_id)
            if placement.takes_pristine:
                view.unreserve()
                self._registry.freed(node, free)
            raise
        self.metrics.allocate_calls.labels("granted").inc()
        if placement.takes_pristine:
            view.unreserve()
        view.allocated(response.table_version, lease_id, response.guest)
        self._registry.index_guest(node, response.guest)
        self._registry.refreshed(node, free, reindex=False)
        now = time.time()
        lease = LeaseRecord(
            id=lease_id,
            pool_node=node.name,
            pool_node_address=node.address,
            guest=response.guest.id,
            sensor=sensor,
            src_ip=request.src_ip,
            protocol=request.protocol,
            session=request.session,
            shared=response.shared,
            create_time=now,
            expire_time=now + self.ttl,
        )
        self._add(lease)
        self._allocating.discard(lease_id)
        try:
            # Durable before the sensor hears of it: a restart must not forget it.
            await self._store.save_lease(lease, counter="leases_issued")
        except asyncio.CancelledError:
            # The sensor gave up waiting: nobody will use or renew this lease.
            self._end(lease, LeaseState.RELEASED, "the sensor left before it was granted")
            raise
        except Exception:
            self._end(lease, LeaseState.FAILED, "the controller could not save it")
            raise
        # Routine, and the session's events carry the lease, node and guest: at fleet
        # rates an INFO line per lease was a few per cent of the controller's CPU.
        log.debug(
            "lease %s: session %s from %s on %s/%s (%s) for %s",
            lease.id,
            lease.session,
            lease.src_ip,
            lease.pool_node,
            lease.guest,
            placement.reason,
            sensor,
        )
        return lease, response.credentials

    async def get(self, lease_id: str) -> LeaseRecord | None:
        """A lease, active or ended; None if it was never issued."""
        return self.active.get(lease_id) or await self._store.get_lease(lease_id)

    async def _own(self, sensor: str, lease_id: str) -> LeaseRecord:
        """The calling sensor's lease, active or ended."""
        lease = await self.get(lease_id)
        # Another sensor's lease looks exactly like a missing one: ids are not secrets
        # we confirm to strangers.
        if lease is None or lease.sensor != sensor:
            raise NotFound(f"no lease {lease_id!r} for {sensor}")
        return lease

    async def renew(self, sensor: str, lease_id: str) -> LeaseRecord:
        """Extend an active lease by its TTL."""
        lease = await self._own(sensor, lease_id)
        if lease.state is not LeaseState.ACTIVE:
            raise FailedPrecondition(
                f"lease {lease_id} {lease.state.name.lower()}: {lease.end_reason}"
            )
        lease.expire_time = time.time() + self.ttl
        self._store.save_lease(lease)
        return lease

    async def release(self, sensor: str, lease_id: str, reason: str) -> LeaseRecord:
        """End a lease at session end; releasing an ended lease is a no-op."""
        lease = await self._own(sensor, lease_id)
        if lease.state is LeaseState.ACTIVE:
            self._end(lease, LeaseState.RELEASED, reason[:200] or "session ended")
        return lease

    def release_held(self, sensor: str, lease_id: str, reason: str) -> None:
        """End ``sensor``'s active lease ``lease_id`` now, without an answer: any other
        id (ended, unknown, another sensor's) is passed over, as nobody hears of it."""
        lease = self.active.get(lease_id)
        if lease is not None and lease.sensor == sensor:
            self._end(lease, LeaseState.RELEASED, reason[:200] or "session ended")

    def expire_due(self, stalled: float) -> None:
        """Expire leases whose sensor stopped renewing them.

        ``stalled`` is time the controller could not listen (its loop ran late): every
        lease gets it back, so a stall never expires leases in a burst.
        """
        now = time.time()
        if stalled > 0:
            for lease in self.active.values():
                lease.expire_time += stalled
        for lease in [lease for lease in self.active.values() if lease.expire_time < now]:
            self._end(lease, LeaseState.EXPIRED, "not renewed within lease_ttl (sensor vanished)")

    def fail_node(self, node: str, reason: str) -> None:
        """Fail every active lease on a node (it died; nobody to tell)."""
        failed = list(self._by_node.get(node, {}).values())
        # Nobody hears them now; a table that still shows them on its return is stale.
        self._ending.pop(node, None)
        self._untold.pop(node, None)
        for lease in failed:
            self._end(lease, LeaseState.FAILED, reason, tell=False)
        if failed:
            log.warning("failed %d leases of pool node %s: %s", len(failed), node, reason)

    def reconcile(self, node: PoolNodeRecord) -> list[str]:
        """Compare a node's view after a new table with ours; returns leases it should drop.

        Leases we hold that the node no longer does (it lost the guest) fail. Ended
        leases the table still shows are told again; those it no longer shows are done.
        """
        held = node.view.lease_ids
        mine = self._by_node.get(node.name, {})
        ending = self._ending.get(node.name, {})
        stale = [i for i in held if i not in mine and i not in self._allocating and i not in ending]
        if stale:
            self.metrics.stale.inc(len(stale))
        for lease_id in [i for i in ending if i not in held]:
            del ending[lease_id]
        if ending:
            self._untold.setdefault(node.name, {}).update(ending)
        else:
            self._ending.pop(node.name, None)
        for lease in [lease for i, lease in mine.items() if i not in held]:
            self._end(lease, LeaseState.FAILED, f"pool node {node.name} no longer holds the guest")
        return stale

    @contextlib.contextmanager
    def listen(self, node: str, wake: Callable[[], None]) -> Iterator[None]:
        """Call ``wake`` whenever ends for ``node`` are waiting, while its stream lasts."""
        self._listeners[node] = wake
        if self._untold.get(node):
            wake()
        try:
            yield
        finally:
            if self._listeners.get(node) is wake:
                del self._listeners[node]

    def take_ended(self, node: str) -> list[registry_pb2.EndedLease]:
        """The ends to send to ``node`` now (each once, until a table shows it again)."""
        untold = self._untold.pop(node, {})
        return [registry_pb2.EndedLease(lease_id=i, reason=r) for i, r in untold.items()]

    def _add(self, lease: LeaseRecord) -> None:
        """Index an active lease."""
        self.active[lease.id] = lease
        self._by_node.setdefault(lease.pool_node, {})[lease.id] = lease
        self._sensor_leases[lease.sensor] += 1

    def _end(
        self, lease: LeaseRecord, state: LeaseState, reason: str, *, tell: bool = True
    ) -> None:
        """End one lease now, save it in the background and tell its node."""
        lease.end(state, reason, time.time())
        del self.active[lease.id]
        on_node = self._by_node[lease.pool_node]
        del on_node[lease.id]
        if not on_node:
            del self._by_node[lease.pool_node]
        self._sensor_leases[lease.sensor] -= 1
        if not self._sensor_leases[lease.sensor]:
            del self._sensor_leases[lease.sensor]
        self._store.save_lease(lease)
        # A release is routine (its session's end is in the event log); the rest is news.
        level = logging.DEBUG if state is LeaseState.RELEASED else logging.INFO
        log.log(level, "lease %s %s: %s", lease.id, state.name.lower(), reason)
        if tell:
            node = lease.pool_node
            self._ending.setdefault(node, {})[lease.id] = reason
            untold = self._untold.setdefault(node, {})
            untold[lease.id] = reason
            wake = self._listeners.get(node)
            if wake is not None and len(untold) == 1:
                # Not at once: an allocation to the node within the linger takes it
                # along (and every end meanwhile rides in one message).
                asyncio.get_running_loop().call_later(END_LINGER, wake)


def _validate_acquire(request: lease_pb2.AcquireLeaseRequest) -> None:
    """Refuse malformed lease requests with a message naming the field."""
    try:
        ipaddress.ip_address(request.src_ip)
    except ValueError:
        raise InvalidArgument(f"src_ip {request.src_ip[:64]!r} is not an IP address") from None
    if request.protocol == common_pb2.PROTOCOL_UNSPECIFIED:
        raise InvalidArgument("protocol must be PROTOCOL_SSH or PROTOCOL_TELNET")
    if not request.session or len(request.session) > MAX_SESSION_ID:
        raise InvalidArgument(f"session must be 1..{MAX_SESSION_ID} characters")
    if len(request.labels) > MAX_LABELS or any(
        len(k) > MAX_LABEL_TEXT or len(v) > MAX_LABEL_TEXT for k, v in request.labels.items()
    ):
        raise InvalidArgument(f"at most {MAX_LABELS} labels of {MAX_LABEL_TEXT} characters")
