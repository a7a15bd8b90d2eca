"""The revocation list: certificate serials that servers must refuse.

On disk it is a JSON object keyed by lowercase hex serial::

    {"1f3a...": {"reason": "host decommissioned", "revoked_at": "2025-01-02T03:04:05+00:00"}}

The CA's copy lives in ``<ca dir>/revoked.json``; servers are given a copy (or the same
path) and call ``refresh()`` periodically, which costs one ``fstat`` unless the file changed.
Writes are atomic (temp file + rename), so a reader sees the old or the new list, never half.

Failure policy: constructing a ``RevocationList`` over a corrupt file raises
RevocationError, so a server refuses to start rather than run with no revocations. Once
running, a corrupt file seen by ``refresh()`` is logged and ignored and the previous set
stays in force, so a bad hand edit cannot take the fleet down or silently un-revoke anyone.
A missing file is an empty list.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

from honeyfleet.pki.errors import RevocationError
from honeyfleet.pki.files import PRIVATE_FILE_MODE, write_private

__all__ = ["Revocation", "RevocationList"]

logger = logging.getLogger(__name__)

_SERIAL_RE = re.compile(r"[0-9a-f]{1,40}")
_MAX_REASON = 200

# What identifies one version of the file: a rename gives a new inode, an in-place edit a
# new size or timestamps.
_Stamp = tuple[int, int, int, int]


@dataclass(frozen=True)
class Revocation:
    """One revoked serial's record."""

    reason: str
    """Free text from the operator, whitespace-normalised."""
    revoked_at: datetime
    """When it was revoked (UTC)."""


class RevocationList:
    """A cached view of a revocation list file that can be cheaply refreshed and updated."""

    def __init__(self, path: Path) -> None:
        """Load ``path`` (missing means empty); RevocationError if it exists but is corrupt."""
        self._path = path
        self._lock = threading.Lock()
        stamp, entries = _read_file(path)
        self._stamp: _Stamp | None = stamp
        self._entries: Mapping[int, Revocation] = MappingProxyType(entries)
        self._serials = frozenset(entries)

    @property
    def path(self) -> Path:
        """The JSON file backing this list."""
        return self._path

    def is_revoked(self, serial: int) -> bool:
        """Return True if ``serial`` is in the list as of the last load or refresh."""
        return serial in self._serials

    def serials(self) -> frozenset[int]:
        """All revoked serials as of the last load or refresh."""
        return self._serials

    def entries(self) -> Mapping[int, Revocation]:
        """Revoked serials with their reason and time (read-only)."""
        return self._entries

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; return True if the set changed.

        Never raises for a corrupt or unreadable file: it logs a warning naming the file and
        keeps the previous set.
        """
        with self._lock:
            try:
                # The cheap path servers hit every second: one stat, nothing read.
                if _stat_stamp(self._path) == self._stamp:
                    return False
                stamp, entries = _read_file(self._path)
            except (RevocationError, OSError) as exc:
                # Remember the bad version's stamp so we warn once per change, not per call.
                with contextlib.suppress(OSError):
                    self._stamp = _stat_stamp(self._path)
                logger.warning(
                    "ignoring unreadable revocation list %s (%s); still refusing the %d serials "
                    "loaded before - fix the file or rewrite it with `honeyfleet pki revoke`",
                    self._path,
                    exc,
                    len(self._serials),
                )
                return False
            self._stamp = stamp
            changed = frozenset(entries) != self._serials
            self._entries = MappingProxyType(entries)
            self._serials = frozenset(entries)
            return changed

    def revoke(self, serial: int, reason: str = "unspecified") -> bool:
        """Add ``serial`` to the file atomically; return False if it was already revoked.

        Re-reads the file under an exclusive lock first, so concurrent revocations (CLI and
        controller) are both kept. Raises RevocationError if the file is corrupt, rather than
        overwrite revocations it cannot read.
        """
        if isinstance(serial, bool) or not isinstance(serial, int) or serial <= 0:
            raise RevocationError(f"serial {serial!r} is invalid: use a positive integer")
        reason = " ".join(reason.split()) or "unspecified"
        if len(reason) > _MAX_REASON:
            raise RevocationError(f"revocation reason is longer than {_MAX_REASON} characters")
        with self._lock, _file_lock(self._path):
            _, current = _read_file(self._path)
            added = serial not in current
            if added:
                current[serial] = Revocation(reason, datetime.now(UTC))
                write_private(self._path, _serialize(current), overwrite=True)
            self._stamp = _stat_stamp(self._path)
            self._entries = MappingProxyType(current)
            self._serials = frozenset(current)
        if added:
            logger.info("revoked serial %x (%s) in %s", serial, reason, self._path)
        return added


def _read_file(path: Path) -> tuple[_Stamp | None, dict[int, Revocation]]:
    """Read and parse ``path``; a missing file is an empty list with no stamp.

    Statting the open descriptor ties the stamp to exactly the bytes read, even if the file
    is replaced meanwhile (the next refresh then sees a new stamp and reads again).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None, {}
    with os.fdopen(fd, "rb") as f:
        stamp = _stamp_of(os.fstat(f.fileno()))
        data = f.read()
    return stamp, _parse(data, path)


def _stamp_of(st: os.stat_result) -> _Stamp:
    """Version identity of a file from its stat result."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stat_stamp(path: Path) -> _Stamp | None:
    """Stamp of ``path``, or None if it does not exist."""
    try:
        return _stamp_of(path.stat())
    except FileNotFoundError:
        return None


def _parse(data: bytes, path: Path) -> dict[int, Revocation]:
    """Parse revocation JSON strictly; RevocationError naming the file and the problem."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RevocationError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise RevocationError(f"{path} must hold a JSON object keyed by hex serial")
    result: dict[int, Revocation] = {}
    for key, value in raw.items():
        # int(x, 16) would also accept "0x", "_" and spaces; require plain hex.
        if _SERIAL_RE.fullmatch(key.lower()) is None:
            raise RevocationError(f"{path}: key {key!r} is not a hex certificate serial")
        if not isinstance(value, dict):
            raise RevocationError(f"{path}: entry {key!r} must be an object")
        reason, revoked_at = value.get("reason"), value.get("revoked_at")
        if not isinstance(reason, str) or not isinstance(revoked_at, str):
            raise RevocationError(f"{path}: entry {key!r} needs string reason and revoked_at")
        try:
            when = datetime.fromisoformat(revoked_at)
        except ValueError:
            raise RevocationError(
                f"{path}: entry {key!r} has a bad revoked_at {revoked_at!r}"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        result[int(key, 16)] = Revocation(reason, when)
    return result


def _serialize(entries: Mapping[int, Revocation]) -> bytes:
    """Render entries as stable, human-readable JSON."""
    obj = {
        f"{serial:x}": {"reason": r.reason, "revoked_at": r.revoked_at.isoformat()}
        for serial, r in sorted(entries.items())
    }
    return (json.dumps(obj, indent=2) + "\n").encode()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``<path>.lock`` (a separate file, since writes rename)."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
