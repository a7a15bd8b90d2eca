"""The durable event spool: every event is written here before anything else happens.

SQLite in WAL mode with ``synchronous=FULL``. All database work runs on one dedicated
thread holding the only connection, so the event loop never waits for a disk; appends
made while a commit is running are committed together in the next one (group commit:
one fsync for many events). An event counts as durable once :meth:`Spool.flush`
returned after its :meth:`Spool.append`; only then is it visible to the uploader and
handed to the ``mirror`` (the local JSON lines file), both of which follow the commit.
Events leave only through :meth:`Spool.delete`, which the uploader calls after the
controller acknowledged them.

The spool has a size bound, accounted on the event loop when an event is appended (so
pending events count). Past ``near_full`` of it the sensor refuses new sessions, keeping
the rest for the events of sessions already accepted; only past the bound itself is an
event dropped (and counted), so the sensor never blocks on a full disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from honeyfleet.events import Event, to_json

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL,
    json TEXT NOT NULL
)
"""
# Most events in one transaction; a burst larger than this commits in several.
COMMIT_EVENTS = 2000

Mirror = Callable[[list[Event]], None]


@dataclass(frozen=True)
class Spooled:
    """An undelivered event and its place in the spool."""

    seq: int
    event: Event
    text: str
    """The event's JSON as spooled, sent as is (never serialised again)."""

    @property
    def size(self) -> int:
        """Characters of JSON, as the spool's size bound counts them."""
        return len(self.text)


class Spool:
    """A bounded, crash-safe FIFO of events; used from one event loop, writes on a thread."""

    def __init__(
        self, path: Path, *, max_bytes: int, near_full: float, mirror: Mirror | None = None
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.near_full_bytes = int(max_bytes * near_full)
        self.dropped = 0
        self.changed = asyncio.Event()
        self._mirror = mirror
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[Event, str]] = []
        self._committer: asyncio.Task[None] | None = None
        # Opening is start-up work, done once; waiting for it here keeps construction simple.
        count, size = self._executor.submit(self._open).result()
        self.count: int = count
        self.bytes: int = size
        if count:
            log.info("spool %s holds %d undelivered events (%d bytes)", path, count, size)

    @property
    def near_full(self) -> bool:
        """Whether new sessions must be refused to keep room for running ones."""
        return bool(self.bytes >= self.near_full_bytes)

    def append(self, event: Event) -> bool:
        """Queue an event for the next commit; False (and counted) only when the spool is full.

        :meth:`flush` waits until it is durable.
        """
        text = to_json(event)
        if self.bytes + len(text) > self.max_bytes:
            self.dropped += 1
            log.error("spool full (%d bytes): dropped event %s", self.bytes, event["eventid"])
            return False
        self._pending.append((event, text))
        self.count += 1
        self.bytes += len(text)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(self._commit_pending())
        return True

    async def flush(self) -> None:
        """Return once every event appended so far is committed."""
        while self._committer is not None and not self._committer.done():
            # Shielded: a caller that gives up must not cancel other producers' commit.
            await asyncio.shield(self._committer)

    async def oldest(self, limit: int, max_bytes: int) -> list[Spooled]:
        """Up to ``limit`` of the oldest events, at most ``max_bytes`` of JSON (at least one)."""
        return await self._run(self._select, limit, max_bytes)

    async def delete(self, batch: list[Spooled]) -> None:
        """Remove delivered events."""
        await self._run(self._delete, [item.seq for item in batch])
        self.count -= len(batch)
        self.bytes -= sum(item.size for item in batch)

    def close(self) -> None:
        """Commit what is still pending, then close the database (blocks: for shutdown)."""
        pending, self._pending = self._pending, []
        if pending:
            # The single thread runs jobs in order: this lands after any running commit.
            self._executor.submit(self._insert, pending).result()
        self._executor.submit(self._close).result()
        self._executor.shutdown(wait=True)

    async def _commit_pending(self) -> None:
        """Commit pending events in batches until none are left (one task at a time)."""
        while self._pending:
            batch = self._pending[:COMMIT_EVENTS]
            del self._pending[:COMMIT_EVENTS]
            try:
                await self._run(self._insert, batch)
            except (sqlite3.Error, OSError) as e:
                # Nothing else can hold these events: say so loudly and keep the count right.
                self.dropped += len(batch)
                self.count -= len(batch)
                self.bytes -= sum(len(text) for _, text in batch)
                log.error("spool %s: cannot commit %d events: %s", self.path, len(batch), e)
                continue
            self.changed.set()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the spool's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # On the spool's thread.

    def _open(self) -> tuple[int, int]:
        """Open (and create) the database; (events, bytes) it holds."""
        # isolation_level=None: transactions are ours, one fsync per commit.
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(SCHEMA)
        self._db = db
        row = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(json)), 0) FROM events")
        count, size = row.fetchone()
        return int(count), int(size)

    def _conn(self) -> sqlite3.Connection:
        """The open connection."""
        assert self._db is not None, "spool used after close()"
        return self._db

    def _insert(self, batch: list[tuple[Event, str]]) -> None:
        """Write events in one transaction, then hand them to the mirror."""
        db = self._conn()
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT INTO events (uuid, json) VALUES (?, ?)",
                [(event["uuid"], text) for event, text in batch],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if self._mirror is not None:
            try:
                self._mirror([event for event, _ in batch])
            except OSError as e:  # the spool has them; the local copy is a convenience
                log.error("cannot write the events' local copy: %s", e)

    def _select(self, limit: int, max_bytes: int) -> list[Spooled]:
        """The oldest events, parsed here rather than on the event loop."""
        rows = self._conn().execute("SELECT seq, json FROM events ORDER BY seq LIMIT ?", (limit,))
        out: list[Spooled] = []
        size = 0
        for seq, text in rows:
            size += len(text)
            if out and size > max_bytes:
                break
            out.append(Spooled(seq, json.loads(text), text))
        return out

    def _delete(self, seqs: list[int]) -> None:
        """Delete rows in one transaction."""
        db = self._conn()
        db.execute("BEGIN")
        db.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq in seqs])
        db.execute("COMMIT")

    def _close(self) -> None:
        """Close the connection."""
        if self._db is not None:
            self._db.close()
            self._db = None
