"""EventQueryService: sessions, events, live watch and statistics for admins."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from controller.events.broadcast import Broadcaster, WatchFilter
from controller.events.store import (
    EventQuery,
    EventStore,
    SessionQuery,
    SessionSummary,
    StatsQuery,
    StoredEvent,
)
from controller.paging import decode_token, encode_token, page_size
from honeyfleet.errors import InvalidArgument, NotFound
from honeyfleet.events import PROTOCOLS
from honeyfleet.v1 import common_pb2, events_pb2, events_pb2_grpc, ingest_pb2

SESSION_EVENTS = 1000
# Events can be up to 256 KiB each: pages stop short of the 4 MiB message limit,
# counted in encoded bytes (attackers' non-ASCII text is up to 4 bytes a character).
MAX_PAGE_BYTES = 3 * 1024 * 1024
# Top-list keys (usernames, passwords, file names, ...) are attacker-chosen and unbounded:
# longer ones are cut, so a reply of MAX_TOP entries per list always fits.
MAX_STATS_KEY = 256
DEFAULT_TOP = 10
MAX_TOP = 100


class EventQueryServicer(events_pb2_grpc.EventQueryServiceServicer):
    """Read access to the event store and the live event feed."""

    def __init__(self, store: EventStore, broadcaster: Broadcaster) -> None:
        self._store = store
        self._broadcaster = broadcaster

    async def ListSessions(
        self, request: events_pb2.ListSessionsRequest, context: Any
    ) -> events_pb2.ListSessionsResponse:
        """Sessions newest first, filtered."""
        size = page_size(request.page_size)
        before = _position(decode_token("sessions", request.page_token), str)
        rows = await self._store.list_sessions(
            SessionQuery(
                limit=size + 1,
                sensor=_sensor(request.sensor),
                src_ip=_address(request.src_ip),
                username=request.username,
                start=_time(request, "start_time"),
                end=_time(request, "end_time"),
                before=before,
            )
        )
        # Sessions carry attacker-chosen texts (username, client version): also by bytes.
        sessions = _fit(_session(s) for s in rows[:size])
        token = ""
        if len(rows) > len(sessions):
            last = rows[len(sessions) - 1]
            token = encode_token("sessions", f"{last.start_us}:{last.session}")
        return events_pb2.ListSessionsResponse(sessions=sessions, next_page_token=token)

    async def GetSession(
        self, request: events_pb2.GetSessionRequest, context: Any
    ) -> events_pb2.GetSessionResponse:
        """A session and its first events."""
        summary = await self._store.get_session(request.id) if request.id else None
        if summary is None:
            raise NotFound(f"no session {request.id[:64]!r} in the event store")
        rows = await self._store.list_events(
            EventQuery(limit=SESSION_EVENTS + 1, session=request.id)
        )
        page, token = _event_page(rows, SESSION_EVENTS)
        return events_pb2.GetSessionResponse(
            session=_session(summary), events=page, next_events_page_token=token
        )

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: Any
    ) -> events_pb2.ListEventsResponse:
        """Events in time order, filtered."""
        size = page_size(request.page_size)
        rows = await self._store.list_events(
            EventQuery(
                limit=size + 1,
                eventid=request.eventid,
                sensor=_sensor(request.sensor),
                src_ip=_address(request.src_ip),
                session=request.session,
                start=_time(request, "start_time"),
                end=_time(request, "end_time"),
                after=_position(decode_token("events", request.page_token), int),
            )
        )
        page, token = _event_page(rows, size)
        return events_pb2.ListEventsResponse(events=page, next_page_token=token)

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: Any
    ) -> AsyncIterator[events_pb2.WatchEventsResponse]:
        """Newly stored events matching the filters, until the caller hangs up."""
        wanted = WatchFilter(
            eventid=request.eventid,
            sensor=_sensor(request.sensor),
            src_ip=_address(request.src_ip),
            session=request.session,
        )
        with self._broadcaster.subscribe(wanted) as watcher:
            # Headers tell the caller it is subscribed: later events will all arrive.
            await context.send_initial_metadata(())
            while True:
                row = await watcher.next()
                yield events_pb2.WatchEventsResponse(
                    event=ingest_pb2.Event(
                        hf_event_id=row.hf_event_id,
                        eventid=row.eventid,
                        time=_micros_timestamp(row.time_us),
                        session=row.session,
                        src_ip=row.src_ip,
                        protocol=_protocol(row.protocol),
                        json=row.json,
                    )
                )

    async def GetEventStats(
        self, request: events_pb2.GetEventStatsRequest, context: Any
    ) -> events_pb2.GetEventStatsResponse:
        """Top lists over a time range."""
        if not 0 <= request.top <= MAX_TOP:
            raise InvalidArgument(f"top must be between 0 and {MAX_TOP}")
        stats = await self._store.stats(
            StatsQuery(
                top=request.top or DEFAULT_TOP,
                sensor=_sensor(request.sensor),
                start=_time(request, "start_time"),
                end=_time(request, "end_time"),
            )
        )

        def counts(pairs: list[tuple[str, int]]) -> list[events_pb2.KeyCount]:
            """KeyCount messages from (value, count) pairs."""
            return [events_pb2.KeyCount(key=_cut(k), count=n) for k, n in pairs]

        return events_pb2.GetEventStatsResponse(
            top_usernames=counts(stats.usernames),
            top_passwords=counts(stats.passwords),
            top_src_ips=counts(stats.src_ips),
            sessions_per_sensor=counts(stats.sessions_per_sensor),
            sessions_per_pool_node=counts(stats.sessions_per_pool_node),
            top_uploads=[
                events_pb2.FileCount(
                    sha256=_cut(f.sha256),
                    count=f.count,
                    example_name=_cut(f.example_name),
                    first_time=_micros_timestamp(f.first_us),
                )
                for f in stats.files
            ],
        )


def _sensor(name: str) -> str:
    """A sensor filter as stored: "sensor/edge1" and "edge1" both mean edge1."""
    return name.removeprefix("sensor/")


def _address(text: str) -> str:
    """An address filter in the stores' canonical form ("" for none)."""
    if not text:
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise InvalidArgument(f"src_ip {text[:64]!r} is not an IP address") from None


def _time(request: Message, field: str) -> datetime | None:
    """A Timestamp field as an aware datetime, None when unset."""
    if not request.HasField(field):
        return None
    moment: datetime = getattr(request, field).ToDatetime(tzinfo=UTC)
    return moment


def _position(token: str | None, kind: type[int] | type[str]) -> Any:
    """(microseconds, int-or-str) from a page token's position, None for no token."""
    if token is None:
        return None
    micros, sep, key = token.partition(":")
    try:
        if not sep:
            raise ValueError(token)
        return int(micros), kind(key)
    except ValueError:
        raise InvalidArgument("page_token is malformed") from None


M = TypeVar("M", bound=Message)


def _fit(messages: Iterable[M]) -> list[M]:
    """The leading messages whose encoded size stays within MAX_PAGE_BYTES (at least one)."""
    page: list[M] = []
    total = 0
    for message in messages:
        total += message.ByteSize()
        if page and total > MAX_PAGE_BYTES:
            break
        page.append(message)
    return page


def _event_page(rows: list[StoredEvent], size: int) -> tuple[list[ingest_pb2.Event], str]:
    """Up to ``size`` events within MAX_PAGE_BYTES, and the token for the rest (if any)."""
    page = _fit(_event(e) for e in rows[:size])
    token = ""
    if len(rows) > len(page):
        last = rows[len(page) - 1]
        token = encode_token("events", f"{last.time_us}:{last.seq}")
    return page, token


def _cut(key: str) -> str:
    """A top-list key of at most MAX_STATS_KEY characters."""
    return key if len(key) <= MAX_STATS_KEY else key[: MAX_STATS_KEY - 1] + "\u2026"


def _micros_timestamp(micros: int) -> Timestamp:
    """A protobuf Timestamp from epoch microseconds (exactly; floats would round)."""
    ts = Timestamp()
    ts.FromMicroseconds(micros)
    return ts


def _protocol(name: str) -> common_pb2.Protocol.ValueType:
    """The wire enum of a protocol name."""
    return PROTOCOLS.get(name, common_pb2.PROTOCOL_UNSPECIFIED)


def _event(e: StoredEvent) -> ingest_pb2.Event:
    """The wire form of a stored event."""
    return ingest_pb2.Event(
        hf_event_id=e.hf_event_id,
        eventid=e.eventid,
        time=_micros_timestamp(e.time_us),
        session=e.session,
        src_ip=e.src_ip,
        protocol=_protocol(e.protocol),
        json=e.json,
    )


def _session(s: SessionSummary) -> events_pb2.Session:
    """The wire form of a session summary."""
    return events_pb2.Session(
        id=s.session,
        sensor=s.sensor,
        src_ip=s.src_ip,
        protocol=_protocol(s.protocol),
        start_time=_micros_timestamp(s.start_us),
        end_time=None if s.end_us is None else _micros_timestamp(s.end_us),
        last_event_time=_micros_timestamp(s.last_us),
        pool_node=s.pool_node,
        guest=s.guest,
        lease=s.lease,
        username=s.username,
        login_attempts=s.login_attempts,
        client_version=s.client_version,
        terminal_size=s.terminal_size,
        event_count=s.event_count,
    )
