"""Session recordings: bounded, held in memory until login, written off the loop, and an
I/O error ends the recording only."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from honeyfleet.spool import Spool
from sensor.artefacts import ArtefactReport, ArtefactWriter, DiskBudget
from sensor.events import EventLog, SessionEvents
from sensor.metrics import SensorMetrics
from sensor.recording import Recorder, Recordings


@dataclass
class Sensor:
    """A sensor's recordings over a real spool."""

    recordings: Recordings
    report: ArtefactReport
    metrics: SensorMetrics
    log: EventLog
    spool: Spool

    def start(self, *, held: bool = False) -> Recorder:
        """A new recording."""
        return self.recordings.start(
            "s1", self.report, width=80, height=24, term="xterm", held=held
        )

    async def eventids(self) -> list[str]:
        """Event ids committed so far."""
        await self.log.flush()
        return [item.event["eventid"] for item in await self.spool.oldest(1000, 1 << 30)]


PEER = ("192.0.2.1", 40000)
LOCAL = ("198.51.100.1", 22)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Any]:
    """Recordings with the bounds and budget of the test's choosing."""
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=100_000_000, near_full=0.9)
    metrics = SensorMetrics()
    log = EventLog(spool, metrics, sensor_uuid="sensor-uuid")
    writer = ArtefactWriter()
    made: list[Recordings] = []

    def make_(max_bytes: int = 1_000_000, held: int = 10_000, budget: int = 10_000_000) -> Sensor:
        recordings = Recordings(
            tmp_path / "tty", max_bytes=max_bytes, held_bytes=held,
            budget=DiskBudget(budget, 0, metrics), writer=writer,
        )  # fmt: skip
        made.append(recordings)
        events = SessionEvents(
            log, session="s1", peer=PEER, local=LOCAL, sensor="e", protocol="telnet"
        )
        return Sensor(recordings, ArtefactReport(events, metrics), metrics, log, spool)

    yield make_
    writer.close()
    await log.close()


async def test_past_its_bound_a_recording_only_hashes_input(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sensor = make(max_bytes=400)
    recorder = sensor.start()
    typed = b""
    while not recorder.truncated:
        recorder.output(b"o" * 50)
        recorder.input(b"i" * 10)
        typed += b"i" * 10
    encoded: list[Any] = []
    real_dumps = json.dumps
    monkeypatch.setattr(json, "dumps", lambda *a, **k: encoded.append(a) or real_dumps(*a, **k))
    for _ in range(100):
        recorder.output(b"more output")
        recorder.input(b"more input")
        recorder.resize(100, 30)
        typed += b"more input"
    monkeypatch.undo()
    assert encoded == []  # nothing is encoded only to be thrown away
    summary = await recorder.close()
    assert summary is not None
    assert summary.truncated and summary.size == recorder.path.stat().st_size <= 400
    assert summary.shasum == hashlib.sha256(typed).hexdigest()


async def test_a_held_recording_touches_no_disk_until_committed(make: Any) -> None:
    sensor = make(held=300)
    discarded = sensor.start(held=True)
    discarded.output(b"login: ")
    discarded.input(b"root\r\n" * 100)  # past the held bound: dropped, still hashed
    assert discarded.truncated
    assert await discarded.close() is None
    assert not discarded.path.exists()
    committed = sensor.start(held=True)
    committed.output(b"login: ")
    committed.input(b"root\r\n")
    assert not committed.path.exists()
    committed.commit()
    committed.output(b"# ")
    summary = await committed.close()
    assert summary is not None and not summary.truncated
    lines = [json.loads(line) for line in committed.path.read_text().splitlines()]
    assert [text for _, _, text in lines[1:]] == ["login: ", "root\r\n", "# "]
    assert summary.size == committed.path.stat().st_size


async def test_nul_output_takes_no_room(make: Any) -> None:
    sensor = make()
    recorder = sensor.start()
    for _ in range(100):
        recorder.output(bytes(10_000) + b"x")  # /dev/zero on a terminal shows nothing
    summary = await recorder.close()
    assert summary is not None and not summary.truncated
    assert summary.size < 10_000
    texts = [json.loads(line)[2] for line in recorder.path.read_text().splitlines()[1:]]
    assert "".join(texts) == "x" * 100


async def test_a_write_error_ends_the_recording_alone_and_says_so(make: Any) -> None:
    sensor = make()
    recorder = sensor.start()
    recorder.output(b"before\r\n")
    # The file cannot be written: a directory stands where it would be.
    recorder.path.mkdir(parents=True)
    for _ in range(100):
        recorder.output(b"x" * 1000)  # more than one batch: written while the session runs
    summary = await recorder.close()  # never raises
    assert summary is not None and summary.truncated and summary.size == 0
    assert (await sensor.eventids()).count("honeyfleet.artefact.failed") == 1
    registry = sensor.metrics.registry
    assert (
        registry.get_sample_value("honeyfleet_sensor_artefacts_failed_total", {"kind": "recording"})
        == 1
    )


async def test_the_artefact_budget_stops_a_recording(make: Any) -> None:
    sensor = make(budget=2_000)
    recorder = sensor.start()
    for _ in range(100):
        recorder.output(b"y" * 100)
    summary = await recorder.close()
    assert summary is not None and summary.truncated and summary.size <= 2_000
    assert (await sensor.eventids()).count("honeyfleet.artefact.budget") == 1
    # A held recording whose commit does not fit keeps nothing at all.
    held = sensor.start(held=True)
    held.output(b"z" * 100)
    held.commit()
    assert await held.close() is None
