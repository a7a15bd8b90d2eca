"""Who gets in: one registry of every live session of both protocols, and their slots.

Checked when a TCP connection is accepted, before a byte is read, in this order:

1. a source serving a per-source penalty is refused (:mod:`sensor.session.penalties`);
2. a spool near its bound refuses everyone, keeping room for running sessions' events;
3. hard caps on connections in total and per address (``max_connections``,
   ``max_connections_per_ip``), over both protocols;
4. the protocol's pool of unauthenticated connections (SSH and Telnet each have their
   own, so idle Telnet connections cannot lock SSH out): a source may hold at most
   ``max_startups_per_source`` of it (OpenSSH's ``PerSourceMaxStartups``), and the pool
   drops at random like OpenSSH's ``MaxStartups start:rate:full``: from ``start``
   unauthenticated connections on with probability ``rate``%, rising linearly to 100%
   at ``full``.

Better than OpenSSH: when the random early drop picks a newcomer whose source holds
fewer unauthenticated connections than the greediest source, the greediest source's
oldest unauthenticated connection is closed instead and the newcomer comes in. A
slowloris from a few addresses then costs a client that holds no connection nothing;
only sources holding as much as anyone are dropped at random.

A slot leaves the unauthenticated pool at login and is given back the moment its
connection ends (before any I/O of the session's clean-up); how the connection ended
feeds the source's penalty. A source is what :mod:`sensor.session.sources` says (an
IPv4 address, or an IPv6 /64).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from sensor.config import SensorConfig
from sensor.metrics import SensorMetrics
from sensor.session.penalties import Outcome, Penalties
from sensor.session.sources import source_of

EVICTED = "evicted to make room for another source's connection"


class LiveSession(Protocol):
    """What the registry needs of a session: a way to end it."""

    def close(self, reason: str) -> None:
        """End the session (idempotent); the session gives its slot back."""


class Slot:
    """One admitted connection's place; given back once, by :meth:`release`."""

    __slots__ = (
        "_admission",
        "authenticated",
        "protocol",
        "released",
        "session",
        "source",
        "src_ip",
        "started",
    )

    def __init__(self, admission: Admission, protocol: str, src_ip: str, started: float) -> None:
        self._admission = admission
        self.protocol = protocol
        self.src_ip = src_ip
        # What the per-source counts count it under (an IPv6 address's /64).
        self.source = source_of(src_ip)
        self.started = started
        self.session: LiveSession | None = None
        self.authenticated = False
        self.released = False

    def attach(self, session: LiveSession) -> None:
        """The session this slot belongs to (closed when the slot is evicted)."""
        self.session = session

    def logged_in(self) -> None:
        """The connection is past login: it leaves the unauthenticated pool."""
        if not self.authenticated and not self.released:
            self.authenticated = True
            self._admission._left_pool(self)

    def release(self, outcome: Outcome) -> None:
        """The connection ended (idempotent); ``outcome`` decides the source's penalty."""
        if self.released:
            return
        self.released = True
        self._admission._released(self, outcome)


class Admission:
    """Counts connections, refuses or evicts past the limits, and knows every session."""

    def __init__(
        self,
        config: SensorConfig,
        metrics: SensorMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self.penalties = Penalties(config, clock)
        self._start, self._rate, self._full = config.max_startups_triple
        self._per_ip: Counter[str] = Counter()
        self._slots: set[Slot] = set()
        # Per protocol: source -> its unauthenticated slots, oldest first.
        self._pools: dict[str, dict[str, list[Slot]]] = {}
        self._closing: set[asyncio.Task[Any]] = set()
        self._shutting_down = False

    @property
    def connections(self) -> set[LiveSession]:
        """Every live session of both protocols (those whose connection has not ended)."""
        return {slot.session for slot in self._slots if slot.session is not None}

    def unauthenticated(self, protocol: str) -> int:
        """Connections of ``protocol`` not yet logged in."""
        return sum(len(slots) for slots in self._pools.get(protocol, {}).values())

    def admit(self, protocol: str, src_ip: str, *, spool_near_full: bool) -> Slot | str:
        """A slot for a new connection, or why it is refused (a metric label)."""
        reason = self._refusal(protocol, src_ip, spool_near_full)
        if reason is not None:
            self._metrics.refusals.labels(reason).inc()
            return reason
        slot = Slot(self, protocol, src_ip, self._clock())
        self._slots.add(slot)
        self._per_ip[slot.source] += 1
        self._pools.setdefault(protocol, {}).setdefault(slot.source, []).append(slot)
        self._metrics.connections.set(len(self._slots))
        return slot

    def close_all(self, reason: str) -> None:
        """Close every live session (at shutdown: nobody is penalised for it)."""
        self._shutting_down = True
        for session in self.connections:
            session.close(reason)

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a connection's clean-up task until it ends (for a clean shutdown)."""
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def drain(self) -> None:
        """Wait for every clean-up task."""
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _refusal(self, protocol: str, src_ip: str, spool_near_full: bool) -> str | None:
        """Why a new connection is refused, or None (after evicting, if that makes room)."""
        config = self._config
        if self.penalties.refused(src_ip):
            return "penalty"
        if spool_near_full:
            return "spool_near_full"
        if len(self._slots) >= config.max_connections:
            return "max_connections"
        source = source_of(src_ip)
        if self._per_ip[source] >= config.max_connections_per_ip:
            return "max_connections_per_ip"
        pool = self._pools.get(protocol, {})
        mine = len(pool.get(source, ()))
        if mine >= config.max_startups_per_source:
            return "max_startups_per_source"
        if not self._should_drop(sum(len(slots) for slots in pool.values())):
            return None
        victim = self._victim(pool, mine)
        if victim is None:
            return "max_startups"
        self._metrics.evictions.inc()
        victim.release(Outcome.EVICTED)
        if victim.session is not None:
            victim.session.close(EVICTED)
        return None

    def _should_drop(self, startups: int) -> bool:
        """OpenSSH's random early drop at ``startups`` unauthenticated connections."""
        start, rate, full = self._start, self._rate, self._full
        if startups < start:
            return False
        if startups >= full or rate >= 100:
            return True
        p = rate + (100 - rate) * (startups - start) // (full - start)
        return secrets.randbelow(100) < p

    @staticmethod
    def _victim(pool: dict[str, list[Slot]], mine: int) -> Slot | None:
        """The oldest unauthenticated slot of the greediest source, if after the swap it
        still holds at least as many as the newcomer.

        So a source holding a single connection (a legitimate client half-way through its
        login, among attackers each holding one) is never the one to go.
        """
        most = max((len(slots) for slots in pool.values()), default=0)
        if most < mine + 2:
            return None
        return min(
            (slots[0] for slots in pool.values() if len(slots) == most),
            key=lambda slot: slot.started,
        )

    def _left_pool(self, slot: Slot) -> None:
        """Take ``slot`` out of its protocol's unauthenticated pool."""
        pool = self._pools.get(slot.protocol, {})
        slots = pool.get(slot.source, [])
        if slot in slots:
            slots.remove(slot)
            if not slots:
                del pool[slot.source]

    def _released(self, slot: Slot, outcome: Outcome) -> None:
        """Give ``slot`` back and penalise its source for how it ended."""
        self._left_pool(slot)
        self._slots.discard(slot)
        self._per_ip[slot.source] -= 1
        if self._per_ip[slot.source] <= 0:
            del self._per_ip[slot.source]
        self._metrics.connections.set(len(self._slots))
        if self._shutting_down or slot.authenticated:
            return
        if self.penalties.penalise(slot.src_ip, outcome):
            self._metrics.penalties.labels(outcome.value).inc()
