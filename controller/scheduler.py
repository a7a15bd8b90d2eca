"""Lease placement: which pool node to ask for a guest next.

1. Affinity: a node already holding a guest for this attacker address, so the same
   attacker sees the same machine from any sensor.
2. Pristine capacity: the node with the most free pristine guests (not promised to
   another acquire), then the fewest active leases.
3. Sharing: a node that allows shared guests and has a used guest, least loaded first.
Draining, dead, label-mismatched and already-tried nodes are never candidates.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
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
    nodes: Iterable[PoolNodeRecord],
    affinity: Collection[str],
    labels: Mapping[str, str],
    active_leases: Mapping[str, int],
    tried: Collection[str],
) -> Placement | None:
    """The best node to ask now, or None when no node can take the lease."""
    best_pristine: PoolNodeRecord | None = None
    best_shared: PoolNodeRecord | None = None
    pristine_key: tuple[int, int, str] | None = None
    shared_key: tuple[float, str] | None = None
    for node in nodes:
        if node.name in tried or not node.schedulable or not node.offers(labels):
            continue
        if node.name in affinity:
            return Placement(node, False, "affinity")
        view = node.view
        leases = active_leases.get(node.name, 0)
        if view.free > 0:
            key = (-view.free, leases, node.name)
            if pristine_key is None or key < pristine_key:
                best_pristine, pristine_key = node, key
        elif node.share_guests and view.shareable:
            skey = (leases / max(view.capacity, 1), node.name)
            if shared_key is None or skey < shared_key:
                best_shared, shared_key = node, skey
    if best_pristine is not None:
        return Placement(best_pristine, False, "pristine")
    if best_shared is not None:
        return Placement(best_shared, True, "shared")
    return None
