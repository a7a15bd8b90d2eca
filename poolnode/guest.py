"""A guest and its life cycle.

::

    booting ──ssh login───▶ pristine ──lease──▶ leased ◀──lease (same address)──┐
       │                        │                 │                            │
       │                        │                 └──last lease released──▶ idle
       │                        │                                              │
       └────────────────────────┴──── failed health check, recycle, ──────────┴──▶ destroyed
                                      unused_timeout, node stop

A guest is never handed to a second attacker address unless the node shares guests.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from honeyfleet.v1 import common_pb2
from poolnode.guest_login import WarmLogin


class GuestState(enum.Enum):
    """Where a guest is in its life cycle."""

    BOOTING = common_pb2.GUEST_STATE_BOOTING
    PRISTINE = common_pb2.GUEST_STATE_PRISTINE
    LEASED = common_pb2.GUEST_STATE_LEASED
    IDLE = common_pb2.GUEST_STATE_IDLE
    DESTROYED = common_pb2.GUEST_STATE_DESTROYED


ALLOWED = {
    GuestState.BOOTING: {GuestState.PRISTINE, GuestState.DESTROYED},
    GuestState.PRISTINE: {GuestState.LEASED, GuestState.DESTROYED},
    GuestState.LEASED: {GuestState.IDLE, GuestState.DESTROYED},
    GuestState.IDLE: {GuestState.LEASED, GuestState.DESTROYED},
    GuestState.DESTROYED: set(),
}


class IllegalTransition(RuntimeError):
    """A guest was asked to move between states the life cycle does not connect."""


@dataclass
class LeaseHold:
    """A lease on a guest."""

    lease_id: str
    sensor: str
    """The sensor's identity, "sensor/<name>"."""
    src_ip: str
    since: float
    session: str = "-"
    """The sensor's session id ("-" if the controller did not say)."""
    protocol: str = "-"
    """"ssh" or "telnet" ("-" if the controller did not say)."""


@dataclass
class Guest:
    """One guest of the pool; ``handle`` is the backend's own record of it."""

    id: str
    handle: object
    state: GuestState = GuestState.BOOTING
    created: float = field(default_factory=time.time)
    changed: float = field(default_factory=time.time)
    address: str | None = None
    src_ips: list[str] = field(default_factory=list)
    leases: dict[str, LeaseHold] = field(default_factory=dict)
    # Every lease the guest has had, for snapshot metadata.
    history: list[LeaseHold] = field(default_factory=list)
    # Set while a replacement boots for a recycle; cleared if the guest gets leased.
    retiring: bool = False
    # The node's own SSH login into the guest, from pristine until destroyed.
    login: WarmLogin | None = None

    def move(self, to: GuestState) -> None:
        """Change state, refusing moves the life cycle does not allow."""
        if to not in ALLOWED[self.state]:
            raise IllegalTransition(f"guest {self.id}: {self.state.name} -> {to.name}")
        self.state = to
        self.changed = time.time()

    def hold(self, lease: LeaseHold) -> None:
        """Put a lease on the guest (it becomes leased)."""
        if self.state is not GuestState.LEASED:
            self.move(GuestState.LEASED)
        self.leases[lease.lease_id] = lease
        self.history.append(lease)
        self.retiring = False
        if lease.src_ip not in self.src_ips:
            self.src_ips.append(lease.src_ip)

    def drop(self, lease_id: str) -> LeaseHold | None:
        """Remove a lease; the guest idles when its last lease goes."""
        lease = self.leases.pop(lease_id, None)
        if lease is not None and not self.leases and self.state is GuestState.LEASED:
            self.move(GuestState.IDLE)
        return lease

    def to_proto(self) -> common_pb2.Guest:
        """The guest as heartbeats show it (the controller knows which node sent it)."""
        return common_pb2.Guest(
            id=self.id,
            state=self.state.value,
            src_ips=self.src_ips,
            lease_count=len(self.leases),
            create_time=_ts(self.created),
            state_change_time=_ts(self.changed),
        )


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
