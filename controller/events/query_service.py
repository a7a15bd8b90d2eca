"""EventQueryService: sessions, events, live watch and statistics for admins."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

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
# Events can be up to 256 KiB each: pages stop short of the 4 MiB message limit.
MAX_PAGE_BYTES = 3 * 1024 * 1024
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
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = encode_token("sessions", f"{last.start_us}:{last.session}")
        return events_pb2.ListSessionsResponse(
            sessions=[_session(s) for s in rows[:size]], next_page_token=token
        )

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
                        uuid=row.uuid,
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
            return [events_pb2.KeyCount(key=k, count=n) for k, n in pairs]

        return events_pb2.GetEventStatsResponse(
            top_usernames=counts(stats.usernames),
            top_passwords=counts(stats.passwords),
            top_src_ips=counts(stats.src_ips),
            sessions_per_sensor=counts(stats.sessions_per_sensor),
            sessions_per_pool_node=counts(stats.sessions_per_pool_node),
            top_uploads=[
                events_pb2.FileCount(
                    sha256=f.sha256,
                    count=f.count,
                    example_name=f.example_name,
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


def _event_page(rows: list[StoredEvent], size: int) -> tuple[list[ingest_pb2.Event], str]:
    """Up to ``size`` events within MAX_PAGE_BYTES, and the token for the rest (if any)."""
    page: list[StoredEvent] = []
    total = 0
    for row in rows[:size]:
        total += len(row.json)
        if page and total > MAX_PAGE_BYTES:
            break
        page.append(row)
    token = ""
    if len(rows) > len(page):
        token = encode_token("events", f"{page[-1].time_us}:{page[-1].seq}")
    return [_event(e) for e in page], token


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
        uuid=e.uuid,
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
