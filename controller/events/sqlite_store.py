"""The default event store: SQLite in the controller's state directory.

WAL with ``synchronous=FULL``: a committed batch survives a crash or power loss, which
is what an acknowledgement promises. One thread owns the writing connection (SQLite
allows one writer) and another the reading connection, so queries never wait behind
a batch and the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from controller.events import sqlite_sql as sql
from controller.events.rows import (
    EventRow,
    client_versions,
    first_new,
    summarise_sessions,
    to_micros,
)
from controller.events.store import (
    EventQuery,
    FileStat,
    SessionQuery,
    SessionSummary,
    Stats,
    StatsQuery,
    StoreDataError,
    StoredEvent,
)
from honeyfleet.errors import Unavailable

T = TypeVar("T")
BUSY_TIMEOUT_MS = 5000


class SqliteEventStore:
    """Events in one SQLite file (a different file from the controller's state)."""

    kind = "sqlite"

    def __init__(self, path: Path, *, retention_days: int = 0) -> None:
        self.path = path
        self._retention_days = retention_days
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="events-w")
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="events-r")
        self._wdb: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Create the file and schema (migrating an older one) and open both connections."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._write(self._open_writer)
        await self._read(self._open_reader)

    def _connect(self) -> sqlite3.Connection:
        """A connection to the event database, waiting for locks briefly."""
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return db

    def _open_writer(self) -> None:
        """Open the writing connection (WAL, full sync) and migrate the schema."""
        db = self._connect()
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(sql.MIGRATIONS[version:], start=version + 1):
            # executescript commits first; the version bump rides in the same script.
            db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
        self._wdb = db

    def _open_reader(self) -> None:
        """Open the read-only connection used by queries."""
        db = self._connect()
        db.execute("PRAGMA query_only=1")
        self._rdb = db

    async def close(self) -> None:
        """Close both connections and their threads."""
        if self._wdb is not None:
            await self._write(self._wdb.close)
            self._wdb = None
        if self._rdb is not None:
            await self._read(self._rdb.close)
            self._rdb = None
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the writer thread."""
        return await self._on(self._writer, fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the reader thread."""
        return await self._on(self._reader, fn, *args)

    async def _on(
        self, executor: concurrent.futures.Executor, fn: Callable[..., T], *args: Any
    ) -> T:
        """Run ``fn`` on a database thread, translating SQLite errors to ours."""
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except (sqlite3.IntegrityError, sqlite3.DataError) as e:
            raise StoreDataError(f"event store {self.path} refused the data: {e}") from e
        except sqlite3.Error as e:
            raise Unavailable(f"event store {self.path}: {e}") from e

    def _w(self) -> sqlite3.Connection:
        """The writing connection (on the writer thread)."""
        if self._wdb is None:
            raise Unavailable(f"event store {self.path} is not open")
        return self._wdb

    def _r(self) -> sqlite3.Connection:
        """The reading connection (on the reader thread)."""
        if self._rdb is None:
            raise Unavailable(f"event store {self.path} is not open")
        return self._rdb

    async def ping(self) -> None:
        """Check the file can be read."""
        await self._read(lambda: self._r().execute("SELECT 1").fetchone())

    # Writing

    async def write_batch(self, rows: Sequence[EventRow]) -> set[str]:
        """Store rows and their session summaries in one transaction."""
        return await self._write(self._write_batch, rows)

    def _write_batch(self, rows: Sequence[EventRow]) -> set[str]:
        """Insert rows, then merge session summaries, in one transaction."""
        db = self._w()
        stored: set[str] = set()
        db.execute("BEGIN IMMEDIATE")
        try:
            for r in rows:
                cursor = db.execute(
                    sql.INSERT_EVENT,
                    (
                        r.uuid,
                        r.time_us,
                        r.sensor,
                        r.session,
                        r.eventid,
                        r.src_ip,
                        r.protocol,
                        r.json,
                    ),
                )
                if cursor.rowcount == 1:
                    stored.add(r.uuid)
            new = first_new(rows, stored)
            db.executemany(
                sql.UPSERT_SESSION,
                [
                    (
                        d.session,
                        d.sensor,
                        d.src_ip,
                        d.protocol,
                        to_micros(d.start),
                        to_micros(d.last),
                        None if d.end is None else to_micros(d.end),
                        d.pool_node,
                        d.guest,
                        d.lease,
                        d.username,
                        d.login_attempts,
                        d.client_version,
                        d.terminal_size,
                        d.events,
                    )
                    for d in summarise_sessions(new)
                ],
            )
            db.executemany(sql.INSERT_SENSOR, [(s,) for s in {r.sensor for r in new}])
            db.executemany(sql.INSERT_CLIENT, [(v,) for v in client_versions(new)])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return stored

    async def maintain(self, now: datetime) -> None:
        """Delete events and sessions older than retention_days (if set), in chunks."""
        if self._retention_days > 0:
            cutoff = to_micros(now - timedelta(days=self._retention_days))
            # One writer job per chunk: batches of new events queue on the same thread
            # and go in between chunks, never behind the whole purge.
            while await self._write(self._delete_chunk, sql.EXPIRE_EVENTS, cutoff):
                pass
            while await self._write(self._delete_chunk, sql.EXPIRE_SESSIONS, cutoff):
                pass

    def _delete_chunk(self, statement: str, cutoff: int) -> bool:
        """Delete up to RETENTION_CHUNK rows older than ``cutoff``; whether more may remain."""
        deleted = self._w().execute(statement, (cutoff, sql.RETENTION_CHUNK)).rowcount
        return bool(deleted >= sql.RETENTION_CHUNK)

    # Reading

    async def list_events(self, query: EventQuery) -> list[StoredEvent]:
        """A page of events in (time, seq) order."""
        where, args = _event_filters(query)
        if query.after is not None:
            where.append("(time_us, seq) > (?, ?)")
            args.extend(query.after)
        text = (
            f"SELECT {sql.EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} "  # noqa: S608
            "ORDER BY time_us, seq LIMIT ?"
        )
        rows = await self._read(self._query, text, (*args, query.limit))
        return [StoredEvent(*row) for row in rows]

    async def list_sessions(self, query: SessionQuery) -> list[SessionSummary]:
        """A page of sessions, newest first."""
        where: list[str] = ["1=1"]
        args: list[Any] = []
        for column in ("sensor", "src_ip"):
            if value := getattr(query, column):
                where.append(f"{column} = ?")
                args.append(value)
        if query.username:
            where.append(
                f"session IN (SELECT session FROM events WHERE {sql.LOGINS} "  # noqa: S608
                f"AND {sql.USERNAME} = ?)"
            )
            args.append(query.username)
        _time_range(where, args, "start_us", query.start, query.end)
        if query.before is not None:
            where.append("(start_us, session) < (?, ?)")
            args.extend(query.before)
        text = (
            f"SELECT {sql.SESSION_COLUMNS} FROM event_sessions "  # noqa: S608
            f"WHERE {' AND '.join(where)} ORDER BY start_us DESC, session DESC LIMIT ?"
        )
        rows = await self._read(self._query, text, (*args, query.limit))
        return [SessionSummary(*row) for row in rows]

    async def get_session(self, session: str) -> SessionSummary | None:
        """One session's summary."""
        rows = await self._read(
            self._query,
            f"SELECT {sql.SESSION_COLUMNS} FROM event_sessions WHERE session = ?",  # noqa: S608
            (session,),
        )
        return SessionSummary(*rows[0]) if rows else None

    async def stats(self, query: StatsQuery) -> Stats:
        """Top lists over the query's time range and sensor."""
        return await self._read(self._stats, query)

    def _stats(self, query: StatsQuery) -> Stats:
        """Compute every top list (on the reader thread)."""
        events: list[str] = []
        event_args: list[Any] = []
        _time_range(events, event_args, "time_us", query.start, query.end)
        sessions: list[str] = []
        session_args: list[Any] = []
        _time_range(sessions, session_args, "start_us", query.start, query.end)
        if query.sensor:
            for where, args in ((events, event_args), (sessions, session_args)):
                where.append("sensor = ?")
                args.append(query.sensor)

        def top(key: str, table: str, where: list[str], args: list[Any]) -> list[tuple[str, int]]:
            """The most frequent non-empty values of ``key``."""
            terms = " AND ".join([*where, "k IS NOT NULL", "k <> ''"])
            text = (
                f"SELECT {key} AS k, count(*) AS n FROM {table} WHERE {terms} "  # noqa: S608
                "GROUP BY k ORDER BY n DESC, k LIMIT ?"
            )
            return [(str(k), n) for k, n in self._query(text, (*args, query.top))]

        logins = [sql.LOGINS, *events]
        files_where = " AND ".join([sql.FILES, *events, "h IS NOT NULL"])
        files = self._query(
            "SELECT json_extract(json, '$.shasum') AS h, count(*) AS n, "  # noqa: S608
            "min(coalesce(json_extract(json, '$.url'), json_extract(json, '$.filename'), '')), "
            f"min(time_us) FROM events WHERE {files_where} GROUP BY h ORDER BY n DESC, h LIMIT ?",
            (*event_args, query.top),
        )
        return Stats(
            usernames=top(sql.USERNAME, "events", logins, event_args),
            passwords=top("json_extract(json, '$.password')", "events", logins, event_args),
            src_ips=top("src_ip", "event_sessions", sessions, session_args),
            sessions_per_sensor=top("sensor", "event_sessions", sessions, session_args),
            sessions_per_pool_node=top("pool_node", "event_sessions", sessions, session_args),
            files=[FileStat(str(h), n, str(name), first) for h, n, name, first in files],
        )

    def _query(self, text: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run a SELECT on the reader connection."""
        return self._r().execute(text, args).fetchall()


def _event_filters(query: EventQuery) -> tuple[list[str], list[Any]]:
    """WHERE terms and arguments for an event query's filters."""
    where: list[str] = ["1=1"]
    args: list[Any] = []
    for column in ("eventid", "sensor", "src_ip", "session"):
        if value := getattr(query, column):
            where.append(f"{column} = ?")
            args.append(value)
    _time_range(where, args, "time_us", query.start, query.end)
    return where, args


def _time_range(
    where: list[str], args: list[Any], column: str, start: datetime | None, end: datetime | None
) -> None:
    """Add a half-open [start, end) range on a microsecond column."""
    if start is not None:
        where.append(f"{column} >= ?")
        args.append(to_micros(start))
    if end is not None:
        where.append(f"{column} < ?")
        args.append(to_micros(end))
