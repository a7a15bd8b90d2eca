"""The durable event spool: every event is written here before anything else happens.

Shared by every role that writes events (sensors, pool nodes): each keeps its own spool
in its state directory, delivered by :class:`honeyfleet.uploader.Uploader`.

SQLite in WAL mode with ``synchronous=FULL``. All database work runs on one dedicated
thread holding the only connection, so the event loop never waits for a disk; appends
made while a commit is running are committed together in the next one (group commit:
one fsync for many events). An event counts as durable once :meth:`Spool.flush`
returned after its :meth:`Spool.append`; only then is it visible to the uploader and
handed to the ``mirror`` (the local JSON lines file), both of which follow the commit.
Events leave only through :meth:`Spool.delete`, which the uploader calls after the
controller acknowledged them.

An event :meth:`Spool.append` accepted is never dropped. The spool has a size bound,
accounted on the event loop when an event is appended (so pending events count), and it
reserves its own room on disk: a file of ``reserve_bytes`` next to the database, made at
start. Admission reads two truthful flags:

* :attr:`Spool.near_full`: new sessions are refused, keeping the rest for the events of
  sessions already accepted. True past ``near_full`` of the bound, when the disk has
  less free space than the reserve, or when :attr:`Spool.full`.
* :attr:`Spool.full`: the disk is full. A commit failed, so the reserve was given up to
  make room and the commit retried; if even that fails the spool is *stalled*: events
  stay pending in memory (still counted) and the commit is retried, with back-off,
  until it succeeds. :meth:`Spool.flush` does not wait for a stalled spool, so a session
  can still end. Once delivered events are deleted and the disk has room, the reserve
  is made again and the spool is no longer full.

Only past the size bound itself is a new event refused by :meth:`Spool.append` (and
counted), so its writer never blocks on a full spool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
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
    hf_event_id TEXT NOT NULL,
    json TEXT NOT NULL
)
"""
# A spool written before events had ``hf_event_id`` named its column ``uuid``.
LEGACY_COLUMN = "uuid"
# Most events in one transaction; a burst larger than this commits in several.
COMMIT_EVENTS = 2000
# Seconds between commit attempts of a stalled spool (doubling up to the most).
RETRY_FIRST = 0.5
RETRY_MOST = 30.0
RESERVE_CHUNK = 1024 * 1024

Mirror = Callable[[list[Event]], None]


@dataclass(frozen=True)
class Spooled:
    """An undelivered event and its place in the spool."""

    seq: int
    event: Event
    text: str
    """The event's JSON as sent (as spooled, unless an older sensor spooled it)."""
    size: int
    """Characters of JSON as spooled, as the spool's size bound counts them."""


class Spool:
    """A bounded, crash-safe FIFO of events; used from one event loop, writes on a thread."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        near_full: float,
        reserve_bytes: int = 0,
        mirror: Mirror | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.near_full_bytes = int(max_bytes * near_full)
        self.reserve_bytes = reserve_bytes
        self.reserve_path = path.with_name(path.name + ".reserve")
        self.dropped = 0
        self.stalled = False
        self.changed = asyncio.Event()
        self._mirror = mirror
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[Event, str]] = []
        self._committer: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        # Disk state, written on the spool's thread after each database job.
        self._reserved = False
        self._disk_free = 0
        # Opening is start-up work, done once; waiting for it here keeps construction simple.
        count, size = self._executor.submit(self._open).result()
        self.count: int = count
        self.bytes: int = size
        if count:
            log.info("spool %s holds %d undelivered events (%d bytes)", path, count, size)
        if self.full:
            log.error("spool %s: no room on disk for its %d byte reserve", path, reserve_bytes)

    @property
    def full(self) -> bool:
        """Whether the disk is full: the reserve is given up (or could not be made)."""
        return self.stalled or (self.reserve_bytes > 0 and not self._reserved)

    @property
    def near_full(self) -> bool:
        """Whether new sessions must be refused to keep room for running ones."""
        return (
            self.full or self.bytes >= self.near_full_bytes or self._disk_free < self.reserve_bytes
        )

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
        """Return once every event appended so far is committed, or the spool is stalled
        (its events then wait in memory for the disk: see the module's doc)."""
        while self._committer is not None and not self._committer.done() and not self.stalled:
            self._progress.clear()
            # Not the committer itself: a caller that gives up must not cancel it.
            await self._progress.wait()

    async def oldest(self, limit: int, max_bytes: int) -> list[Spooled]:
        """Up to ``limit`` of the oldest events, at most ``max_bytes`` of JSON (at least one)."""
        return await self._run(self._select, limit, max_bytes)

    async def delete(self, batch: list[Spooled]) -> None:
        """Remove delivered events (and make the reserve again if it was given up)."""
        await self._run(self._delete, [item.seq for item in batch])
        self.count -= len(batch)
        self.bytes -= sum(item.size for item in batch)

    async def stop(self) -> None:
        """Stop committing in the background (a stalled spool's retries); :meth:`close` next."""
        if self._committer is not None and not self._committer.done():
            self._committer.cancel()  # its batch stays in _pending until committed
            await asyncio.wait([self._committer])

    def close(self) -> None:
        """Commit what is still pending, then close the database (blocks: for shutdown).

        Called after :meth:`stop` (or :meth:`flush`), from any thread.
        """
        pending, self._pending = self._pending, []
        if pending:
            # The single thread runs jobs in order: this lands after any running commit.
            try:
                self._executor.submit(self._insert_or_release, pending).result()
            except (sqlite3.Error, OSError) as e:
                log.error("spool %s: %d events lost at shutdown: %s", self.path, len(pending), e)
        self._executor.submit(self._close).result()
        self._executor.shutdown(wait=True)

    async def _commit_pending(self) -> None:
        """Commit pending events in batches until none are left (one task at a time).

        A batch leaves ``_pending`` only once it is committed, so none is ever lost here.
        """
        retry = RETRY_FIRST
        try:
            while self._pending:
                batch = self._pending[:COMMIT_EVENTS]
                try:
                    await self._run(self._insert_or_release, batch)
                except (sqlite3.Error, OSError) as e:
                    if not self.stalled:
                        log.error(
                            "spool %s: cannot commit %d events (kept, retrying): %s",
                            self.path, len(self._pending), e,
                        )  # fmt: skip
                    self.stalled = True
                    self._progress.set()
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, RETRY_MOST)
                    continue
                del self._pending[: len(batch)]
                if self.stalled:
                    log.warning("spool %s: committing again", self.path)
                self.stalled = False
                retry = RETRY_FIRST
                self._progress.set()
                self.changed.set()
        finally:
            self._progress.set()  # however it ends, no flush() waits on it for ever

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the spool's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # On the spool's thread.

    def _open(self) -> tuple[int, int]:
        """Open (and create) the database and the reserve; (events, bytes) it holds."""
        # isolation_level=None: transactions are ours, one fsync per commit.
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
        if LEGACY_COLUMN in columns:
            db.execute(f"ALTER TABLE events RENAME COLUMN {LEGACY_COLUMN} TO hf_event_id")
        self._db = db
        row = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(json)), 0) FROM events")
        count, size = row.fetchone()
        self._make_reserve()
        return int(count), int(size)

    def _make_reserve(self) -> None:
        """Hold ``reserve_bytes`` of disk in a file of our own, if there is room for it."""
        if self.reserve_bytes and not self._reserved:
            try:
                with self.reserve_path.open("wb") as f:
                    left = self.reserve_bytes
                    chunk = bytes(RESERVE_CHUNK)
                    while left > 0:  # written, not fallocated: tmpfs and overlayfs too
                        left -= f.write(chunk[: min(left, RESERVE_CHUNK)])
                    f.flush()
                    os.fsync(f.fileno())
                self._reserved = True
            except OSError:
                with contextlib.suppress(OSError):
                    self.reserve_path.unlink(missing_ok=True)
        self._measure()

    def _release_reserve(self) -> None:
        """Give the reserve up so that events can be committed into its room."""
        if self._reserved:
            log.error("spool %s: disk full, committing into the spool's reserve", self.path)
            self.reserve_path.unlink(missing_ok=True)
            self._reserved = False

    def _measure(self) -> None:
        """Note the room events have: free space on disk plus free pages in the database
        (delivered events free pages, which new ones reuse, not disk space)."""
        try:
            st = os.statvfs(self.path.parent)
            db = self._conn()
            pages = db.execute("PRAGMA freelist_count").fetchone()[0]
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
        except (OSError, sqlite3.Error):
            return
        self._disk_free = st.f_bavail * st.f_frsize + int(pages) * int(page_size)

    def _conn(self) -> sqlite3.Connection:
        """The open connection."""
        assert self._db is not None, "spool used after close()"
        return self._db

    def _insert_or_release(self, batch: list[tuple[Event, str]]) -> None:
        """Commit events; if that fails while the reserve is held, free it and try again."""
        try:
            self._insert(batch)
        except (sqlite3.Error, OSError):
            if not self._reserved:
                raise
            self._release_reserve()
            self._insert(batch)
        finally:
            self._measure()

    def _insert(self, batch: list[tuple[Event, str]]) -> None:
        """Write events in one transaction, then hand them to the mirror."""
        db = self._conn()
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT INTO events (hf_event_id, json) VALUES (?, ?)",
                [(event["hf_event_id"], text) for event, text in batch],
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (a full disk)
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
            out.append(Spooled(seq, *_current(json.loads(text), text), len(text)))
        return out

    def _delete(self, seqs: list[int]) -> None:
        """Delete rows in one transaction; then try to make the reserve again."""
        db = self._conn()
        db.execute("BEGIN")
        try:
            db.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq in seqs])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._make_reserve()

    def _close(self) -> None:
        """Close the connection."""
        if self._db is not None:
            self._db.close()
            self._db = None


def _current(event: Event, text: str) -> tuple[Event, str]:
    """An event as it is sent now; one spooled by an older sensor gets its ``hf_event_id``.

    Such an event's ``uuid`` was its delivery id, so it becomes the ``hf_event_id`` (the
    ``uuid`` stays: the sensor's identity is not known here).
    """
    if "hf_event_id" in event or not isinstance(event.get("uuid"), str):
        return event, text
    event["hf_event_id"] = event["uuid"]
    return event, to_json(event)
