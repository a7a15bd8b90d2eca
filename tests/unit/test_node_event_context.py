"""A pool node's events: which session each is tied to, and the bounds on its strings."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from honeyfleet.eventbounds import MAX_EVENT_STRING, json_size
from honeyfleet.eventlog import EventLog, SpoolMetrics
from honeyfleet.events import from_proto, to_proto
from honeyfleet.spool import Spool
from poolnode.events import NodeEvents
from poolnode.guest import LeaseHold


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """A real spool."""
    return Spool(tmp_path / "spool.sqlite3", max_bytes=100_000_000, near_full=0.9)


@pytest.fixture
async def events(spool: Spool) -> AsyncIterator[NodeEvents]:
    """A node's events over a real spool, remembering two guests' last sessions."""
    log = EventLog(spool, SpoolMetrics("t", CollectorRegistry()), instance_uuid="node-uuid")
    yield NodeEvents(log, pool_node="pool-1", remember=2)
    await log.flush()
    await log.close()


def hold(lease: str, session: str, src_ip: str = "192.0.2.1") -> LeaseHold:
    """A lease as the pool puts it on a guest."""
    return LeaseHold(lease, "sensor/edge1", src_ip, 0.0, session, "telnet")


def session_of(events: NodeEvents, guest: str | None) -> tuple[str, str | None]:
    """(session, lease) of an event about ``guest``."""
    event = events.emit(guest, "honeyfleet.test", "x")
    return event["session"], event.get("lease")


async def test_events_follow_the_guests_newest_lease_then_its_last(events: NodeEvents) -> None:
    assert session_of(events, "g1") == ("-", None)
    events.leased("g1", hold("L1", "s1"))
    event = events.emit("g1", "honeyfleet.test", "on {guest} for {src_ip}")
    assert {k: event[k] for k in ("session", "src_ip", "sensor", "protocol", "uuid")} == {
        "session": "s1",
        "src_ip": "192.0.2.1",
        "sensor": "edge1",
        "protocol": "telnet",
        "uuid": "node-uuid",
    }
    assert (event["guest"], event["pool_node"], event["lease"]) == ("g1", "pool-1", "L1")
    assert event["message"] == "on g1 for 192.0.2.1"
    # A shared guest: the newest lease's session; once it ends, the older live one's.
    events.leased("g1", hold("L2", "s2", "192.0.2.2"))
    assert session_of(events, "g1") == ("s2", "L2")
    events.released("g1", "L2", "session closed")
    assert session_of(events, "g1") == ("s1", "L1")
    # No live lease: the one that ended last names the session (a destroyed guest's disk).
    events.released("g1", "L1", "session closed")
    events.destroyed("g1", "unused_timeout", used=True)
    assert session_of(events, "g1") == ("s1", "L1")
    # Only the last ``remember`` guests are remembered.
    events.leased("g2", hold("L3", "s3"))
    events.leased("g3", hold("L4", "s4"))
    assert session_of(events, "g1") == ("-", None)
    assert session_of(events, "g3") == ("s4", "L4")
    assert session_of(events, None) == ("-", None)


async def test_lifecycle_events_say_what_ended_and_why(events: NodeEvents, spool: Spool) -> None:
    events.leased("g1", hold("L1", "s1"))
    events.released("g1", "L1", "the sensor released it")
    events.destroyed("g1", "health check: its VM is no longer running", used=True)
    events.destroyed("g2", "recycled", used=False)  # never used: no news
    await events.flush()
    written = [item.event for item in await spool.oldest(10, 1_000_000)]
    assert [(e["eventid"], e["session"], e["reason"]) for e in written] == [
        ("honeyfleet.guest.released", "s1", "the sensor released it"),
        ("honeyfleet.guest.destroyed", "s1", "health check: its VM is no longer running"),
    ]


async def test_attacker_strings_are_cut_to_the_bounds(events: NodeEvents) -> None:
    url = "http://x/" + "\x01" * 200_000
    event = events.emit(None, "cowrie.session.file_download", "Downloaded {url}", url=url)
    wire = from_proto(to_proto(event))
    assert url.startswith(wire["url"])
    assert 0 < json_size(wire["url"]) <= MAX_EVENT_STRING
    assert len(json.dumps(wire).encode()) < 256 * 1024
