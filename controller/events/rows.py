"""What the stores write: validated event rows, and the per-session summaries they feed.

An :class:`EventRow` is an event that passed ingest validation, with the typed columns
every store indexes (time, sensor, session, eventid, src_ip) pulled out of the verbatim
JSON. :func:`summarise_sessions` folds newly stored rows into one
:class:`SessionDelta` per session, which a store merges into its sessions table in the
same transaction, so session summaries count every event exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from honeyfleet.events import Event

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MICROSECOND = timedelta(microseconds=1)
LOGIN_EVENTS = ("cowrie.login.success", "cowrie.login.failed")
FILE_EVENTS = ("cowrie.session.file_upload", "cowrie.session.file_download")


def eventid_in(eventids: Iterable[str]) -> str:
    """An SQL ``eventid IN (...)`` condition (event ids are our constants, never input)."""
    return "eventid IN (" + ", ".join(f"'{e}'" for e in eventids) + ")"


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime."""
    return (moment - EPOCH) // ONE_MICROSECOND


def from_micros(micros: int) -> datetime:
    """The aware UTC datetime of a microsecond timestamp."""
    return EPOCH + timedelta(microseconds=micros)


@dataclass(frozen=True, slots=True)
class EventRow:
    """One validated event, ready to store."""

    hf_event_id: str
    """Canonical (lower-case, hyphenated) form of the event's delivery id."""
    time: datetime
    sensor: str
    """The sending sensor's certificate name."""
    session: str
    eventid: str
    src_ip: str
    protocol: str
    json: str
    """The event as a Cowrie JSON object, as received (sensor field corrected)."""
    event: Event
    """The parsed JSON."""

    @property
    def time_us(self) -> int:
        """The event time in microseconds since the epoch."""
        return to_micros(self.time)

    def text(self, key: str) -> str | None:
        """An event field as text (None when absent); attackers control these."""
        value = self.event.get(key)
        return None if value is None else str(value)


@dataclass
class SessionDelta:
    """What a batch of new events adds to one session's summary."""

    session: str
    sensor: str
    src_ip: str
    protocol: str
    start: datetime
    last: datetime
    end: datetime | None = None
    pool_node: str = ""
    guest: str = ""
    lease: str = ""
    username: str = ""
    login_attempts: int = 0
    client_version: str | None = None
    terminal_size: str | None = None
    events: int = 0

    def add(self, row: EventRow) -> None:
        """Fold one event in."""
        self.events += 1
        self.start = min(self.start, row.time)
        self.last = max(self.last, row.time)
        for key in ("pool_node", "guest", "lease"):
            value = row.event.get(key)
            if isinstance(value, str) and value:
                setattr(self, key, value)
        apply = _APPLY.get(row.eventid)
        if apply is not None:
            apply(self, row)


def _closed(delta: SessionDelta, row: EventRow) -> None:
    """cowrie.session.closed, or a refusal (a session of one event): the session's end."""
    delta.end = row.time


def _login_success(delta: SessionDelta, row: EventRow) -> None:
    """cowrie.login.success: an attempt, and the username that got in."""
    delta.login_attempts += 1
    delta.username = row.text("username") or ""


def _login_failed(delta: SessionDelta, row: EventRow) -> None:
    """cowrie.login.failed: an attempt."""
    delta.login_attempts += 1


def _client_version(delta: SessionDelta, row: EventRow) -> None:
    """cowrie.client.version: the SSH client's identification."""
    delta.client_version = row.text("version")


def _client_size(delta: SessionDelta, row: EventRow) -> None:
    """cowrie.client.size: the terminal size."""
    delta.terminal_size = f"{row.text('width')}x{row.text('height')}"


# Event id -> how it changes its session's summary (Cowrie's SQL output keeps the same).
_APPLY: dict[str, Callable[[SessionDelta, EventRow], None]] = {
    "cowrie.session.closed": _closed,
    "honeyfleet.session.refused": _closed,
    "cowrie.login.success": _login_success,
    "cowrie.login.failed": _login_failed,
    "cowrie.client.version": _client_version,
    "cowrie.client.size": _client_size,
}


def summarise_sessions(rows: Iterable[EventRow]) -> list[SessionDelta]:
    """One delta per session for newly stored rows (in row order)."""
    deltas: dict[str, SessionDelta] = {}
    for row in rows:
        delta = deltas.get(row.session)
        if delta is None:
            delta = deltas[row.session] = SessionDelta(
                session=row.session,
                sensor=row.sensor,
                src_ip=row.src_ip,
                protocol=row.protocol,
                start=row.time,
                last=row.time,
            )
        delta.add(row)
    return list(deltas.values())


def first_new(rows: Iterable[EventRow], stored: set[str]) -> list[EventRow]:
    """The rows whose id was stored now, each id once (a batch may repeat one)."""
    seen: set[str] = set()
    out = []
    for row in rows:
        if row.hf_event_id in stored and row.hf_event_id not in seen:
            seen.add(row.hf_event_id)
            out.append(row)
    return out


def client_versions(rows: Iterable[EventRow]) -> set[str]:
    """Distinct SSH client versions among rows (for Cowrie's clients table)."""
    return {
        version
        for row in rows
        if row.eventid == "cowrie.client.version" and (version := row.text("version"))
    }
