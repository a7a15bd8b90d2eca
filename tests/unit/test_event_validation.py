"""The controller's checks of a received event's address (controller.events.validate)."""

from __future__ import annotations

import pytest

from controller.events.validate import to_row
from honeyfleet.errors import InvalidArgument
from honeyfleet.events import make_event, to_proto
from honeyfleet.v1 import ingest_pb2


def wire(src_ip: str) -> ingest_pb2.Event:
    """A command event from ``src_ip`` as the controller receives it."""
    event = make_event(
        "cowrie.command.input",
        "CMD: id",
        session="abcdef012345",
        src_ip=src_ip,
        sensor="edge1",
        sensor_uuid="edge1-uuid",
        protocol="ssh",
        input="id",
    )
    return to_proto(event)


def test_an_address_is_stored_in_its_canonical_spelling_every_time() -> None:
    for _ in range(3):  # the parsed address is remembered; its text must not change
        row, _ = to_row(wire("2001:DB8:0:0::7"), "edge1")
        assert row.src_ip == "2001:db8::7"


@pytest.mark.parametrize(
    ("src_ip", "problem"),
    [
        ("not-an-address", "is not an IP address"),
        ("fe80::1%eth0", "must not carry an IPv6 scope"),
    ],
)
def test_a_bad_address_is_refused_every_time(src_ip: str, problem: str) -> None:
    for _ in range(2):  # a refusal is never remembered as an answer
        with pytest.raises(InvalidArgument, match=problem):
            to_row(wire(src_ip), "edge1")
