"""Session events: attacker strings of any length still make an event the controller takes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from honeyfleet.events import MAX_EVENT_JSON, from_proto, to_proto
from sensor.events import MAX_EVENT_STRING, EventLog, SessionEvents, json_size
from sensor.metrics import SensorMetrics
from sensor.spool import Spool


@pytest.fixture
async def events(tmp_path: Path) -> AsyncIterator[SessionEvents]:
    """One session's emitter over a real spool."""
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=100_000_000, near_full=0.9)
    log = EventLog(spool, SensorMetrics())
    yield SessionEvents(log, session="s1", src_ip="192.0.2.1", sensor="edge1", protocol="ssh")
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
        "cowrie.login.failed",
        "login attempt [{username}/{password}] failed",
        username=password,
        password=password,
    )
    wire = accepted(event)
    for value in (wire["username"], wire["password"], wire["message"]):
        assert 0 < json_size(value) <= MAX_EVENT_STRING
    assert password.startswith(wire["password"])
    assert wire["message"].startswith("login attempt [")
    # Plain text keeps (nearly) all of its share of the bound.
    if password[0] == "A":
        assert len(wire["password"]) == MAX_EVENT_STRING


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
    wire = accepted(event)
    assert all(wire[name] for name in fields)
    assert wire["names"] == names[: len(wire["names"])] and wire["names"]
