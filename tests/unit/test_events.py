"""The event model and the JSON lines log."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from honeyfleet.errors import InvalidArgument
from honeyfleet.events import (
    decode,
    from_proto,
    make_event,
    new_event_id,
    new_session_id,
    parse_timestamp,
    to_proto,
)
from honeyfleet.jsonlines import JsonLinesLog
from honeyfleet.v1 import common_pb2

SENSOR_UUID = "6f1d0b5e-3c1a-4d2e-9f00-5a7b8c9d0e1f"


def login() -> dict[str, object]:
    return make_event(
        "cowrie.login.success",
        "login attempt [root/123456] succeeded",
        session=new_session_id(),
        src_ip="198.51.100.4",
        sensor="edge1",
        sensor_uuid=SENSOR_UUID,
        protocol="ssh",
        context={"pool_node": "n1", "guest": "", "lease": "L1"},
        username="root",
        password="123456",
    )


def test_event_round_trips_through_the_wire_verbatim() -> None:
    event = login()
    wire = to_proto(event)
    assert wire.protocol == common_pb2.PROTOCOL_SSH
    assert wire.time.ToDatetime().isoformat().startswith(event["timestamp"][:19])
    assert from_proto(wire) == event
    assert "guest" not in event  # empty context values are left out
    assert event["timestamp"].endswith("Z")
    parse_timestamp(event["timestamp"])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: setattr(w, "json", "not json"),
        lambda w: setattr(w, "json", "[1]"),
        lambda w: setattr(w, "json", json.dumps({"eventid": "x"})),
        lambda w: setattr(w, "hf_event_id", "another"),
        lambda w: setattr(w, "json", "x" * 300_000),
        # Under the limit in characters, over it in bytes.
        lambda w: setattr(w, "json", "\U0001f600" * 70_000),
        # Nesting deep enough to overflow the JSON parser's stack.
        lambda w: setattr(w, "json", "[" * 100_000 + "]" * 100_000),
    ],
)
def test_malformed_events_are_refused(mutate) -> None:
    wire = to_proto(login())
    mutate(wire)
    with pytest.raises(InvalidArgument):
        from_proto(wire)


@pytest.mark.parametrize("around", [(" ", ""), ("", "\n"), ("\t", " \r\n")])
def test_json_with_whitespace_around_it_is_accepted(around: tuple[str, str]) -> None:
    event = login()
    wire = to_proto(event)
    wire.json = around[0] + wire.json + around[1]
    assert from_proto(wire) == event


@pytest.mark.parametrize("after", ["{}", "]", ' "x"', "x"])
def test_json_followed_by_anything_but_whitespace_is_refused(after: str) -> None:
    wire = to_proto(login())
    wire.json += after
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        from_proto(wire)


def test_a_long_bad_timestamp_is_refused_without_being_quoted() -> None:
    event = login()
    event["timestamp"] = "9" * 100_000
    wire = to_proto(login())
    wire.json = json.dumps(event)
    with pytest.raises(InvalidArgument) as refused:
        from_proto(wire)
    assert len(str(refused.value)) < 200


def test_session_ids_are_unique() -> None:
    assert len({new_session_id() for _ in range(10_000)}) == 10_000


def test_event_ids_are_version_7_uuids_in_the_order_they_were_made() -> None:
    millisecond = 1_700_000_000_000_000_000
    same_moment = [new_event_id(millisecond) for _ in range(1000)]
    later = new_event_id(millisecond + 1_000_000)
    assert len(set(same_moment)) == 1000
    for text in [*same_moment, later]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical: stored and compared as sent
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    # Text order is time order, so the stores' unique index grows at one end.
    assert max(same_moment) < later
    assert uuid.UUID(str(login()["hf_event_id"])).version == 7


def test_json_lines_rotate_daily_and_prune(tmp_path: Path) -> None:
    path = tmp_path / "cowrie.json"
    ancient = tmp_path / "cowrie.json.2000-01-01"
    ancient.write_text("{}\n")
    log = JsonLinesLog(path, keep_days=2)
    log.write([login()])
    log.close()
    # Pretend the file was last written yesterday: the next write rotates it.
    yesterday = time.time() - 86400
    os.utime(path, (yesterday, yesterday))
    day = time.strftime("%Y-%m-%d", time.gmtime(yesterday))
    log.write([login(), login()])
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cowrie.json", f"cowrie.json.{day}"]
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["eventid"] == "cowrie.login.success"
    assert len((tmp_path / f"cowrie.json.{day}").read_text().splitlines()) == 1


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_decode_refuses_json_constants_anywhere_while_parsing(constant: str) -> None:
    event = login()
    wire = to_proto(event)
    wire.json = wire.json[:-1] + f',"deep":{{"x":[1,{constant}]}}}}'
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        decode(wire)


def test_decode_parses_the_time_once_in_every_spelling_strptime_takes() -> None:
    event = login()
    event["timestamp"] = "2026-03-01T10:00:00.5Z"  # fewer digits: the slow path
    wire = to_proto(event)
    assert decode(wire)[1] == datetime(2026, 3, 1, 10, 0, 0, 500_000, tzinfo=UTC)
    event["timestamp"] = "2026-03-01T10:00:00.000007Z"
    wire = to_proto(event)
    assert decode(wire)[:2] == (event, datetime(2026, 3, 1, 10, 0, 0, 7, tzinfo=UTC))


def test_a_spooled_text_goes_on_the_wire_as_is() -> None:
    event = login()
    text = json.dumps(event, indent=1)  # not how to_json spells it
    assert to_proto(event, text).json == text


def test_uuid_is_the_sensors_identity_and_hf_event_id_each_events_own() -> None:
    first, second = login(), login()
    # Cowrie's uuid: the sending sensor instance, the same on every event.
    assert first["uuid"] == second["uuid"] == SENSOR_UUID
    # Ours: a new delivery id per event, the one on the wire.
    assert first["hf_event_id"] != second["hf_event_id"]
    assert to_proto(first).hf_event_id == first["hf_event_id"]


@pytest.mark.parametrize(
    ("peer", "written"),
    [
        ("::ffff:198.51.100.4", "198.51.100.4"),
        ("::FFFF:198.51.100.4", "198.51.100.4"),
        ("0:0:0:0:0:ffff:198.51.100.4", "198.51.100.4"),
        ("2001:db8::4", "2001:db8::4"),
        ("::1", "::1"),
        ("198.51.100.4", "198.51.100.4"),
    ],
)
def test_mapped_ipv4_src_ip_is_written_as_plain_ipv4(peer: str, written: str) -> None:
    event = make_event(
        "cowrie.session.connect", "x", session="s", src_ip=peer, sensor="e",
        sensor_uuid=SENSOR_UUID, protocol="ssh",
    )  # fmt: skip
    assert event["src_ip"] == written
