"""The fleet registry: pool nodes with the controller's view of their guests, and sensors.

Registrations persist in the state store so a controller restart keeps them; guest
views live in memory and are refilled by the next heartbeat. After a restart every
node gets a grace (at least its missed-heartbeat allowance, and at least one lease TTL)
to reconnect before it is declared dead: a node retrying with backoff must not lose
the sessions it carries to the controller's outage.

Whenever a node's free guests go up, the registry wakes that many waiting acquires
(see controller.waiters); an index from attacker address to nodes keeps affinity
look-ups independent of the fleet's size.

Liveness is judged against the fleet, not the clock alone: when the controller hears
most of its nodes late (its process starved of CPU, its link congested), every node's
silence grows together, and the typical node's lateness is forgiven to all. A node is
dead when it is silent for the allowance longer than its peers. A majority going silent
at once therefore looks like the controller's own trouble, as Kubernetes' node
controller treats a zone in full disruption; the forgiveness is capped, so such nodes
still die, later.
"""

from __future__ import annotations

import logging
import time

from controller.models import NodeState, PoolNodeRecord, SensorRecord
from controller.statestore import StateStore
from controller.waiters import CapacityWaiters
from honeyfleet.errors import FailedPrecondition, NotFound
from honeyfleet.v1 import common_pb2, registry_pb2

log = logging.getLogger(__name__)

# Fewer live nodes than this cannot outvote one another: each is judged by the clock.
FLEET_QUORUM = 3
# At most this many allowances of fleet-wide lateness are forgiven.
MAX_FORGIVEN = 3.0


class Registry:
    """Pool nodes and sensors known to the controller."""

    def __init__(
        self,
        store: StateStore,
        waiters: CapacityWaiters,
        *,
        dead_after: float,
        heartbeat_interval: float,
        max_node_guests: int,
    ) -> None:
        self._store = store
        self.waiters = waiters
        self._dead_after = dead_after
        self._interval = heartbeat_interval
        # Seconds the typical live node was last heard later than its heartbeat interval.
        self.fleet_lateness = 0.0
        self._max_node_guests = max_node_guests
        self.nodes: dict[str, PoolNodeRecord] = {}
        self.sensors: dict[str, SensorRecord] = {}
        # Sensors seen since their record was last written.
        self._sensors_dirty: set[str] = set()
        # Attacker address -> nodes whose live guests served it.
        self._affinity: dict[str, set[str]] = {}
        self._node_ips: dict[str, set[str]] = {}

    async def load(self, grace: float) -> None:
        """Load registrations from the store (on start-up); nodes get ``grace`` to return."""
        seen = time.monotonic() + max(grace - self._dead_after, 0.0)
        for node in await self._store.load_nodes():
            node = self._capped(node)
            node.last_seen_monotonic = seen
            self.nodes[node.name] = node
        for sensor in await self._store.load_sensors():
            self.sensors[sensor.name] = sensor

    def get_node(self, name: str) -> PoolNodeRecord:
        """A registered node, or NotFound."""
        try:
            return self.nodes[name]
        except KeyError:
            raise NotFound(f"no pool node named {name!r}") from None

    def nodes_for(self, src_ip: str) -> set[str]:
        """Nodes whose live guests have served this attacker address."""
        return self._affinity.get(src_ip, set())

    async def register_node(
        self, name: str, request: registry_pb2.RegisterPoolNodeRequest
    ) -> PoolNodeRecord:
        """Record (or refresh) a node's registration; keeps an operator's drain.

        The guest view starts empty: the node's first heartbeat on its new stream
        brings the whole table.
        """
        previous = self.nodes.get(name)
        node = self._capped(
            PoolNodeRecord(
                name=name,
                address=request.address,
                capacity=request.capacity,
                labels=dict(request.labels),
                share_guests=request.share_guests,
                version=request.version,
                backend=request.backend,
                register_time=time.time(),
                draining=previous.draining if previous else False,
                last_heartbeat_time=previous.last_heartbeat_time if previous else None,
                stream_allocations=request.stream_allocations,
            )
        )
        self.nodes[name] = node
        self._index(node)
        await self._store.save_node(node)
        log.info(
            "pool node %s registered at %s (capacity %d, counted %d)",
            name,
            node.address,
            node.capacity,
            node.view.capacity,
        )
        return node

    def heard_from(self, name: str, received: float) -> None:
        """A message from the node arrived at ``received`` (monotonic): it is alive then."""
        node = self.nodes.get(name)
        if node is not None and node.last_seen_monotonic < received:
            node.last_seen_monotonic = received

    def heartbeat(
        self, name: str, request: registry_pb2.HeartbeatRequest, received: float
    ) -> tuple[PoolNodeRecord, bool]:
        """Take a node's heartbeat (``received``: monotonic time it arrived).

        Returns the node and whether its table was applied (a table older than the
        controller's own changes, or an unchanged one, is not).
        """
        node = self.nodes.get(name)
        if node is None:
            raise FailedPrecondition(f"pool node {name} must register before heartbeating")
        if node.state is NodeState.DEAD:
            log.info("pool node %s is alive again", name)
        node.state = NodeState.ALIVE
        node.last_seen_monotonic = max(node.last_seen_monotonic, received)
        node.last_heartbeat_time = time.time()
        free = node.view.free
        # It heartbeats: a failed call to it is worth trying again.
        node.view.unreachable = False
        applied = not request.table_unchanged and node.view.apply_table(
            request.table_version, request.guests, request.lease_ids
        )
        if applied:
            node.wants_table = False
            self.refreshed(node, free, reindex=True)
        else:
            self.freed(node, free)
        return node, applied

    def refreshed(self, node: PoolNodeRecord, free_before: int, *, reindex: bool) -> None:
        """A node's view changed: update the affinity index, wake waiters for new guests."""
        if reindex:
            self._index(node)
        if node.view.free > free_before:
            self.freed(node, free_before)
        elif node.schedulable and node.share_guests and node.view.shareable:
            self.waiters.offer(node.labels, None)

    def freed(self, node: PoolNodeRecord, free_before: int) -> None:
        """Wake a waiter for each guest of ``node`` counted free since ``free_before``."""
        gained = node.view.free - free_before
        if gained > 0 and node.schedulable:
            self.waiters.offer(node.labels, gained)

    def index_guest(self, node: PoolNodeRecord, guest: common_pb2.Guest) -> None:
        """Add one allocated guest's attacker addresses to the affinity index."""
        ips = self._node_ips.setdefault(node.name, set())
        for ip in guest.src_ips:
            ips.add(ip)
            self._affinity.setdefault(ip, set()).add(node.name)

    def find_dead(self, stalled: float) -> list[PoolNodeRecord]:
        """Mark nodes that missed their heartbeats as dead; returns the newly dead ones.

        ``stalled`` is time the controller itself could not listen (its loop ran late):
        it counts for every node, so a busy controller never kills a heartbeating node.
        Time the whole fleet was heard late (``fleet_lateness``) is forgiven too.
        """
        now = time.monotonic()
        alive = []
        for node in self.nodes.values():
            node.last_seen_monotonic += stalled
            if node.state is NodeState.ALIVE:
                alive.append(node)
        self.fleet_lateness = self._lateness([now - node.last_seen_monotonic for node in alive])
        allowance = self._dead_after + self.fleet_lateness
        dead = []
        for node in alive:
            if now - node.last_seen_monotonic > allowance:
                node.state = NodeState.DEAD
                node.view.clear()
                # Should it heartbeat again on the same stream, its table must come along.
                node.wants_table = True
                self._index(node)
                dead.append(node)
        return dead

    def _lateness(self, silences: list[float]) -> float:
        """How much later than one heartbeat interval the median live node was heard."""
        if len(silences) < FLEET_QUORUM:
            return 0.0
        typical = sorted(silences)[len(silences) // 2]
        return min(max(typical - self._interval, 0.0), MAX_FORGIVEN * self._dead_after)

    async def set_draining(self, name: str, draining: bool) -> PoolNodeRecord:
        """Drain a node (no new leases) or resume it."""
        node = self.get_node(name)
        node.draining = draining
        await self._store.save_node(node)
        log.info("pool node %s %s", name, "drained" if draining else "resumed")
        if not draining:
            self.refreshed(node, 0, reindex=False)
        return node

    async def remove_node(self, name: str) -> PoolNodeRecord:
        """Forget a node that stopped heartbeating (refused while it is alive)."""
        node = self.get_node(name)
        if node.state is not NodeState.DEAD:
            raise FailedPrecondition(
                f"pool node {name} is alive: stop it first (drain it and wait for its leases "
                f"to end if it serves sessions); it can be removed once it has missed "
                f"{self._dead_after:.0f}s of heartbeats"
            )
        del self.nodes[name]
        self._index(node, forget=True)
        await self._store.delete_node(name)
        log.info("pool node %s removed", name)
        return node

    async def persist(self) -> None:
        """Write nodes' last heartbeat times and sensors seen since the last write.

        One transaction for all: `status` after a restart shows them, and contact from
        sensors (every event batch counts) costs no disk write of its own.
        """
        dirty = [self.sensors[n] for n in self._sensors_dirty if n in self.sensors]
        self._sensors_dirty.clear()
        if self.nodes or dirty:
            await self._store.save_nodes_and_sensors(list(self.nodes.values()), dirty)

    def seen(self, name: str) -> SensorRecord:
        """Record contact from a sensor (any RPC or event batch), creating it on first contact."""
        now = time.time()
        sensor = self.sensors.get(name)
        if sensor is None:
            sensor = SensorRecord(name=name, first_seen_time=now, last_seen_time=now)
            self.sensors[name] = sensor
            log.info("sensor %s seen for the first time", name)
        sensor.last_seen_time = now
        self._sensors_dirty.add(name)
        return sensor

    async def describe_sensor(self, name: str, **details: object) -> SensorRecord:
        """Record a sensor's self-description (on registration), written at once."""
        sensor = self.seen(name)
        for key, value in details.items():
            setattr(sensor, key, value)
        self._sensors_dirty.discard(name)
        await self._store.save_sensor(sensor)
        return sensor

    def _capped(self, node: PoolNodeRecord) -> PoolNodeRecord:
        """The node with its counted guests capped by max_node_guests."""
        node.view.capacity = min(node.view.capacity, self._max_node_guests)
        return node

    def _index(self, node: PoolNodeRecord, *, forget: bool = False) -> None:
        """Rebuild one node's entries in the affinity index."""
        for ip in self._node_ips.pop(node.name, set()):
            names = self._affinity.get(ip)
            if names is not None:
                names.discard(node.name)
                if not names:
                    del self._affinity[ip]
        if forget:
            return
        ips = node.view.src_ips()
        self._node_ips[node.name] = ips
        for ip in ips:
            self._affinity.setdefault(ip, set()).add(node.name)
