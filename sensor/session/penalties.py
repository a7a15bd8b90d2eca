"""Per-source penalties, after OpenSSH 9.8's ``PerSourcePenalties``.

A source whose connection ends badly (failed authentication, no authentication at all,
login grace time exceeded, evicted to make room) earns a penalty of that kind's
seconds. Penalties of one source add up, capped at ``penalty_max``; once a source's
penalty reaches ``penalty_min`` it is refused at accept until the penalty has run out.
Sources are counted as :mod:`sensor.session.sources` says (an IPv6 /64 is one source).
The clock is monotonic (a wall-clock jump neither frees nor locks anyone). The table of
penalised sources is bounded: when it is full, the source penalised least recently
leaves it (unlike OpenSSH's "permissive" overflow, which stops penalising anyone new).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from honeyfleet.events import plain_ip
from sensor.config import SensorConfig
from sensor.session.sources import source_of


class Outcome(Enum):
    """How a connection ended, as far as penalties go."""

    AUTHENTICATED = "authenticated"
    AUTH_FAILED = "authfail"
    NO_AUTH = "noauth"
    GRACE_EXCEEDED = "grace-exceeded"
    # Closed by the sensor to make room for another source: not the source's doing.
    EVICTED = "evicted"


@dataclass
class _Entry:
    """One penalised source: when its penalty ends, and whether it is refused."""

    until: float
    active: bool


class Penalties:
    """The bounded table of penalised sources."""

    def __init__(self, config: SensorConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._amounts = {
            Outcome.AUTH_FAILED: config.penalty_authfail,
            Outcome.NO_AUTH: config.penalty_noauth,
            Outcome.GRACE_EXCEEDED: config.penalty_grace_exceeded,
        }
        self._exempt = [ipaddress.ip_network(net, strict=False) for net in config.penalty_exempt]
        self._table: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        """Sources in the table (expired ones included until they are purged)."""
        return len(self._table)

    def refused(self, src_ip: str) -> bool:
        """Whether ``src_ip`` is serving a penalty now."""
        source = source_of(src_ip)
        entry = self._table.get(source)
        if entry is None:
            return False
        if entry.until <= self._clock():
            del self._table[source]
            return False
        return entry.active

    def penalise(self, src_ip: str, outcome: Outcome) -> bool:
        """Add the penalty ``outcome`` earns (none for a login); True if any."""
        amount = self._amounts.get(outcome, 0.0)
        if amount <= 0 or not self._config.per_source_penalties or self._is_exempt(src_ip):
            return False
        now = self._clock()
        source = source_of(src_ip)
        entry = self._table.pop(source, None)
        if entry is None or entry.until <= now:
            entry = _Entry(until=now, active=False)
            self._make_room()
        entry.until = min(entry.until + amount, now + self._config.penalty_max)
        entry.active = entry.active or entry.until - now >= self._config.penalty_min
        self._table[source] = entry  # most recently penalised last
        return True

    def _make_room(self) -> None:
        """Keep the table within penalty_max_sources: the least recently penalised go."""
        while len(self._table) >= self._config.penalty_max_sources:
            self._table.popitem(last=False)

    def _is_exempt(self, src_ip: str) -> bool:
        """Whether ``src_ip`` is in penalty_exempt."""
        try:
            address = ipaddress.ip_address(plain_ip(src_ip))
        except ValueError:
            return False
        return any(address in net for net in self._exempt)
