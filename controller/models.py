"""The controller's records: pool nodes, leases, sensors, and their wire forms."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from controller.nodeview import NodeView
from honeyfleet.errors import FailedPrecondition
from honeyfleet.v1 import common_pb2, fleet_pb2, lease_pb2


class NodeState(enum.Enum):
    """Whether the controller hears from a pool node.

    ALIVE --(missed_heartbeats intervals without one)--> DEAD
    DEAD  --(heartbeat or re-registration)-------------> ALIVE
    """

    ALIVE = fleet_pb2.POOL_NODE_STATE_ALIVE
    DEAD = fleet_pb2.POOL_NODE_STATE_DEAD


class LeaseState(enum.Enum):
    """A lease's life cycle: ACTIVE, then exactly one of the ending states.

    ACTIVE --release--> RELEASED
    ACTIVE --TTL passed without renewal--> EXPIRED
    ACTIVE --node died / node dropped the guest--> FAILED
    """

    ACTIVE = lease_pb2.LEASE_STATE_ACTIVE
    RELEASED = lease_pb2.LEASE_STATE_RELEASED
    EXPIRED = lease_pb2.LEASE_STATE_EXPIRED
    FAILED = lease_pb2.LEASE_STATE_FAILED


def timestamp(seconds: float | None) -> Timestamp | None:
    """A protobuf Timestamp from Unix seconds (None stays unset)."""
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


@dataclass
class PoolNodeRecord:
    """A registered pool node: its registration plus the controller's view of its guests."""

    name: str
    address: str
    capacity: int
    labels: dict[str, str]
    share_guests: bool
    version: str
    backend: str
    register_time: float
    draining: bool = False
    state: NodeState = NodeState.ALIVE
    last_heartbeat_time: float | None = None
    # Monotonic clock of the last sign of life, for the liveness check.
    last_seen_monotonic: float = field(default_factory=time.monotonic)
    # Takes allocations on its heartbeat stream (as registered; not stored).
    stream_allocations: bool = False
    # Its guest table was forgotten (marked dead): asked for in heartbeat answers.
    wants_table: bool = False
    view: NodeView = field(init=False)

    def __post_init__(self) -> None:
        """Start with an empty view of at most the registered capacity."""
        self.view = NodeView(self.name, max(self.capacity, 0))

    @property
    def counts(self) -> common_pb2.GuestCounts:
        """Guests per state as the controller counts them."""
        return self.view.counts

    @property
    def guests(self) -> list[common_pb2.Guest]:
        """The node's guests as the controller counts them."""
        return list(self.view.guests.values())

    @property
    def schedulable(self) -> bool:
        """Whether the node may take new leases."""
        return self.state is NodeState.ALIVE and not self.draining

    def offers(self, labels: Mapping[str, str]) -> bool:
        """Whether the node offers every requested label."""
        return all(self.labels.get(k) == v for k, v in labels.items())

    def to_proto(self, active_leases: int) -> fleet_pb2.PoolNode:
        """The node as the fleet API shows it."""
        return fleet_pb2.PoolNode(
            name=self.name,
            address=self.address,
            state=self.state.value,
            draining=self.draining,
            capacity=self.view.capacity,
            labels=self.labels,
            share_guests=self.share_guests,
            guest_counts=self.counts,
            active_leases=active_leases,
            version=self.version,
            backend=self.backend,
            register_time=timestamp(self.register_time),
            last_heartbeat_time=timestamp(self.last_heartbeat_time),
        )


@dataclass
class LeaseRecord:
    """One session's hold on a guest."""

    id: str
    pool_node: str
    pool_node_address: str
    guest: str
    sensor: str
    src_ip: str
    protocol: int
    session: str
    shared: bool
    create_time: float
    expire_time: float
    state: LeaseState = LeaseState.ACTIVE
    end_time: float | None = None
    end_reason: str = ""

    def end(self, state: LeaseState, reason: str, now: float) -> None:
        """Move an active lease to an ending state; ended leases never change again."""
        if self.state is not LeaseState.ACTIVE:
            raise FailedPrecondition(f"lease {self.id} already {self.state.name.lower()}")
        if state is LeaseState.ACTIVE:
            raise ValueError("a lease cannot end in the ACTIVE state")
        self.state, self.end_time, self.end_reason = state, now, reason

    def to_proto(self) -> lease_pb2.Lease:
        """The lease as the API shows it (never with guest credentials)."""
        return lease_pb2.Lease(
            id=self.id,
            pool_node=self.pool_node,
            pool_node_address=self.pool_node_address,
            guest=self.guest,
            sensor=self.sensor,
            src_ip=self.src_ip,
            protocol=self.protocol,  # type: ignore[arg-type]
            session=self.session,
            state=self.state.value,
            shared=self.shared,
            create_time=timestamp(self.create_time),
            expire_time=timestamp(self.expire_time),
            end_time=timestamp(self.end_time),
            end_reason=self.end_reason,
        )


@dataclass
class SensorRecord:
    """A sensor that has contacted the controller."""

    name: str
    first_seen_time: float
    last_seen_time: float
    version: str = ""
    listen_addresses: list[str] = field(default_factory=list)
    hostname: str = ""

    def to_proto(self, active_leases: int) -> fleet_pb2.Sensor:
        """The sensor as the fleet API shows it."""
        return fleet_pb2.Sensor(
            name=self.name,
            version=self.version,
            listen_addresses=self.listen_addresses,
            hostname=self.hostname,
            active_leases=active_leases,
            first_seen_time=timestamp(self.first_seen_time),
            last_seen_time=timestamp(self.last_seen_time),
        )
