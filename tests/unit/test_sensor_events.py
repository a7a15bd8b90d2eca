"""Session events: attacker strings of any length still make an event the controller takes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from honeyfleet.eventbounds import FIELD_LIMITS, MAX_EVENT_STRING, json_size
from honeyfleet.events import MAX_EVENT_JSON, Event, from_proto, to_proto
from honeyfleet.spool import Spool
from sensor.eventbudget import SUMMARY, EventBudget, EventLimits
from sensor.events import EventLog, SessionEvents
from sensor.metrics import SensorMetrics

PEER = ("192.0.2.1", 40000)
LOCAL = ("198.51.100.1", 22)


@pytest.fixture
async def events(tmp_path: Path) -> AsyncIterator[SessionEvents]:
    """One session's emitter over a real spool."""
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=100_000_000, near_full=0.9)
    log = EventLog(spool, SensorMetrics(), sensor_uuid="sensor-uuid")
    yield SessionEvents(log, session="s1", peer=PEER, local=LOCAL, sensor="edge1", protocol="ssh")
    await log.flush()
    await log.close()


def accepted(event: dict[str, Any]) -> dict[str, Any]:
    """The event as the controller reads it off the wire (raises if it would refuse it)."""
    parsed = from_proto(to_proto(event))
    assert len(json.dumps(parsed, ensure_ascii=False).encode()) <= MAX_EVENT_JSON
    return parsed


# Plain, escaped (6 bytes as JSON), multi-byte, and a mix: all far over the bound.
LONG = [
    "A" * 200_000,
    "\x01" * 200_000,
    "\U0001f600" * 100_000,
    ('a\x01é"\\\U0001f600\n' * 40_000),
]


@pytest.mark.parametrize("password", LONG)
async def test_long_attacker_strings_are_cut_to_a_prefix(
    events: SessionEvents, password: str
) -> None:
    event = events.emit(
        "cowrie.command.input", "CMD: {input} {name}", input=password, name=password
    )
    assert event is not None
    wire = accepted(event)
    for value in (wire["input"], wire["name"], wire["message"]):
        assert 0 < json_size(value) <= MAX_EVENT_STRING
    assert password.startswith(wire["input"])
    assert wire["message"].startswith("CMD: ")
    # Plain text keeps (nearly) all of its share of the bound.
    if password[0] == "A":
        assert len(wire["input"]) == MAX_EVENT_STRING


@pytest.mark.parametrize("password", LONG)
async def test_credentials_and_host_names_are_cut_shorter(
    events: SessionEvents, password: str
) -> None:
    event = events.emit(
        "cowrie.login.failed",
        "login attempt [{username}/{password}] failed",
        username=password,
        password=password,
    )
    assert event is not None
    wire = accepted(event)
    assert 0 < json_size(wire["password"]) <= FIELD_LIMITS["password"]
    assert password.startswith(wire["password"]) and password.startswith(wire["username"])
    assert len(wire["message"].encode()) < 3 * 1024
    request = events.emit(
        "cowrie.direct-tcpip.request",
        "direct-tcp connection request to {dst_ip}:{dst_port} from {orig_ip}:{src_port}",
        dst_ip=password, dst_port=80, src_port=1, message_args={"orig_ip": password},
    )  # fmt: skip
    assert request is not None
    assert json_size(accepted(request)["dst_ip"]) <= FIELD_LIMITS["dst_ip"]
    assert len(request["message"].encode()) < 1024


async def test_short_strings_and_other_values_are_kept_as_they_are(
    events: SessionEvents,
) -> None:
    event = events.emit(
        "cowrie.client.kex",
        "SSH client hassh fingerprint: {hassh}",
        hassh="abc",
        kexAlgs=["curve25519-sha256", "diffie-hellman-group14-sha256"],
        size=3,
    )
    assert event is not None
    assert event["message"] == "SSH client hassh fingerprint: abc"
    assert event["kexAlgs"] == ["curve25519-sha256", "diffie-hellman-group14-sha256"]
    assert (event["hassh"], event["size"]) == ("abc", 3)


async def test_many_long_fields_share_the_bound(events: SessionEvents) -> None:
    fields = {f"field{n}": "x" * 100_000 for n in range(8)}
    names = [f"name{n}" for n in range(50_000)]  # a long list of strings
    event = events.emit(
        "cowrie.client.kex", "{field0} {orig}", message_args={"orig": "y" * 300_000},
        names=names, **fields,
    )  # fmt: skip
    assert event is not None
    wire = accepted(event)
    assert all(wire[name] for name in fields)
    assert wire["names"] == names[: len(wire["names"])] and wire["names"]


class Clock:
    """A clock the test moves (no waiting on real time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def written(spool: Spool) -> list[dict[str, Any]]:
    """The events committed so far."""
    await spool.flush()
    return [item.event for item in await spool.oldest(100_000, 1 << 30)]


@pytest.fixture
async def budgeted(tmp_path: Path) -> AsyncIterator[tuple[EventLog, Clock, SensorMetrics]]:
    """An event log with a small budget and a clock of the test's own."""
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=100_000_000, near_full=0.9)
    metrics = SensorMetrics()
    clock = Clock()
    limits = EventLimits(
        session_max_events=50,
        session_events_per_minute=20,
        source_max_events=30,
        source_events_per_minute=6,
    )
    log = EventLog(spool, metrics, EventBudget(limits, metrics, clock), sensor_uuid="sensor-uuid")
    yield log, clock, metrics
    await log.close()


def command(events: SessionEvents, n: int) -> Event | None:
    """One attacker-driven event."""
    return events.emit("cowrie.command.input", "CMD: {input}", input=str(n))


async def test_a_session_past_its_rate_writes_one_summary_then_nothing_until_refilled(
    budgeted: tuple[EventLog, Clock, SensorMetrics],
) -> None:
    log, clock, metrics = budgeted
    events = SessionEvents(
        log, session="s1", peer=("192.0.2.1", 40000), local=LOCAL, sensor="e", protocol="ssh"
    )
    kept = [n for n in range(100) if command(events, n) is not None]
    assert kept == list(range(20))  # a minute's worth at once
    clock.now += 30  # half a minute: ten more
    kept = [n for n in range(100) if command(events, n) is not None]
    assert len(kept) == 10
    events.emit_closed(None, 1.0, "done")  # the frame of the session is never refused
    ids = [e["eventid"] for e in await written(log.spool)]
    assert ids.count("cowrie.command.input") == 30
    (summary,) = [e for e in await written(log.spool) if e["eventid"] == SUMMARY]
    assert summary["budget"] == "session_rate" and summary["first_lost"] == "cowrie.command.input"
    (closed,) = [e for e in await written(log.spool) if e["eventid"] == "cowrie.session.closed"]
    assert closed["events_suppressed"] == 170
    assert (
        metrics.registry.get_sample_value(
            "honeyfleet_sensor_events_over_budget_total", {"budget": "session_rate"}
        )
        == 170
    )


async def test_a_session_total_and_a_source_across_sessions_are_bounded(
    budgeted: tuple[EventLog, Clock, SensorMetrics],
) -> None:
    log, clock, _ = budgeted
    first = SessionEvents(
        log, session="s1", peer=("192.0.2.1", 40000), local=LOCAL, sensor="e", protocol="ssh"
    )
    second = SessionEvents(
        log, session="s2", peer=("192.0.2.1", 40000), local=LOCAL, sensor="e", protocol="ssh"
    )
    other = SessionEvents(
        log, session="s3", peer=("192.0.2.9", 40000), local=LOCAL, sensor="e", protocol="ssh"
    )
    assert sum(command(first, n) is not None for n in range(20)) == 20
    # The address has 10 of its 30 left, whatever the session.
    assert sum(command(second, n) is not None for n in range(20)) == 10
    # Another address is not affected.
    assert sum(command(other, n) is not None for n in range(20)) == 20
    # Over time a session runs into its total even where its rate would allow more.
    for _ in range(10):
        clock.now += 600
        for n in range(20):
            command(other, n)
    summaries = [e for e in await written(log.spool) if e["eventid"] == SUMMARY]
    assert {(e["session"], e["budget"]) for e in summaries} == {
        ("s2", "source"),
        ("s3", "session_total"),
    }
    assert (
        sum(
            e["session"] == "s3" and e["eventid"] == "cowrie.command.input"
            for e in await written(log.spool)
        )
        == 50
    )


async def test_every_event_carries_the_connections_ends_and_the_sensors_uuid(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=100_000_000, near_full=0.9)
    log = EventLog(spool, SensorMetrics(), sensor_uuid="sensor-uuid")
    events = SessionEvents(
        log, session="s1", peer=("::ffff:192.0.2.1", 40000), local=("::ffff:198.51.100.1", 22),
        sensor="edge1", protocol="ssh",
    )  # fmt: skip
    version = events.emit("cowrie.client.version", "Remote SSH version: {version}", version="v")
    forward = events.emit(
        "cowrie.direct-tcpip.request",
        "direct-tcp connection request to {dst_ip}:{dst_port} from {orig_ip}:{orig_port}",
        dst_ip="10.9.9.9", dst_port=80, orig_ip="127.0.0.1", orig_port=5555,
    )  # fmt: skip
    await log.flush()
    await log.close()
    assert {k: version[k] for k in ("src_ip", "src_port", "dst_ip", "dst_port", "uuid")} == {
        "src_ip": "192.0.2.1",
        "src_port": 40000,
        "dst_ip": "198.51.100.1",
        "dst_port": 22,
        "uuid": "sensor-uuid",
    }
    # An event's own destination wins over the connection's (as in Cowrie).
    assert (forward["dst_ip"], forward["dst_port"], forward["src_port"]) == ("10.9.9.9", 80, 40000)
    assert forward["message"] == "direct-tcp connection request to 10.9.9.9:80 from 127.0.0.1:5555"


async def test_closing_events_use_cowrie_3_1_durations(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=100_000_000, near_full=0.9)
    log = EventLog(spool, SensorMetrics(), sensor_uuid="sensor-uuid")
    events = SessionEvents(
        log, session="s1", peer=PEER, local=LOCAL, sensor="edge1", protocol="ssh"
    )
    events.emit_closed(None, 2.3456, "client closed")
    await log.flush()
    closed = (await spool.oldest(10, 1 << 20))[-1].event
    await log.close()
    assert closed["message"] == "Connection lost after 2346 milliseconds"
    assert (closed["duration_ms"], closed["duration"]) == (2346, 2.3)
