"""Lease placement: which pool nodes to ask for a guest, in order.

1. Affinity: a node already holding a guest for this attacker address, so the same
   attacker sees the same machine from any sensor.
2. Pristine capacity: nodes with pristine guests, most first.
3. Sharing: nodes that allow shared guests and have a used guest, least loaded first.
Draining, dead and label-mismatched nodes are never candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controller.models import PoolNodeRecord
from honeyfleet.v1 import common_pb2


@dataclass(frozen=True)
class Placement:
    """One node to try, and whether it may put the lease on a shared guest."""

    node: PoolNodeRecord
    allow_shared: bool
    reason: str


def plan(
    nodes: Iterable[PoolNodeRecord],
    src_ip: str,
    labels: Mapping[str, str],
    active_leases: Mapping[str, int],
) -> list[Placement]:
    """The nodes to ask, best first; empty when no node can take the lease now."""
    eligible = [n for n in nodes if n.schedulable and n.offers(dict(labels))]
    placements: list[Placement] = []
    seen: set[str] = set()

    def add(node: PoolNodeRecord, allow_shared: bool, reason: str) -> None:
        if node.name not in seen:
            seen.add(node.name)
            placements.append(Placement(node, allow_shared, reason))

    for node in eligible:
        if node.holds_guest_for(src_ip):
            add(node, False, "affinity")
    by_pristine = sorted(
        (n for n in eligible if n.counts.pristine > 0),
        key=lambda n: (-n.counts.pristine, active_leases.get(n.name, 0), n.name),
    )
    for node in by_pristine:
        add(node, False, "pristine")
    used = (common_pb2.GUEST_STATE_LEASED, common_pb2.GUEST_STATE_IDLE)
    shareable = sorted(
        (n for n in eligible if n.share_guests and any(g.state in used for g in n.guests)),
        key=lambda n: (active_leases.get(n.name, 0) / max(n.capacity, 1), n.name),
    )
    for node in shareable:
        add(node, True, "shared")
    return placements


def note_allocation(node: PoolNodeRecord, guest: common_pb2.Guest) -> None:
    """Update a node's guest table with an allocation before its next heartbeat.

    Without this, leases issued between two heartbeats would all pile onto the node
    that looked most pristine at the last one.
    """
    for i, known in enumerate(node.guests):
        if known.id == guest.id:
            if known.state == common_pb2.GUEST_STATE_PRISTINE:
                node.counts.pristine = max(node.counts.pristine - 1, 0)
                node.counts.leased += 1
            node.guests[i] = guest
            return
    node.guests.append(guest)
    node.counts.pristine = max(node.counts.pristine - 1, 0)
    node.counts.leased += 1
