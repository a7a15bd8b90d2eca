"""The event budget: how many events one session and one source address may write.

Every attacker-driven event (commands, failed logins, forwarding requests, environment
variables, uploads...) is counted against:

* its session: at most ``session_max_events`` in all, and at most
  ``session_events_per_minute`` (a bucket that holds a minute's worth and refills
  continuously);
* its source address, across all its sessions: a bucket of ``source_max_events`` that
  refills at ``source_events_per_minute``. The last ``MAX_SOURCES`` addresses are
  remembered (least recently seen forgotten first), so the table is bounded.

An event over either budget is not written; the first one a session loses is replaced by
one ``honeyfleet.session.event_budget`` event saying which budget ran out, and the
session's ``cowrie.session.closed`` says how many were lost (``events_suppressed``).
Events a session writes once, or a bounded number of times (connect, close, the
recording's summary, the successful login, the client's version and algorithms, lease
and guest outcomes, this summary), are never counted or refused: they frame the
record of a session.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from sensor.metrics import SensorMetrics
from sensor.session.sources import source_of

MAX_SOURCES = 65536
SUMMARY = "honeyfleet.session.event_budget"
EXEMPT = frozenset(
    {
        "cowrie.session.connect",
        "cowrie.session.closed",
        "cowrie.log.closed",
        "cowrie.login.success",
        "cowrie.client.version",
        "cowrie.client.kex",
        # Once per guest joined (leases per session are bounded by the login attempts).
        "cowrie.session.params",
        "cowrie.proxy.backend_connected",
        "cowrie.proxy.backend_disconnected",
        "cowrie.proxy.client_disconnect",
        "honeyfleet.lease.failed",
        "honeyfleet.lease.lost",
        "honeyfleet.guest.failed",
        "honeyfleet.guest.lost",
        "honeyfleet.telnet.options",
        "honeyfleet.artefact.budget",
        SUMMARY,
    }
)

Clock = Callable[[], float]


class Scope(Enum):
    """Which budget refused an event (the summary's ``budget`` field, a metric label)."""

    SESSION_TOTAL = "session_total"
    SESSION_RATE = "session_rate"
    SOURCE = "source"


@dataclass(frozen=True)
class EventLimits:
    """The budget's settings (from the sensor's config)."""

    session_max_events: int
    session_events_per_minute: int
    source_max_events: int
    source_events_per_minute: int


class Bucket:
    """A token bucket: ``capacity`` events at once, refilled at ``per_minute``."""

    __slots__ = ("_at", "_capacity", "_per_second", "_tokens")

    def __init__(self, capacity: int, per_minute: int, now: float) -> None:
        self._capacity = float(capacity)
        self._per_second = per_minute / 60.0
        self._tokens = float(capacity)
        self._at = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._per_second)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class EventBudget:
    """A sensor's event budget: the limits and the table of source addresses."""

    def __init__(
        self, limits: EventLimits, metrics: SensorMetrics, clock: Clock = time.monotonic
    ) -> None:
        self.limits = limits
        self._metrics = metrics
        self._clock = clock
        self._sources: OrderedDict[str, Bucket] = OrderedDict()

    def session(self) -> SessionBudget:
        """The budget of a new session."""
        limits = self.limits
        per_minute = limits.session_events_per_minute
        return SessionBudget(self, Bucket(per_minute, per_minute, self._clock()))

    def source_allows(self, src_ip: str) -> bool:
        """Spend one of ``src_ip``'s events if it has one left."""
        now = self._clock()
        source = source_of(src_ip)
        bucket = self._sources.get(source)
        if bucket is None:
            limits = self.limits
            bucket = Bucket(limits.source_max_events, limits.source_events_per_minute, now)
            self._sources[source] = bucket
            if len(self._sources) > MAX_SOURCES:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        return bucket.take(now)

    def refused(self, scope: Scope) -> None:
        """Count an event lost to the budget."""
        self._metrics.events_over_budget.labels(scope.value).inc()

    def now(self) -> float:
        """The budget's clock."""
        return self._clock()


class SessionBudget:
    """One session's share of the event budget."""

    __slots__ = ("_budget", "_rate", "suppressed", "written")

    def __init__(self, budget: EventBudget, rate: Bucket) -> None:
        self._budget = budget
        self._rate = rate
        self.written = 0
        self.suppressed = 0

    def check(self, eventid: str, src_ip: str) -> Scope | None:
        """Count an event in, or say which budget refuses it (and count the refusal)."""
        if eventid in EXEMPT:
            return None
        scope: Scope
        if self.written >= self._budget.limits.session_max_events:
            scope = Scope.SESSION_TOTAL
        elif not self._rate.take(self._budget.now()):
            scope = Scope.SESSION_RATE
        elif not self._budget.source_allows(src_ip):
            scope = Scope.SOURCE
        else:
            self.written += 1
            return None
        self.suppressed += 1
        self._budget.refused(scope)
        return scope
