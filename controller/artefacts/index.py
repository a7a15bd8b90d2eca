"""The artefact index: which content is stored and every reference to it, in SQLite.

Two tables: ``blobs`` (one row per stored sha256: size, first stored, last referenced)
and ``refs`` (one row per distinct upload of it: kind, session, name, source), so an
artefact uploaded in two sessions is stored once and listed under both. The index lives
next to the content it describes (``artefact_dir/index.sqlite3``): the two are changed
together (budget, retention) and must agree, which a remote event store could not
promise. Every method blocks: :class:`~controller.artefacts.store.ArtefactStore` runs
them on its one index thread.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    stored_us INTEGER NOT NULL,
    last_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_last ON blobs (last_us);
CREATE TABLE IF NOT EXISTS refs (
    id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL REFERENCES blobs (sha256) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    session TEXT NOT NULL,
    filename TEXT NOT NULL,
    source TEXT NOT NULL,
    capture_us INTEGER NOT NULL,
    stored_us INTEGER NOT NULL,
    UNIQUE (sha256, kind, session, filename, source)
);
CREATE INDEX IF NOT EXISTS refs_time ON refs (stored_us, id);
CREATE INDEX IF NOT EXISTS refs_session ON refs (session, stored_us, id);
"""
BUSY_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class Reference:
    """One upload of stored content."""

    sha256: str
    size: int
    kind: str
    session: str
    filename: str
    source: str
    capture_us: int
    stored_us: int
    id: int = 0
    """Index-assigned, increasing; breaks ties between equal times in listings."""


@dataclass(frozen=True)
class RefQuery:
    """Which references to list, newest first, before an optional position."""

    limit: int
    session: str = ""
    kind: str = ""
    sha256: str = ""
    start_us: int | None = None
    end_us: int | None = None
    before: tuple[int, int] | None = None
    """(stored time in microseconds, id) of the last reference of the previous page."""


@dataclass(frozen=True)
class Blob:
    """One stored content."""

    sha256: str
    size: int


class ArtefactIndex:
    """The index database (blocking; used from one thread)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def total_bytes(self) -> int:
        """Bytes of all stored content."""
        return int(self._db.execute("SELECT coalesce(sum(size), 0) FROM blobs").fetchone()[0])

    def blob(self, sha256: str) -> Blob | None:
        """The stored content of this hash, or None."""
        row = self._db.execute("SELECT sha256, size FROM blobs WHERE sha256 = ?", (sha256,))
        found = row.fetchone()
        return Blob(found[0], found[1]) if found else None

    def add_reference(self, ref: Reference, *, new_blob: bool) -> bool:
        """Record a reference (and, with ``new_blob``, its content) in one transaction.

        Without ``new_blob`` nothing is recorded unless the content is indexed already;
        returns whether it was.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if new_blob:
                db.execute(
                    "INSERT INTO blobs (sha256, size, stored_us, last_us) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (sha256) DO NOTHING",
                    (ref.sha256, ref.size, ref.stored_us, ref.stored_us),
                )
            touched = db.execute(
                "UPDATE blobs SET last_us = max(last_us, ?) WHERE sha256 = ?",
                (ref.stored_us, ref.sha256),
            ).rowcount
            if touched:
                db.execute(
                    "INSERT INTO refs (sha256, kind, session, filename, source, capture_us, "
                    "stored_us) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (
                        ref.sha256,
                        ref.kind,
                        ref.session,
                        ref.filename,
                        ref.source,
                        ref.capture_us,
                        ref.stored_us,
                    ),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return bool(touched)

    def references(self, query: RefQuery) -> list[Reference]:
        """A page of references, newest first."""
        terms: list[str] = []
        args: list[object] = []
        for column in ("session", "kind", "sha256"):
            value = getattr(query, column)
            if value:
                terms.append(f"r.{column} = ?")
                args.append(value)
        if query.start_us is not None:
            terms.append("r.stored_us >= ?")
            args.append(query.start_us)
        if query.end_us is not None:
            terms.append("r.stored_us < ?")
            args.append(query.end_us)
        if query.before is not None:
            terms.append("(r.stored_us, r.id) < (?, ?)")
            args.extend(query.before)
        where = " AND ".join(terms) or "1=1"
        # Only fixed column names go into the text; every value is a parameter.
        sql = (
            "SELECT r.sha256, b.size, r.kind, r.session, r.filename, r.source, "  # noqa: S608
            "r.capture_us, r.stored_us, r.id FROM refs r JOIN blobs b USING (sha256) "
            f"WHERE {where} ORDER BY r.stored_us DESC, r.id DESC LIMIT ?"
        )
        rows = self._db.execute(
            sql,
            (*args, query.limit),
        )
        return [Reference(*row) for row in rows]

    def oldest(self, limit: int, *, before_us: int | None = None) -> list[Blob]:
        """The least recently referenced content (only that older than ``before_us``)."""
        bound = "" if before_us is None else "WHERE last_us < ?"
        args = () if before_us is None else (before_us,)
        rows = self._db.execute(
            f"SELECT sha256, size FROM blobs {bound} ORDER BY last_us, sha256 LIMIT ?",  # noqa: S608
            (*args, limit),
        )
        return [Blob(*row) for row in rows]

    def remove(self, sha256: str) -> None:
        """Forget content and every reference to it."""
        self._db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha256,))
