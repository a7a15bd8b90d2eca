"""The event store interface: one Protocol, two implementations (SQLite, PostgreSQL).

Both implementations answer queries through :mod:`controller.events.query` (one builder
over a small dialect) and keep to themselves only their connections, transactions,
writes and housekeeping (retention, partitions, the size budget).

A store keeps every event verbatim with typed columns for time, sensor, session,
eventid and src_ip, stores each event's ``hf_event_id`` once, and keeps one summary row per session
up to date in the same transaction as the events. It also exposes Cowrie's SQL output
shape (``sessions``, ``auth``, ``input``, ``downloads``, ``ttylog``, ...) as views, so
existing queries keep working.

Errors: a store raises :class:`~honeyfleet.errors.Unavailable` when it cannot be reached
or written right now (retrying may work), and :class:`StoreDataError` when it refuses
the data itself (retrying the same rows will fail again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from controller.events.rows import EventRow
from honeyfleet.errors import InvalidArgument


class StoreDataError(InvalidArgument):
    """The store refused a row's content; the same rows would fail again."""


@dataclass(frozen=True)
class EventQuery:
    """Which events to list, in (time, seq) order, after an optional position."""

    limit: int
    eventid: str = ""
    sensor: str = ""
    src_ip: str = ""
    session: str = ""
    start: datetime | None = None
    end: datetime | None = None
    after: tuple[int, int] | None = None
    """(time in microseconds, seq) of the last event of the previous page."""


@dataclass(frozen=True)
class SessionQuery:
    """Which sessions to list, newest first, before an optional position."""

    limit: int
    sensor: str = ""
    src_ip: str = ""
    username: str = ""
    start: datetime | None = None
    end: datetime | None = None
    before: tuple[int, str] | None = None
    """(start time in microseconds, session id) of the last session of the previous page."""


@dataclass(frozen=True)
class StatsQuery:
    """Bounds of the statistics."""

    top: int
    sensor: str = ""
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True)
class StoredEvent:
    """An event as read back from a store."""

    seq: int
    """Store-assigned, increasing in arrival order; breaks ties between equal times."""
    time_us: int
    hf_event_id: str
    """The event's delivery id (unique in the store)."""
    eventid: str
    session: str
    src_ip: str
    protocol: str
    json: str


@dataclass(frozen=True)
class SessionSummary:
    """One session's summary row."""

    session: str
    sensor: str
    src_ip: str
    protocol: str
    start_us: int
    last_us: int
    end_us: int | None
    pool_node: str
    guest: str
    lease: str
    username: str
    login_attempts: int
    client_version: str
    terminal_size: str
    event_count: int


@dataclass(frozen=True)
class FileStat:
    """A captured file by hash."""

    sha256: str
    count: int
    example_name: str
    first_us: int


@dataclass(frozen=True)
class Stats:
    """Top lists, most frequent first."""

    usernames: list[tuple[str, int]]
    passwords: list[tuple[str, int]]
    src_ips: list[tuple[str, int]]
    sessions_per_sensor: list[tuple[str, int]]
    sessions_per_pool_node: list[tuple[str, int]]
    files: list[FileStat]


class EventStore(Protocol):
    """Durable, idempotent storage of events, and the queries the fleet API needs."""

    kind: str
    """"sqlite" or "postgres", for logs."""

    async def open(self) -> None:
        """Prepare the store (schema, threads, pools); must not fail if it is unreachable."""

    async def close(self) -> None:
        """Release connections and threads."""

    async def ping(self) -> None:
        """Check the store can be used now; Unavailable if not."""

    async def write_batch(self, rows: Sequence[EventRow]) -> set[str]:
        """Store rows in one transaction; returns the ids stored now (others existed)."""

    async def maintain(self, now: datetime) -> None:
        """Housekeeping: partitions ahead, retention."""

    async def size(self) -> int:
        """Bytes the events and sessions take now (what ``store_max_bytes`` bounds)."""

    async def delete_oldest(self) -> int:
        """Delete one chunk of the oldest events (and sessions older than all events left);
        how many events went (0: nothing more can go)."""

    async def list_events(self, query: EventQuery) -> list[StoredEvent]:
        """A page of events."""

    async def list_sessions(self, query: SessionQuery) -> list[SessionSummary]:
        """A page of sessions."""

    async def get_session(self, session: str) -> SessionSummary | None:
        """One session's summary, or None."""

    async def stats(self, query: StatsQuery) -> Stats:
        """Top lists."""
