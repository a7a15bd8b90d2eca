"""The outbox's storage: what waits for upload, on local disk (blocking; one thread).

``directory/queue.sqlite3`` (WAL, ``synchronous=FULL``) holds one row per artefact to
upload (its sha256, size, kind, session, name, capture time); ``directory/content/<sha256>``
holds its bytes, once per sha256 however many rows name it. Content is hard-linked from
where the role keeps it (no copy, no second write) and copied only where a link is
impossible (another filesystem). A row is committed only after its content is in place
and its directory synced, and content is removed only after its last row, so a crash
leaves at worst content without a row, which :meth:`OutboxQueue.open` removes.

Bounds: ``max_bytes`` of distinct content and ``max_items`` rows; an artefact that does
not fit is refused (:class:`Queued`), never waited for.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS artefacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    session TEXT NOT NULL,
    filename TEXT NOT NULL,
    capture_us INTEGER NOT NULL,
    UNIQUE (sha256, kind, session, filename)
);
CREATE INDEX IF NOT EXISTS artefacts_sha ON artefacts (sha256);
"""


@dataclass(frozen=True)
class Item:
    """One artefact waiting for upload."""

    sha256: str
    size: int
    kind: int
    """An ``artefact_pb2.ArtefactKind`` value."""
    session: str
    filename: str
    capture_us: int
    id: int = 0
    """Queue position, assigned when queued."""


class Queued(Enum):
    """What became of an artefact handed to the outbox."""

    QUEUED = "queued"
    ALREADY_QUEUED = "already_queued"
    """The same artefact (content, kind, session, name) waits already."""
    OVER_BYTES = "over_bytes"
    OVER_ITEMS = "over_items"

    @property
    def accepted(self) -> bool:
        """Whether the artefact will be uploaded."""
        return self in (Queued.QUEUED, Queued.ALREADY_QUEUED)


class OutboxQueue:
    """The rows and the content directory; every method blocks (use one thread)."""

    def __init__(self, directory: Path, *, max_bytes: int, max_items: int) -> None:
        self.directory = directory
        self.content = directory / "content"
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.items = 0
        self.bytes = 0
        self._db: sqlite3.Connection | None = None

    def open(self) -> list[Path]:
        """Open (or create) the queue; removes content no row names (returns what it removed)."""
        self.content.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.directory / "queue.sqlite3", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        self._db = db
        named = {row[0] for row in db.execute("SELECT DISTINCT sha256 FROM artefacts")}
        orphans = [p for p in self.content.iterdir() if p.name not in named]
        for path in orphans:  # a crash between placing content and committing its row
            path.unlink(missing_ok=True)
        self._count()
        return orphans

    def close(self) -> None:
        """Close the database."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def path(self, sha256: str) -> Path:
        """Where the content of ``sha256`` waits."""
        return self.content / sha256

    def put(self, source: Path, item: Item) -> Queued:
        """Queue ``item`` with the content at ``source`` (which must hash to its sha256)."""
        db = self._conn()
        if db.execute(
            "SELECT 1 FROM artefacts WHERE sha256 = ? AND kind = ? AND session = ? "
            "AND filename = ?",
            (item.sha256, item.kind, item.session, item.filename),
        ).fetchone():
            return Queued.ALREADY_QUEUED
        if self.items >= self.max_items:
            return Queued.OVER_ITEMS
        new_content = not self.path(item.sha256).exists()
        if new_content:
            if self.bytes + item.size > self.max_bytes:
                return Queued.OVER_BYTES
            self._place(source, item.sha256)
        db.execute(
            "INSERT INTO artefacts (sha256, size, kind, session, filename, capture_us) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (item.sha256, item.size, item.kind, item.session, item.filename, item.capture_us),
        )
        self.items += 1
        if new_content:
            self.bytes += item.size
        return Queued.QUEUED

    def oldest(self) -> Item | None:
        """The artefact queued first, or None."""
        row = self._conn().execute(
            "SELECT sha256, size, kind, session, filename, capture_us, id FROM artefacts "
            "ORDER BY id LIMIT 1"
        )
        found = row.fetchone()
        return Item(*found) if found else None

    def remove(self, item: Item) -> None:
        """Forget a delivered (or refused) artefact; its content goes with its last row."""
        db = self._conn()
        if not db.execute("DELETE FROM artefacts WHERE id = ?", (item.id,)).rowcount:
            return
        self.items -= 1
        if not db.execute("SELECT 1 FROM artefacts WHERE sha256 = ?", (item.sha256,)).fetchone():
            self.path(item.sha256).unlink(missing_ok=True)
            self.bytes -= item.size

    def _place(self, source: Path, sha256: str) -> None:
        """Put content in place: a hard link, or a synced copy across filesystems."""
        final = self.path(sha256)
        try:
            os.link(source, final)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            temp = final.with_name(f".{sha256}.part")
            try:
                with source.open("rb") as src, temp.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1024 * 1024)
                    dst.flush()
                    os.fsync(dst.fileno())
                temp.rename(final)
            finally:
                with contextlib.suppress(OSError):
                    temp.unlink(missing_ok=True)
        fd = os.open(self.content, os.O_RDONLY)
        try:
            os.fsync(fd)  # the link (or rename) survives a crash before the row does
        finally:
            os.close(fd)

    def _count(self) -> None:
        """Count rows and distinct content."""
        db = self._conn()
        self.items = int(db.execute("SELECT count(*) FROM artefacts").fetchone()[0])
        self.bytes = int(
            db.execute(
                "SELECT coalesce(sum(size), 0) FROM "
                "(SELECT sha256, max(size) AS size FROM artefacts GROUP BY sha256)"
            ).fetchone()[0]
        )

    def _conn(self) -> sqlite3.Connection:
        """The open connection."""
        assert self._db is not None, "outbox queue used before open() or after close()"
        return self._db
