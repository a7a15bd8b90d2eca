"""What the disk-diff worker reports, parsed and checked before anything trusts it.

The worker's lines describe a hostile disk: every field is checked for type and bound
here, so a path of a megabyte or a size of -1 never reaches an event.
"""

from __future__ import annotations

import json
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from honeyfleet.events import TIMESTAMP_FORMAT

# Longest path kept in an event (Linux's PATH_MAX); longer ones are cut, marked "...".
MAX_PATH = 4096
# Longest worker line read: a file line is well under this even with MAX_PATH escaped.
MAX_LINE = 64 * 1024
SHA256 = re.compile(r"[0-9a-f]{64}")
LABEL = re.compile(r"(vd[a-z]{1,2}[0-9]{0,3})?")


class WorkerOutputError(ValueError):
    """A worker line that is not what the worker writes."""


@dataclass(frozen=True)
class GuestFile:
    """A regular file created or changed on a guest's disk."""

    path: str
    filesystem: str
    """The guest's device holding it ("vda1") when the disk has several, else ""."""
    created: bool
    """True if the base image had no such file; False if it had one that changed."""
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    sha256: str
    stored: bool
    """Whether the content was kept (within disk_diff_max_file_bytes and _total_bytes)."""

    def fields(self) -> dict[str, Any]:
        """The event fields (Cowrie's names where Cowrie has one: filename, shasum, size)."""
        return {
            "filename": self.path,
            "filesystem": self.filesystem,
            "change": "created" if self.created else "changed",
            "shasum": self.sha256,
            "size": self.size,
            "mode": f"{stat.S_IMODE(self.mode):04o}",
            "uid": self.uid,
            "gid": self.gid,
            "mtime": _timestamp(self.mtime_ns),
            "ctime": _timestamp(self.ctime_ns),
            "stored": self.stored,
        }


@dataclass(frozen=True)
class DiffSummary:
    """The worker's closing counts."""

    filesystems: int
    reported: int
    created: int
    changed: int
    deleted: int
    other: int
    """Entries other than regular files (directories, links...) created or changed."""
    stored_bytes: int
    walk_cut: bool
    """Whether a filesystem held more entries than the worker walks (MAX_ENTRIES)."""


@dataclass(frozen=True)
class WorkerError:
    """The worker's own account of why it failed."""

    message: str


Record = GuestFile | DiffSummary | WorkerError


def parse_line(line: bytes) -> Record:
    """One worker line as a record; WorkerOutputError if it is not a valid one."""
    if len(line) > MAX_LINE:
        raise WorkerOutputError(f"line of {len(line)} bytes")
    try:
        data = json.loads(line)
    except ValueError as e:
        raise WorkerOutputError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise WorkerOutputError("not an object")
    match data.get("kind"):
        case "file":
            return _file(data)
        case "done":
            return DiffSummary(
                filesystems=_count(data, "filesystems"),
                reported=_count(data, "reported"),
                created=_count(data, "created"),
                changed=_count(data, "changed"),
                deleted=_count(data, "deleted"),
                other=_count(data, "other"),
                stored_bytes=_count(data, "stored_bytes"),
                walk_cut=_flag(data, "walk_cut"),
            )
        case "error":
            return WorkerError(_text(data, "message")[:1000])
        case other:
            raise WorkerOutputError(f"unknown kind {str(other)[:40]!r}")


def _file(data: dict[str, Any]) -> GuestFile:
    path = _text(data, "path")
    if not path.startswith("/"):
        raise WorkerOutputError("path is not absolute")
    if len(path) > MAX_PATH:
        path = path[: MAX_PATH - 3] + "..."
    label = _text(data, "filesystem")
    if not LABEL.fullmatch(label):
        raise WorkerOutputError(f"filesystem {label[:20]!r}")
    shasum = _text(data, "sha256")
    if not SHA256.fullmatch(shasum):
        raise WorkerOutputError("sha256 is not 64 hex digits")
    change = data.get("change")
    if change not in ("created", "changed"):
        raise WorkerOutputError(f"change {str(change)[:20]!r}")
    mode = _count(data, "mode")
    if not stat.S_ISREG(mode):
        raise WorkerOutputError("not a regular file")
    return GuestFile(
        path=path,
        filesystem=label,
        created=change == "created",
        size=_count(data, "size"),
        mode=mode,
        uid=_count(data, "uid"),
        gid=_count(data, "gid"),
        mtime_ns=_count(data, "mtime_ns", signed=True),
        ctime_ns=_count(data, "ctime_ns", signed=True),
        sha256=shasum,
        stored=_flag(data, "stored"),
    )


def _count(data: dict[str, Any], key: str, *, signed: bool = False) -> int:
    value = data.get(key)
    if type(value) is not int or (value < 0 and not signed) or abs(value) >= 2**63:
        raise WorkerOutputError(f"{key} is not a {'' if signed else 'non-negative '}integer")
    return value


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key)
    if not isinstance(value, bool):
        raise WorkerOutputError(f"{key} is not true or false")
    return value


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise WorkerOutputError(f"{key} is not a string")
    return value


def _timestamp(ns: int) -> str:
    """A guest's file time in the events' format (clamped: a guest sets any time it likes)."""
    seconds = min(max(ns / 1e9, 0.0), 253402300799.0)  # 1970 .. 9999-12-31T23:59:59
    return datetime.fromtimestamp(seconds, UTC).strftime(TIMESTAMP_FORMAT)
