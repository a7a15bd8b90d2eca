"""Captured uploads: a file that cannot be written is given up without an exception."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path

import pytest

from sensor.capture import FileStore


async def test_a_full_disk_drops_the_capture_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(tmp_path, max_bytes=1_000_000)
    capture = store.begin(logging.getLogger("session-x"))
    capture.append(b"first")

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with caplog.at_level(logging.ERROR):
        capture.append(b"second")  # in a data callback: must not raise
        capture.append(b"third")
        capture.write_at(0, b"again")
    assert [r.name for r in caplog.records] == ["session-x"]
    assert "No space left" in caplog.records[0].getMessage()
    assert await capture.finish() is None
    assert not any((tmp_path / "incoming").iterdir())


async def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path, max_bytes=1_000_000)
    capture = store.begin()
    real = os.pwrite

    def short(fd: int, data: bytes, offset: int) -> int:
        return real(fd, bytes(data)[:3], offset)

    monkeypatch.setattr(os, "pwrite", short)
    capture.append(b"0123456789")
    capture.append(b"abc")
    monkeypatch.undo()
    stored = await capture.finish()
    assert stored is not None
    assert stored.path.read_bytes() == b"0123456789abc"
    assert stored.shasum == hashlib.sha256(b"0123456789abc").hexdigest()


async def test_a_capture_that_cannot_be_created_keeps_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(tmp_path, max_bytes=1_000_000)
    (tmp_path / "incoming").rmdir()
    (tmp_path / "incoming").write_bytes(b"")  # not a directory: creating a file fails
    with caplog.at_level(logging.ERROR):
        capture = store.begin()
        capture.append(b"data")
    assert len(caplog.records) == 1
    assert await capture.finish() is None
