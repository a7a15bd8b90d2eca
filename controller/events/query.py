"""The one query layer of the event stores: SQL built once, over a small dialect.

Both stores answer the same questions (pages of events and sessions, one session, top
lists, session summaries to merge) with the same SQL, except for a few spellings: the
placeholder, how a time is kept (integer microseconds or ``timestamptz``), how a JSON
field is read, how an address is compared and printed. :class:`Dialect` holds exactly
those; :class:`QueryBuilder` writes every statement from them and turns result rows
back into the store's dataclasses; :class:`SqlQueries` answers the
:class:`~controller.events.store.EventStore` read methods given a way to run
statements, which is all a store adds (its connections and transactions).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from controller.events.rows import (
    FILE_EVENTS,
    LOGIN_EVENTS,
    SessionDelta,
    eventid_in,
    from_micros,
)
from controller.events.store import (
    EventQuery,
    FileStat,
    SessionQuery,
    SessionSummary,
    Stats,
    StatsQuery,
    StoredEvent,
)

# Spelled exactly as in the stores' partial username indexes, so the planner uses them.
LOGINS = eventid_in(LOGIN_EVENTS)
FILES = eventid_in(FILE_EVENTS)
# Position of the time columns in a session row (start, last, end).
SESSION_TIMES = (4, 5, 6)


@dataclass(frozen=True)
class Dialect:
    """How one SQL engine spells what differs between the stores."""

    param: str
    """The placeholder of one argument ("?" or "%s")."""
    event_time: str
    """The events table's time column."""
    session_times: tuple[str, str, str]
    """The sessions table's start, last and end time columns."""
    json_field: Callable[[str], str]
    """SQL reading a top-level JSON field of an event as text."""
    address: str
    """An address argument, cast to the column's type where the engine needs it."""
    address_text: str
    """The src_ip column as text."""
    as_text: Callable[[str], str]
    """An expression cast to text (for comparing with '')."""
    stored_json: str
    """The event's JSON text as stored (never decoded and re-encoded in Python)."""
    time_in: Callable[[datetime], Any]
    """A time as the engine's time columns take it."""
    time_out: Callable[[Any], int]
    """A time column's value as microseconds since the epoch."""
    text_in: Callable[[str | None], str | None]
    """Attacker-chosen text as a text column takes it."""


@dataclass(frozen=True)
class Statement:
    """One SQL statement and its arguments."""

    text: str
    args: tuple[Any, ...]


class _Where:
    """AND-ed conditions and their arguments, in order."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.terms: list[str] = []
        self.args: list[Any] = []

    def add(self, term: str, *args: Any) -> None:
        """Add a condition; ``{}`` in it stands for one placeholder per argument."""
        self.terms.append(term.format(*([self.dialect.param] * len(args))))
        self.args.extend(args)

    def equals(self, column: str, value: str) -> None:
        """column = value, when a value is given (an empty filter matches all)."""
        if value:
            self.add(f"{column} = {{}}", value)

    def address(self, value: str) -> None:
        """src_ip = value, when given."""
        if value:
            self.terms.append(f"src_ip = {self.dialect.address}")
            self.args.append(value)

    def time_range(self, column: str, start: datetime | None, end: datetime | None) -> None:
        """The half-open range [start, end) on a time column."""
        if start is not None:
            self.add(f"{column} >= {{}}", self.dialect.time_in(start))
        if end is not None:
            self.add(f"{column} < {{}}", self.dialect.time_in(end))

    def sql(self, *extra: str) -> str:
        """The WHERE clause's body (TRUE when empty)."""
        return " AND ".join([*self.terms, *extra]) or "1=1"


class QueryBuilder:
    """Every read statement of the event stores, and their results as dataclasses."""

    def __init__(self, dialect: Dialect) -> None:
        self.d = dialect
        self.username = dialect.json_field("username")
        self.event_columns = (
            f"seq, {dialect.event_time}, hf_event_id, eventid, session, {dialect.address_text}, "
            f"protocol, {dialect.stored_json}"
        )
        self.session_columns = (
            f"session, sensor, {dialect.address_text}, protocol, "
            f"{', '.join(dialect.session_times)}, pool_node, guest, lease, "
            "username, login_attempts, coalesce(client_version, ''), "
            "coalesce(terminal_size, ''), event_count"
        )

    def events(self, query: EventQuery) -> Statement:
        """A page of events in (time, seq) order after ``query.after``."""
        where = _Where(self.d)
        for column in ("eventid", "sensor", "session"):
            where.equals(column, getattr(query, column))
        where.address(query.src_ip)
        where.time_range(self.d.event_time, query.start, query.end)
        if query.after is not None:
            after_time = self.d.time_in(from_micros(query.after[0]))
            where.add(f"({self.d.event_time}, seq) > ({{}}, {{}})", after_time, query.after[1])
        return Statement(
            f"SELECT {self.event_columns} FROM events WHERE {where.sql()} "  # noqa: S608
            f"ORDER BY {self.d.event_time}, seq LIMIT {self.d.param}",
            (*where.args, query.limit),
        )

    def event_rows(self, rows: Sequence[Sequence[Any]]) -> list[StoredEvent]:
        """Result rows of :meth:`events` as StoredEvents."""
        return [
            StoredEvent(seq, self.d.time_out(t), str(id_), eventid, session, ip, proto, text)
            for seq, t, id_, eventid, session, ip, proto, text in rows
        ]

    def sessions(self, query: SessionQuery) -> Statement:
        """A page of sessions, newest first, before ``query.before``."""
        where = _Where(self.d)
        where.equals("sensor", query.sensor)
        where.address(query.src_ip)
        if query.username:
            where.add(
                f"session IN (SELECT session FROM events WHERE {LOGINS} "  # noqa: S608
                f"AND {self.username} = {{}})",
                query.username,
            )
        start = self.d.session_times[0]
        where.time_range(start, query.start, query.end)
        if query.before is not None:
            before_time = self.d.time_in(from_micros(query.before[0]))
            where.add(f"({start}, session) < ({{}}, {{}})", before_time, query.before[1])
        return Statement(
            f"SELECT {self.session_columns} FROM event_sessions "  # noqa: S608
            f"WHERE {where.sql()} ORDER BY {start} DESC, session DESC LIMIT {self.d.param}",
            (*where.args, query.limit),
        )

    def session(self, session: str) -> Statement:
        """One session's summary row."""
        return Statement(
            f"SELECT {self.session_columns} FROM event_sessions "  # noqa: S608
            f"WHERE session = {self.d.param}",
            (session,),
        )

    def session_rows(self, rows: Sequence[Sequence[Any]]) -> list[SessionSummary]:
        """Result rows of :meth:`sessions` or :meth:`session` as summaries."""
        out = []
        for row in rows:
            values = list(row)
            for index in SESSION_TIMES:
                if values[index] is not None:
                    values[index] = self.d.time_out(values[index])
            out.append(SessionSummary(*values))
        return out

    def stats(self, query: StatsQuery) -> list[Statement]:
        """The top-list statements, in the order :meth:`stats_result` expects."""
        events = _Where(self.d)
        events.time_range(self.d.event_time, query.start, query.end)
        sessions = _Where(self.d)
        sessions.time_range(self.d.session_times[0], query.start, query.end)
        events.equals("sensor", query.sensor)
        sessions.equals("sensor", query.sensor)

        def top(key: str, table: str, where: _Where, *extra: str) -> Statement:
            """The most frequent non-empty values of ``key``."""
            terms = where.sql(*extra, f"{key} IS NOT NULL", f"{self.d.as_text(key)} <> ''")
            return Statement(
                f"SELECT {key} AS k, count(*) AS n FROM {table} WHERE {terms} "  # noqa: S608
                f"GROUP BY k ORDER BY n DESC, k LIMIT {self.d.param}",
                (*where.args, query.top),
            )

        shasum = self.d.json_field("shasum")
        name = f"coalesce({self.d.json_field('url')}, {self.d.json_field('filename')}, '')"
        files = Statement(
            f"SELECT {shasum} AS h, count(*) AS n, min({name}), "  # noqa: S608
            f"min({self.d.event_time}) FROM events "
            f"WHERE {events.sql(FILES, f'{shasum} IS NOT NULL')} "
            f"GROUP BY h ORDER BY n DESC, h LIMIT {self.d.param}",
            (*events.args, query.top),
        )
        return [
            top(self.username, "events", events, LOGINS),
            top(self.d.json_field("password"), "events", events, LOGINS),
            top(self.d.address_text, "event_sessions", sessions),
            top("sensor", "event_sessions", sessions),
            top("pool_node", "event_sessions", sessions),
            files,
        ]

    def stats_result(self, results: Sequence[Sequence[Sequence[Any]]]) -> Stats:
        """Stats from the results of :meth:`stats`' statements."""
        tops = [[(str(k), int(n)) for k, n in rows] for rows in results[:5]]
        return Stats(
            usernames=tops[0],
            passwords=tops[1],
            src_ips=tops[2],
            sessions_per_sensor=tops[3],
            sessions_per_pool_node=tops[4],
            files=[
                FileStat(str(h), int(n), str(name), self.d.time_out(first))
                for h, n, name, first in results[5]
            ],
        )

    def session_params(self, delta: SessionDelta) -> tuple[Any, ...]:
        """The arguments of a store's session upsert for one delta (its column order)."""
        t, text = self.d.time_in, self.d.text_in
        return (
            delta.session,
            delta.sensor,
            delta.src_ip,
            delta.protocol,
            t(delta.start),
            t(delta.last),
            None if delta.end is None else t(delta.end),
            text(delta.pool_node),
            text(delta.guest),
            text(delta.lease),
            text(delta.username),
            delta.login_attempts,
            text(delta.client_version),
            text(delta.terminal_size),
            delta.events,
        )


class SqlQueries(abc.ABC):
    """The EventStore read methods, for a store that can run a list of statements."""

    queries: QueryBuilder

    @abc.abstractmethod
    async def _fetch_all(self, statements: Sequence[Statement]) -> list[list[tuple[Any, ...]]]:
        """Run SELECT statements (on one connection) and return each one's rows."""

    async def list_events(self, query: EventQuery) -> list[StoredEvent]:
        """A page of events in (time, seq) order."""
        (rows,) = await self._fetch_all([self.queries.events(query)])
        return self.queries.event_rows(rows)

    async def list_sessions(self, query: SessionQuery) -> list[SessionSummary]:
        """A page of sessions, newest first."""
        (rows,) = await self._fetch_all([self.queries.sessions(query)])
        return self.queries.session_rows(rows)

    async def get_session(self, session: str) -> SessionSummary | None:
        """One session's summary, or None."""
        (rows,) = await self._fetch_all([self.queries.session(session)])
        found = self.queries.session_rows(rows)
        return found[0] if found else None

    async def stats(self, query: StatsQuery) -> Stats:
        """Top lists over the query's time range and sensor."""
        return self.queries.stats_result(await self._fetch_all(self.queries.stats(query)))
