"""The disk-diff worker's lines are checked before they become events."""

from __future__ import annotations

import json
import stat
from typing import Any

import pytest

from poolnode.diskdiff.records import (
    MAX_LINE,
    MAX_PATH,
    DiffSummary,
    GuestFile,
    WorkerError,
    WorkerOutputError,
    parse_line,
)

SHA = "ab" * 32


def line(**fields: Any) -> bytes:
    record = {
        "kind": "file",
        "path": "/tmp/.x",
        "filesystem": "",
        "change": "created",
        "size": 11,
        "mode": stat.S_IFREG | 0o755,
        "uid": 0,
        "gid": 0,
        "mtime_ns": 1_700_000_000_123_456_789,
        "ctime_ns": 1_700_000_000_123_456_789,
        "sha256": SHA,
        "stored": True,
    }
    record.update(fields)
    return json.dumps(record).encode()


def test_a_file_line_gives_cowrie_like_fields() -> None:
    record = parse_line(line())
    assert isinstance(record, GuestFile)
    fields = record.fields()
    assert fields["filename"] == "/tmp/.x"
    assert fields["shasum"] == SHA
    assert (fields["mode"], fields["change"], fields["stored"]) == ("0755", "created", True)
    assert fields["mtime"] == "2023-11-14T22:13:20.123457Z"


def test_summary_and_error_lines() -> None:
    done = parse_line(
        b'{"kind": "done", "filesystems": 1, "reported": 2, "created": 1, "changed": 1,'
        b' "deleted": 0, "other": 3, "stored_bytes": 19, "walk_cut": false}'
    )
    assert done == DiffSummary(1, 2, 1, 1, 0, 3, 19, False)
    assert parse_line(b'{"kind": "error", "message": "RuntimeError: no disk"}') == WorkerError(
        "RuntimeError: no disk"
    )


@pytest.mark.parametrize(
    "bad",
    [
        line(path="tmp/relative"),
        line(sha256="AB" * 32),
        line(sha256="ab" * 31),
        line(size=-1),
        line(size=2**63),
        line(size=True),
        line(uid="0"),
        line(mode=stat.S_IFLNK | 0o777),
        line(change="deleted"),
        line(stored="yes"),
        line(filesystem="../etc"),
        line(kind="shell"),
        b"[1, 2]",
        b"not json",
    ],
)
def test_malformed_lines_are_refused(bad: bytes) -> None:
    with pytest.raises(WorkerOutputError):
        parse_line(bad)


def test_bounds_on_lines_paths_and_times() -> None:
    with pytest.raises(WorkerOutputError):
        parse_line(b" " * (MAX_LINE + 1))
    long = parse_line(line(path="/" + "a" * (MAX_PATH * 2)))
    assert isinstance(long, GuestFile) and len(long.path) == MAX_PATH
    assert long.path.endswith("...")
    # A guest sets any time it likes: far past and far future still give valid timestamps.
    odd = parse_line(line(mtime_ns=-(2**62), ctime_ns=2**62))
    assert isinstance(odd, GuestFile)
    assert odd.fields()["mtime"].startswith("1970-01-01T")
    assert odd.fields()["ctime"].startswith("2116-")
