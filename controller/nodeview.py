"""The controller's view of one pool node's guests, kept exact between heartbeats.

A node reports its guest table only when it changed, stamped with a version that goes
up with every change. The view is that table plus the controller's own changes the
table does not include yet:

* ``reserve`` promises a pristine guest to an acquire before the node is asked, so two
  acquires never count on the same last guest;
* ``allocated`` / ``released`` record the node's answers, each stamped with the table
  version the change made; changes newer than the last table are kept as *pending* and
  laid over every table older than them, so a heartbeat sent before an allocation never
  undoes it, and one sent before a release never reports its lease as still held;
* ``refused`` records the node's "no guest left": no pristine guest is counted on it
  until a newer table arrives; ``unreachable`` (a failed call) counts none until the
  node's next heartbeat.

A reported table is capped at the node's capacity as the controller knows it, so a
node cannot attract leases by the guests it claims. A node that versions nothing (an
older release: every version is 0) gets the old behaviour: the controller's changes
stand until its next table replaces them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from honeyfleet.v1 import common_pb2

LIVE = (common_pb2.GUEST_STATE_LEASED, common_pb2.GUEST_STATE_IDLE)


@dataclass(frozen=True)
class _Pending:
    """A change of the controller's own, not yet seen in a reported table."""

    version: int
    lease_id: str
    # The guest as the allocation left it; None for a release.
    guest: common_pb2.Guest | None


@dataclass
class NodeView:
    """One node's guests and leases as the controller counts them."""

    node: str
    capacity: int
    guests: dict[str, common_pb2.Guest] = field(default_factory=dict)
    lease_ids: set[str] = field(default_factory=set)
    counts: common_pb2.GuestCounts = field(default_factory=common_pb2.GuestCounts)
    # Version of the last table applied; 0 before the first one.
    table_version: int = 0
    # Acquires that were promised a pristine guest and await the node's answer.
    reserved: int = 0
    # The node said it has no guest left; cleared by a newer table.
    refused_at: int | None = None
    # A call to the node failed; cleared by its next heartbeat.
    unreachable: bool = False
    _reported_guests: dict[str, common_pb2.Guest] = field(default_factory=dict)
    _reported_leases: set[str] = field(default_factory=set)
    _pending: list[_Pending] = field(default_factory=list)
    _newest: int = 0
    # counts.pristine as a plain int: placement reads it for every node, every time.
    _pristine: int = 0

    @property
    def free(self) -> int:
        """Pristine guests no acquire has been promised."""
        if self.refused_at is not None or self.unreachable:
            return 0
        return max(self._pristine - self.reserved, 0)

    @property
    def shareable(self) -> bool:
        """Whether a guest is in use (a node that shares guests can take one more lease)."""
        return self.counts.leased + self.counts.idle > 0

    def src_ips(self) -> set[str]:
        """Attacker addresses served by the node's live guests (for affinity)."""
        return {ip for g in self.guests.values() if g.state in LIVE for ip in g.src_ips}

    def apply_table(
        self, version: int, guests: Iterable[common_pb2.Guest], lease_ids: Iterable[str]
    ) -> bool:
        """Take a reported table; False if it is older than the last one applied.

        The guests are kept as they are (stamped with the node's name), not copied:
        the caller hands them over.
        """
        if version < self.table_version:
            return False
        table: dict[str, common_pb2.Guest] = {}
        for guest in guests:
            if len(table) >= self.capacity:
                break
            guest.pool_node = self.node
            table[guest.id] = guest
        self._reported_guests = table
        self._reported_leases = set(lease_ids)
        self.table_version = version
        self._newest = max(self._newest, version)
        self._pending = [p for p in self._pending if p.version > version]
        if self.refused_at is not None and version > self.refused_at:
            self.refused_at = None
        self._rebuild()
        return True

    def reserve(self) -> None:
        """Promise one pristine guest to an acquire about to ask the node."""
        self.reserved += 1

    def unreserve(self) -> None:
        """The node answered (or failed): the promise is settled."""
        self.reserved = max(self.reserved - 1, 0)

    def allocated(self, version: int, lease_id: str, guest: common_pb2.Guest) -> None:
        """Record an allocation the node made at table version ``version``."""
        self._newest = max(self._newest, version)
        if version and version <= self.table_version:
            return  # the last table already shows it
        stamped = common_pb2.Guest()
        stamped.CopyFrom(guest)
        stamped.pool_node = self.node
        self._pending.append(_Pending(version, lease_id, stamped))
        self._rebuild()

    def released(self, version: int, lease_id: str) -> None:
        """Record a release the node made at table version ``version``."""
        self._newest = max(self._newest, version)
        if not version or version > self.table_version:
            self._pending.append(_Pending(version, lease_id, None))
            self._rebuild()

    def refused(self) -> None:
        """The node has no guest for a lease: count none until a newer table."""
        self.refused_at = self._newest

    def clear(self) -> None:
        """Forget every guest (the node died)."""
        self.apply_table(self.table_version, (), ())

    def _rebuild(self) -> None:
        """The reported table with the pending changes laid over it, and its counts."""
        guests = dict(self._reported_guests)
        leases = set(self._reported_leases)
        for change in sorted(self._pending, key=lambda p: p.version):
            if change.guest is None:
                leases.discard(change.lease_id)
            else:
                guests[change.guest.id] = change.guest
                leases.add(change.lease_id)
        counts = common_pb2.GuestCounts()
        for guest in guests.values():
            match guest.state:
                case common_pb2.GUEST_STATE_BOOTING:
                    counts.booting += 1
                case common_pb2.GUEST_STATE_PRISTINE:
                    counts.pristine += 1
                case common_pb2.GUEST_STATE_LEASED:
                    counts.leased += 1
                case common_pb2.GUEST_STATE_IDLE:
                    counts.idle += 1
                case _:
                    pass
        self.guests, self.lease_ids, self.counts = guests, leases, counts
        self._pristine = counts.pristine
