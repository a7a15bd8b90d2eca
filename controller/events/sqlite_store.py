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
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from controller.events import sqlite_sql as sql
from controller.events.query import QueryBuilder, SqlQueries, Statement
from controller.events.rows import (
    EventRow,
    client_versions,
    first_new,
    summarise_sessions,
    to_micros,
)
from controller.events.store import StoreDataError
from honeyfleet.errors import Unavailable

T = TypeVar("T")
BUSY_TIMEOUT_MS = 5000
# Pages the WAL may hold before a commit copies them back into the database (SQLite's
# default is 1,000). Events spread their writes over index pages (session, sensor...),
# a few pages each; between checkpoints a page rewritten by many commits is copied
# back once, so a longer WAL costs less CPU per event (about a sixth of the writer's, at
# a fleet's 40 events a commit), for a WAL file of up to 40 MB.
WAL_CHECKPOINT_PAGES = 10_000


class SqliteEventStore(SqlQueries):
    """Events in one SQLite file (a different file from the controller's state)."""

    kind = "sqlite"
    queries = QueryBuilder(sql.DIALECT)

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
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
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
        db.execute("BEGIN IMMEDIATE")
        try:
            # One lookup of the batch's known ids and one executemany, not a statement
            # per row; BEGIN IMMEDIATE holds the write lock, so no id can be stored
            # between the two.
            stored = {r.hf_event_id for r in rows} - self._existing(db, rows)
            db.executemany(
                sql.INSERT_EVENT,
                [
                    (
                        r.hf_event_id,
                        r.time_us,
                        r.sensor,
                        r.session,
                        r.eventid,
                        r.src_ip,
                        r.protocol,
                        r.json,
                    )
                    for r in rows
                    if r.hf_event_id in stored
                ],
            )
            new = first_new(rows, stored)
            deltas = summarise_sessions(new)
            db.executemany(sql.UPSERT_SESSION, [self.queries.session_params(d) for d in deltas])
            db.executemany(
                sql.EARLIER_SESSION_START,
                [{"start": to_micros(d.start), "session": d.session} for d in deltas],
            )
            db.executemany(sql.INSERT_SENSOR, [(s,) for s in {r.sensor for r in new}])
            db.executemany(sql.INSERT_CLIENT, [(v,) for v in client_versions(new)])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return stored

    @staticmethod
    def _existing(db: sqlite3.Connection, rows: Sequence[EventRow]) -> set[str]:
        """The delivery ids among ``rows`` already stored."""
        ids = list({r.hf_event_id for r in rows})
        found: set[str] = set()
        for start in range(0, len(ids), sql.LOOKUP_CHUNK):
            chunk = ids[start : start + sql.LOOKUP_CHUNK]
            marks = ", ".join("?" * len(chunk))
            query = f"SELECT hf_event_id FROM events WHERE hf_event_id IN ({marks})"  # noqa: S608
            cursor = db.execute(query, chunk)
            found.update(id_ for (id_,) in cursor)
        return found

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

    async def size(self) -> int:
        """Bytes of the database's pages in use (freed pages are reused, not counted)."""
        return await self._read(self._size)

    def _size(self) -> int:
        """Pages in use times the page size (on the reader thread)."""
        db = self._r()
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * db.execute("PRAGMA page_size").fetchone()[0])

    async def delete_oldest(self) -> int:
        """Delete the RETENTION_CHUNK oldest events, then sessions older than the rest."""
        return await self._write(self._delete_oldest)

    def _delete_oldest(self) -> int:
        """One budget chunk (on the writer thread, one transaction)."""
        db = self._w()
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = db.execute(sql.DELETE_OLDEST_EVENTS, (sql.RETENTION_CHUNK,)).rowcount
            oldest = db.execute("SELECT min(time_us) FROM events").fetchone()[0]
            # Sessions whose every event is gone (all of them once no event is left).
            cutoff = sys.maxsize if oldest is None else oldest
            db.execute(sql.EXPIRE_SESSIONS, (cutoff, sql.RETENTION_CHUNK))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return int(deleted)

    def _delete_chunk(self, statement: str, cutoff: int) -> bool:
        """Delete up to RETENTION_CHUNK rows older than ``cutoff``; whether more may remain."""
        deleted = self._w().execute(statement, (cutoff, sql.RETENTION_CHUNK)).rowcount
        return bool(deleted >= sql.RETENTION_CHUNK)

    # Reading

    async def _fetch_all(self, statements: Sequence[Statement]) -> list[list[tuple[Any, ...]]]:
        """Run SELECTs on the reader thread, in one job."""
        return await self._read(self._query_all, statements)

    def _query_all(self, statements: Sequence[Statement]) -> list[list[tuple[Any, ...]]]:
        """Run SELECTs on the reader connection (on the reader thread)."""
        db = self._r()
        return [db.execute(s.text, s.args).fetchall() for s in statements]
