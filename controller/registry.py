"""The fleet registry: pool nodes with their live guest tables, and sensors.

Registrations persist in the state store so a controller restart keeps them; guest
tables live in memory and are refilled by the next heartbeat. After a restart every
node gets a fresh missed-heartbeat allowance to reconnect before it is declared dead.
"""

from __future__ import annotations

import asyncio
import logging
import time

from controller.models import NodeState, PoolNodeRecord, SensorRecord
from controller.statestore import StateStore
from honeyfleet.errors import FailedPrecondition, NotFound
from honeyfleet.v1 import common_pb2, registry_pb2

log = logging.getLogger(__name__)

# A sensor's last-seen time is written to disk at most this often.
SENSOR_PERSIST_SECONDS = 30.0


class Registry:
    """Pool nodes and sensors known to the controller."""

    def __init__(self, store: StateStore, *, dead_after: float) -> None:
        self._store = store
        self._dead_after = dead_after
        self.nodes: dict[str, PoolNodeRecord] = {}
        self.sensors: dict[str, SensorRecord] = {}
        self._sensor_persisted: dict[str, float] = {}
        # Notified whenever guest capacity may have changed (heartbeats, registrations).
        self.changed = asyncio.Condition()

    async def load(self) -> None:
        """Load registrations from the store (on start-up)."""
        now = time.monotonic()
        for node in await self._store.load_nodes():
            node.last_seen_monotonic = now
            self.nodes[node.name] = node
        for sensor in await self._store.load_sensors():
            self.sensors[sensor.name] = sensor
            self._sensor_persisted[sensor.name] = sensor.last_seen_time

    def get_node(self, name: str) -> PoolNodeRecord:
        """A registered node, or NotFound."""
        try:
            return self.nodes[name]
        except KeyError:
            raise NotFound(f"no pool node named {name!r}") from None

    async def register_node(
        self, name: str, request: registry_pb2.RegisterPoolNodeRequest
    ) -> PoolNodeRecord:
        """Record (or refresh) a node's registration; keeps an operator's drain."""
        previous = self.nodes.get(name)
        node = PoolNodeRecord(
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
        )
        self.nodes[name] = node
        await self._store.save_node(node)
        log.info("pool node %s registered at %s (capacity %d)", name, node.address, node.capacity)
        await self._notify()
        return node

    async def heartbeat(self, name: str, request: registry_pb2.HeartbeatRequest) -> PoolNodeRecord:
        """Take a node's heartbeat: refresh liveness and its guest table."""
        node = self.nodes.get(name)
        if node is None:
            raise FailedPrecondition(f"pool node {name} must register before heartbeating")
        if node.state is NodeState.DEAD:
            log.info("pool node %s is alive again", name)
        node.state = NodeState.ALIVE
        node.last_seen_monotonic = time.monotonic()
        node.last_heartbeat_time = time.time()
        node.counts = common_pb2.GuestCounts()
        node.counts.CopyFrom(request.guest_counts)
        node.guests = [_with_node(g, name) for g in request.guests]
        await self._notify()
        return node

    def find_dead(self) -> list[PoolNodeRecord]:
        """Mark nodes that missed their heartbeats as dead; returns the newly dead ones."""
        now = time.monotonic()
        dead = []
        for node in self.nodes.values():
            if node.state is NodeState.ALIVE and now - node.last_seen_monotonic > self._dead_after:
                node.state = NodeState.DEAD
                node.counts = common_pb2.GuestCounts()
                node.guests = []
                dead.append(node)
        return dead

    async def set_draining(self, name: str, draining: bool) -> PoolNodeRecord:
        """Drain a node (no new leases) or resume it."""
        node = self.get_node(name)
        node.draining = draining
        await self._store.save_node(node)
        log.info("pool node %s %s", name, "drained" if draining else "resumed")
        await self._notify()
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
        await self._store.delete_node(name)
        log.info("pool node %s removed", name)
        await self._notify()
        return node

    async def persist_heartbeat_times(self) -> None:
        """Write nodes' last heartbeat times, so `status` after a restart shows them."""
        if self.nodes:
            await self._store.save_nodes(list(self.nodes.values()))

    async def touch_sensor(self, name: str, **details: object) -> SensorRecord:
        """Record contact from a sensor, creating it on first contact."""
        now = time.time()
        sensor = self.sensors.get(name)
        if sensor is None:
            sensor = SensorRecord(name=name, first_seen_time=now, last_seen_time=now)
            self.sensors[name] = sensor
            log.info("sensor %s seen for the first time", name)
        sensor.last_seen_time = now
        for key, value in details.items():
            setattr(sensor, key, value)
        if details or now - self._sensor_persisted.get(name, 0.0) > SENSOR_PERSIST_SECONDS:
            self._sensor_persisted[name] = now
            await self._store.save_sensor(sensor)
        return sensor

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


def _with_node(guest: common_pb2.Guest, node: str) -> common_pb2.Guest:
    """A copy of a reported guest stamped with the node's registered name."""
    copy = common_pb2.Guest()
    copy.CopyFrom(guest)
    copy.pool_node = node
    return copy
