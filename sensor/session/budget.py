"""The guest budget: leases held at once per source address and per sensor.

A lease ties up a guest VM, the scarcest thing a fleet has. Bounding leases per source
keeps one address from holding many guests; bounding them per sensor keeps one sensor
from draining a pool shared with others. A login past either bound fails like any other
login without a guest (the attacker sees a failed login; the events say why).
"""

from __future__ import annotations

from collections import Counter

from sensor.session.sources import source_of


class LeaseBudget:
    """Counts leases held (or being asked for) per source and in total."""

    def __init__(self, *, per_source: int, total: int) -> None:
        self._per_source = per_source
        self._total = total
        self._held: Counter[str] = Counter()

    @property
    def held(self) -> int:
        """Leases held or asked for now."""
        return sum(self._held.values())

    def take(self, src_ip: str) -> str | None:
        """Count one lease for ``src_ip`` in; or why none may be had (nothing counted)."""
        if self.held >= self._total:
            return f"the sensor holds {self._total} leases already (max_leases)"
        source = source_of(src_ip)
        if self._held[source] >= self._per_source:
            return f"this address holds {self._per_source} leases already (max_leases_per_source)"
        self._held[source] += 1
        return None

    def give(self, src_ip: str) -> None:
        """A lease counted by :meth:`take` is over (or was never granted)."""
        source = source_of(src_ip)
        self._held[source] -= 1
        if self._held[source] <= 0:
            del self._held[source]
