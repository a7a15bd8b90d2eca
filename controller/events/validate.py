"""Turning a received wire event into a row the stores can always write.

:func:`honeyfleet.events.from_proto` checks the event model; this adds what the stores
need so that one event can never fail a whole transaction: short printable ids for the
indexed columns, a real IP address, strict JSON (no NaN or Infinity, no unpaired
surrogates, which SQLite's and PostgreSQL's JSON functions reject). It also enforces the
sender's identity: the ``sensor`` field of a sensor's event becomes the name in the
caller's certificate (a pool node's events: :mod:`controller.events.origin`).

Each event's JSON and timestamp are parsed once (:func:`honeyfleet.events.decode`, which
also refuses NaN and Infinity while parsing); this module only checks the parsed values.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import uuid
from datetime import UTC, datetime, timedelta

from controller.events.rows import EventRow
from honeyfleet.errors import InvalidArgument
from honeyfleet.events import CANONICAL_UUID, decode, to_json
from honeyfleet.v1 import ingest_pb2

# Indexed id columns: 1-128 printable ASCII characters, no spaces (Cowrie's are hex
# session ids and dotted event ids). Long keys would overflow index entries.
TOKEN = re.compile(r"[\x21-\x7e]{1,128}")
TOKENS = re.compile(r"[\x21-\x7e]{1,128} [\x21-\x7e]{1,128} [\x21-\x7e]{1,128}")
# A cheap pre-check on the raw text (only escapes can make surrogates); a hit pays
# for the exact check.
SURROGATE_HINT = re.compile(r"\\u[dD][89a-fA-F]")
SURROGATE = re.compile("[\ud800-\udfff]")
# How far ahead of the controller's clock an event may be (sensor clock skew). Further
# ahead is a broken or lying sensor: PostgreSQL would create a partition for that day,
# which retention never drops.
MAX_FUTURE = timedelta(days=1)


def to_row(
    message: ingest_pb2.Event, sensor: str | None, *, now: datetime | None = None
) -> tuple[EventRow, bool]:
    """A storable row from a wire event sent by ``sensor``, and whether its sensor was wrong.

    Raises InvalidArgument, naming the event and the problem, if it cannot be stored.
    ``now`` is the controller's time (default: the clock), for the future-time check.
    ``sensor`` None keeps the event's own: its sender is a pool node, whose events
    :mod:`controller.events.origin` places on their sessions.
    """
    event, moment, upgraded = decode(message)
    if moment > (now or datetime.now(UTC)) + MAX_FUTURE:
        raise InvalidArgument(
            f"event {event['hf_event_id']}: timestamp {event['timestamp']} is more than "
            f"{MAX_FUTURE.days} day ahead of the controller's clock (check the sensor's clock)"
        )
    eventid, session, protocol = event["eventid"], event["session"], event["protocol"]
    # One match over the three (a space cannot occur in a token) before one per field.
    if not TOKENS.fullmatch(f"{eventid} {session} {protocol}"):
        for key in ("eventid", "session", "protocol"):
            if not TOKEN.fullmatch(event[key]):
                raise InvalidArgument(
                    f"event {event['hf_event_id']}: {key} must be 1-128 printable ASCII "
                    "characters without spaces"
                )
    try:
        address = _address(event["src_ip"])
    except ValueError as e:
        raise InvalidArgument(f"event {event['hf_event_id']}: {e}") from None
    text = message.json
    if SURROGATE_HINT.search(text) and _has_surrogate(event):
        raise InvalidArgument(
            f"event {event['hf_event_id']}: contains an unpaired UTF-16 surrogate escape"
        )
    if sensor is None:
        sensor = event["sensor"]
    rewritten = event["sensor"] != sensor
    if rewritten:
        event["sensor"] = sensor
    if rewritten or upgraded:
        text = to_json(event)
    row = EventRow(
        hf_event_id=_canonical_uuid(event["hf_event_id"]),
        time=moment,
        sensor=sensor,
        session=session,
        eventid=eventid,
        src_ip=address,
        protocol=protocol,
        json=text,
        event=event,
    )
    return row, rewritten


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> str:
    """The canonical text of an event's src_ip; ValueError saying why it is not one.

    Cached: an attacker's events all carry the same address, and parsing it is a
    noticeable share of an event's validation.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"src_ip {text[:64]!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ValueError(f"src_ip must not carry an IPv6 scope ({address})")
    return str(address)


def _canonical_uuid(text: str) -> str:
    """The lower-case hyphenated form of a uuid (already checked by from_proto)."""
    return text if CANONICAL_UUID.fullmatch(text) else str(uuid.UUID(text))


def _has_surrogate(value: object) -> bool:
    """Whether any string (key or value) in a JSON value holds a lone surrogate."""
    if isinstance(value, str):
        return SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False
