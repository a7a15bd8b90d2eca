"""Lease placement: which pool node to ask for a guest next.

1. Affinity: a node already holding a guest for this attacker address, so the same
   attacker sees the same machine from any sensor.
2. Pristine capacity: the node with the most free pristine guests (not promised to
   another acquire), then the fewest active leases.
3. Sharing: a node that allows shared guests and has a used guest, least loaded first.
Draining, dead, label-mismatched and already-tried nodes are never candidates.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sized
from dataclasses import dataclass

from controller.models import PoolNodeRecord


@dataclass(frozen=True)
class Placement:
    """One node to try, and whether it may put the lease on a shared guest."""

    node: PoolNodeRecord
    allow_shared: bool
    reason: str

    @property
    def takes_pristine(self) -> bool:
        """Whether the node is expected to hand out one of its pristine guests."""
        return self.reason == "pristine"


def choose(
    nodes: Mapping[str, PoolNodeRecord],
    affinity: Collection[str],
    labels: Mapping[str, str],
    active_leases: Mapping[str, Sized],
    tried: Collection[str],
) -> Placement | None:
    """The best node to ask now, or None when no node can take the lease.

    Runs for every placement over every node: nodes that have nothing to give are
    passed over before anything else about them is looked at.
    """

    def eligible(node: PoolNodeRecord) -> bool:
        return node.name not in tried and node.schedulable and (not labels or node.offers(labels))

    for name in sorted(affinity):
        node = nodes.get(name)
        if node is not None and eligible(node):
            return Placement(node, False, "affinity")
    best_pristine: PoolNodeRecord | None = None
    best_shared: PoolNodeRecord | None = None
    # The best pristine candidate's free guests and active leases.
    most_free, fewest = 0, 0
    shared_key: tuple[float, str] | None = None
    for node in nodes.values():
        view = node.view
        free = view.free
        if free > 0:
            # Compared first, cheapest first: most nodes lose on their free guests.
            if free < most_free:
                continue
            leases = len(active_leases.get(node.name, ()))
            if (
                best_pristine is not None
                and free == most_free
                and (leases, node.name) >= (fewest, best_pristine.name)
            ):
                continue
            if eligible(node):
                best_pristine, most_free, fewest = node, free, leases
        elif best_pristine is None and node.share_guests and view.shareable and eligible(node):
            leases = len(active_leases.get(node.name, ()))
            skey = (leases / max(view.capacity, 1), node.name)
            if shared_key is None or skey < shared_key:
                best_shared, shared_key = node, skey
    if best_pristine is not None:
        return Placement(best_pristine, False, "pristine")
    if best_shared is not None:
        return Placement(best_shared, True, "shared")
    return None
