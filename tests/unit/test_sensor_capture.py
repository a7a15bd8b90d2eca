"""Captured uploads: failures and the budget end the capture, never the caller."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from honeyfleet.spool import Spool
from sensor.artefacts import ArtefactReport, ArtefactWriter, DiskBudget
from sensor.capture import FileStore, SessionFiles
from sensor.events import EventLog, SessionEvents
from sensor.metrics import SensorMetrics
from sensor.ssh.scp import ScpObserver


@dataclass
class Session:
    """A session's capture side over a real spool, and what it wrote."""

    files: SessionFiles
    metrics: SensorMetrics
    events: EventLog
    spool: Spool

    async def written(self) -> list[dict[str, Any]]:
        """The events committed so far."""
        await self.events.flush()
        return [item.event for item in await self.spool.oldest(1000, 1 << 30)]


PEER = ("192.0.2.1", 40000)
LOCAL = ("198.51.100.1", 22)


@pytest.fixture
async def make_session(tmp_path: Path) -> AsyncIterator[Any]:
    """Sessions on one store, with the budget and open bound of the test's choosing."""
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=100_000_000, near_full=0.9)
    metrics = SensorMetrics()
    log = EventLog(spool, metrics, sensor_uuid="sensor-uuid")
    writer = ArtefactWriter()

    def make(budget: int = 10_000_000, max_open: int = 32) -> Session:
        store = FileStore(
            tmp_path / "downloads",
            max_bytes=1_000_000,
            max_open=max_open,
            budget=DiskBudget(budget, 0, metrics),
            writer=writer,
        )
        events = SessionEvents(
            log, session="s1", peer=PEER, local=LOCAL, sensor="e", protocol="ssh"
        )
        report = ArtefactReport(events, metrics)
        return Session(store.session(report, logging.getLogger("session-x")), metrics, log, spool)

    yield make
    writer.close()
    await log.flush()
    await log.close()


def incoming(session: Session) -> list[Path]:
    """Partial captures on disk."""
    return list((session.files.store.root / "incoming").iterdir())


async def test_a_full_disk_drops_the_capture_and_says_so_once(
    make_session: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    session = make_session()
    capture = session.files.begin()
    capture.append(b"first")

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with caplog.at_level(logging.ERROR):
        capture.append(b"second")  # in a data callback: must not raise
        capture.append(b"third")
        capture.write_at(0, b"again")
        assert await capture.finish() is None
    assert [r.name for r in caplog.records] == ["session-x"]
    assert "No space left" in caplog.records[0].getMessage()
    assert not incoming(session)
    (failed,) = [e for e in await session.written() if e["eventid"] != "cowrie.session.connect"]
    assert failed["eventid"] == "honeyfleet.artefact.failed"
    assert failed["reason"] == os.strerror(errno.ENOSPC) and failed["kind"] == "capture"
    assert session.files.open == 0


async def test_short_writes_are_completed(
    make_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = make_session()
    capture = session.files.begin()
    real = os.pwrite
    calls: list[int] = []

    def short(fd: int, data: bytes, offset: int) -> int:
        calls.append(offset)
        return real(fd, bytes(data)[:3], offset)

    monkeypatch.setattr(os, "pwrite", short)
    capture.append(b"0123456789")
    capture.append(b"abc")
    stored = await capture.finish()  # written on the artefact writer thread
    monkeypatch.undo()
    assert calls == [0, 3, 6, 9, 10]
    assert stored is not None
    assert stored.path.read_bytes() == b"0123456789abc"
    assert stored.shasum == hashlib.sha256(b"0123456789abc").hexdigest()


async def test_a_capture_that_cannot_be_created_keeps_nothing(
    make_session: Any, caplog: pytest.LogCaptureFixture
) -> None:
    session = make_session()
    root = session.files.store.root
    (root / "incoming").rmdir()
    (root / "incoming").write_bytes(b"")  # not a directory: creating a file fails
    with caplog.at_level(logging.ERROR):
        capture = session.files.begin()  # made on the writer thread: it fails there
        capture.append(b"data")
        assert await capture.finish() is None
    assert len(caplog.records) == 1
    assert session.files.open == 0


async def test_the_artefact_budget_ends_captures_and_is_said_once(make_session: Any) -> None:
    session = make_session(budget=1000)
    metrics = session.metrics.registry
    first = session.files.begin()
    first.append(b"x" * 950)
    assert (await first.finish()) is not None
    second = session.files.begin()
    second.append(b"y" * 30)
    second.append(b"y" * 30)  # past the budget: the capture ends here
    assert await second.finish() is None
    assert not incoming(session)
    # Spent budget: nothing new is even started.
    assert session.files.begin() is None
    assert metrics.get_sample_value("honeyfleet_sensor_artefact_bytes") == 950
    assert metrics.get_sample_value("honeyfleet_sensor_artefact_budget_reached") == 1
    said = [e for e in await session.written() if e["eventid"] == "honeyfleet.artefact.budget"]
    assert len(said) == 1
    assert (
        metrics.get_sample_value("honeyfleet_sensor_artefacts_refused_total", {"kind": "capture"})
        == 2  # one cut short, one never started
    )
    third = make_session(budget=1000)  # same store root, fresh budget
    dup = third.files.begin()
    dup.append(b"x" * 950)
    assert (await dup.finish()) is not None
    assert third.metrics.registry.get_sample_value("honeyfleet_sensor_artefact_bytes") == 0


async def test_a_session_holds_at_most_max_open_captures(make_session: Any) -> None:
    session = make_session(max_open=3)
    open_ = [session.files.begin() for _ in range(3)]
    assert all(c is not None for c in open_)
    assert session.files.begin() is None
    open_[0].abort()
    assert session.files.begin() is not None


async def test_an_scp_size_in_non_ascii_digits_stops_parsing_not_the_channel(
    make_session: Any,
) -> None:
    # "²".isdigit() is true but int("²") raises: the parser must not throw into the relay.
    session = make_session()
    files: list[str] = []
    scp = ScpObserver(session.files, lambda name, capture: files.append(name))
    scp.feed("C0644 ² evil\n".encode())
    scp.feed(b"C0644 3 good\nabc\0")
    assert files == []  # parsing stopped at the bad header; the relay is not ours to stop
    scp = ScpObserver(session.files, lambda name, capture: files.append(name))
    scp.feed(b"C0644 3 good\nabc\0")
    assert files == ["good"]
