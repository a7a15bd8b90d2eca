"""Session events: Cowrie-compatible JSON objects with fleet fields and a delivery id.

An event is a plain ``dict`` so it round-trips through JSON verbatim. Every event has
Cowrie's shared fields (``eventid``, ``timestamp``, ``src_ip``, ``session``, ``sensor``,
``uuid``, ``message``), our ``protocol`` and ``hf_event_id``, and where known
``pool_node``, ``guest`` and ``lease``. Event-specific fields follow Cowrie's Output
Event Code Reference.

``uuid`` keeps Cowrie's meaning: the writing instance's identity (a sensor, or a pool
node for its own events), the same on every event it writes. ``hf_event_id`` is ours:
a new id per event, which makes delivery idempotent (spool -> controller
acknowledgement -> store uniqueness). It is a time-ordered UUID (version 7, RFC 9562),
so the stores' unique index on it grows at one end, as their time index does: random
ids (version 4) put each new event on a different index page, and every such page is
written again at every commit.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from google.protobuf.timestamp_pb2 import Timestamp

from honeyfleet.errors import InvalidArgument
from honeyfleet.v1 import common_pb2, ingest_pb2

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
PROTOCOLS = {"ssh": common_pb2.PROTOCOL_SSH, "telnet": common_pb2.PROTOCOL_TELNET}
PROTOCOL_NAMES: dict[int, str] = {number: name for name, number in PROTOCOLS.items()}
# The session fields of an event no attacker session is known for (a pool node's event
# about itself, or about a guest no lease was ever put on).
NO_SESSION = {"session": "-", "src_ip": "0.0.0.0", "sensor": "-", "protocol": "-"}
# Shared fields every event must carry (Cowrie's plus ours).
REQUIRED = (
    "eventid",
    "timestamp",
    "session",
    "src_ip",
    "sensor",
    "message",
    "protocol",
    "uuid",
    "hf_event_id",
)
MAX_EVENT_JSON = 256 * 1024
# Longer than any timestamp in TIMESTAMP_FORMAT.
MAX_TIMESTAMP = 40
# What every sensor writes (microseconds, six digits); fromisoformat parses it several
# times faster than strptime, which stays for the other spellings TIMESTAMP_FORMAT allows.
CANONICAL_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z", re.ASCII
)
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

Event = dict[str, Any]


def now_timestamp() -> str:
    """The current UTC time in Cowrie's timestamp format."""
    return datetime.now(UTC).strftime(TIMESTAMP_FORMAT)


def new_session_id() -> str:
    """A session id unique across the fleet (96 random bits, hex).

    Cowrie uses 12 hex digits per host; fleet-wide uniqueness needs more.
    """
    return secrets.token_hex(12)


def plain_ip(address: str) -> str:
    """An IPv4-mapped IPv6 address as its IPv4 address (as Cowrie writes ``src_ip``).

    A dual-stack listener sees IPv4 clients as ``::ffff:192.0.2.1``; events, and every
    table kept per source, name them as an IPv4 listener would. Other text is kept.
    """
    if "." not in address or ":" not in address:  # not an IPv4-mapped address
        return address
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return address


def new_event_id(now_ns: int | None = None) -> str:
    """A new ``hf_event_id``: a version 7 UUID, ordered by its millisecond (``now_ns``,
    nanoseconds since the epoch; default the clock), random below it."""
    millis = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    value = (millis & (1 << 48) - 1) << 80 | secrets.randbits(80)
    # The version (7) and variant (0b10) bits, over the random ones.
    value = value & ~(0xF << 76) | 7 << 76
    value = value & ~(0x3 << 62) | 0x2 << 62
    return str(uuid.UUID(int=value))


def make_event(
    eventid: str,
    message: str,
    *,
    session: str,
    src_ip: str,
    sensor: str,
    sensor_uuid: str,
    protocol: str,
    context: Mapping[str, Any] | None = None,
    **fields: Any,
) -> Event:
    """Build an event with a new ``hf_event_id``.

    ``sensor_uuid`` is the sensor instance's identity (Cowrie's ``uuid``); ``context``
    carries per-session fleet fields (pool_node, guest, lease).
    """
    event: Event = {
        "eventid": eventid,
        "message": message,
        "timestamp": now_timestamp(),
        "session": session,
        "src_ip": plain_ip(src_ip),
        "sensor": sensor,
        "uuid": sensor_uuid,
        "protocol": protocol,
        "hf_event_id": new_event_id(),
    }
    if context:
        event.update({k: v for k, v in context.items() if v})
    event.update(fields)
    return event


def to_json(event: Event) -> str:
    """One compact JSON line, as Cowrie writes them."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)


def to_proto(event: Event, text: str | None = None) -> ingest_pb2.Event:
    """The wire form: typed index fields plus the verbatim JSON.

    ``text`` is the event's JSON when the caller already has it (a spooled event), so
    it is not serialised again.
    """
    ts = Timestamp()
    ts.FromDatetime(parse_timestamp(event["timestamp"]))
    return ingest_pb2.Event(
        hf_event_id=event["hf_event_id"],
        eventid=event["eventid"],
        time=ts,
        session=event["session"],
        src_ip=event["src_ip"],
        protocol=PROTOCOLS.get(event.get("protocol", ""), common_pb2.PROTOCOL_UNSPECIFIED),
        json=to_json(event) if text is None else text,
    )


def from_proto(message: ingest_pb2.Event) -> Event:
    """Parse and check an event received from a sensor; InvalidArgument if malformed."""
    return decode(message)[0]


def _no_constant(name: str) -> Any:
    """json.loads hook for NaN and Infinity, which JSON (and the stores) forbid."""
    raise ValueError(f"{name} is not JSON")


# One decoder for every event: json.loads with a hook builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
# Its C scanner: called directly, it skips decode()'s two Python frames and whitespace
# matches, for text that is one JSON value and nothing else (what every sensor sends).
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _parse_json(text: str) -> Any:
    """The JSON value of ``text``; ValueError (or RecursionError) if it is not one."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:  # no value at the start (leading whitespace, or not JSON)
        return _DECODER.decode(text)
    if end != len(text):  # trailing whitespace, or more than one value: decode() judges
        return _DECODER.decode(text)
    return value


class Decoded(NamedTuple):
    """A received event, parsed and checked."""

    event: Event
    moment: datetime
    """Its time."""
    upgraded: bool
    """Whether a sensor from before ``hf_event_id`` sent it: ``hf_event_id`` was added
    (from its ``uuid``, then the delivery id), so its JSON text is not the event's."""


def decode(message: ingest_pb2.Event) -> Decoded:
    """Parse and check a received event once.

    InvalidArgument if malformed, NaN and Infinity included (json.loads would accept
    them, the stores' JSON types would not). An event of a sensor from before
    ``hf_event_id`` (its ``uuid`` is the wire's id) gets its ``hf_event_id``, so a fleet
    that upgrades its controller first loses none of its older sensors' events.
    """
    text = message.json
    wire_id = message.hf_event_id  # each read of a message field makes a new str
    # Characters bound bytes from below and 4x from above: encode only when in doubt.
    if len(text) > MAX_EVENT_JSON or (
        len(text) * 4 > MAX_EVENT_JSON and len(text.encode()) > MAX_EVENT_JSON
    ):
        raise InvalidArgument(f"event {wire_id[:40]!r} is larger than {MAX_EVENT_JSON} bytes")
    try:
        event = _parse_json(text)
    except (ValueError, RecursionError):  # deep nesting overflows the parser's stack
        raise InvalidArgument(
            f"event {wire_id[:40]!r} is not valid JSON (NaN and Infinity included)"
        ) from None
    if not isinstance(event, dict):
        raise InvalidArgument(f"event {wire_id[:40]!r} is not a JSON object")
    upgraded = "hf_event_id" not in event and event.get("uuid") == wire_id
    if upgraded:
        event["hf_event_id"] = wire_id
    for key in REQUIRED:  # a loop, not a list: this runs for every event received
        if not isinstance(event.get(key), str):
            missing = [name for name in REQUIRED if not isinstance(event.get(name), str)]
            raise InvalidArgument(f"event {wire_id[:40]!r} lacks {', '.join(missing)}")
    if event["hf_event_id"] != wire_id:
        raise InvalidArgument(f"event {wire_id[:40]!r} carries another hf_event_id in its JSON")
    if len(event["timestamp"]) > MAX_TIMESTAMP:  # parse errors quote it: keep them short
        raise InvalidArgument(f"event {wire_id[:40]!r}: timestamp is too long")
    try:
        if not CANONICAL_UUID.fullmatch(wire_id):
            uuid.UUID(wire_id)
        moment = parse_timestamp(event["timestamp"])
    except ValueError as e:
        raise InvalidArgument(f"event {wire_id[:40]!r}: {e}") from None
    return Decoded(event, moment, upgraded)


def parse_timestamp(text: str) -> datetime:
    """Parse Cowrie's timestamp format (UTC)."""
    if CANONICAL_TIMESTAMP.fullmatch(text):
        return datetime.fromisoformat(text)
    return datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=UTC)
