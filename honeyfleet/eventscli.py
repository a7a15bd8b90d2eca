"""The ``honeyfleet events`` and ``honeyfleet sessions`` commands (EventQueryService).

    honeyfleet events tail [--eventid X] [--sensor S] [--src-ip IP] [--session ID] [--json]
    honeyfleet events stats [--since T] [--until T] [--sensor S] [--top N] [--json]
    honeyfleet sessions list [--sensor S] [--src-ip IP] [--username U] [--since T] [--until T]
    honeyfleet sessions show ID [--json]

Times (``--since``, ``--until``) are ISO-8601 (``2024-05-01``, ``2024-05-01T12:00:00Z``;
UTC unless an offset is given) or a duration before now (``90s``, ``30m``, ``2h``, ``7d``).
``--json`` prints Cowrie JSON lines for events and JSON objects for the rest. Every
command takes the admin TLS flags of ``honeyfleet status``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table

from honeyfleet.admincli import add_admin_flags, admin_config
from honeyfleet.errors import RPCError
from honeyfleet.pki.cli import parse_duration
from honeyfleet.termtext import cell, shown
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import events_pb2, events_pb2_grpc, ingest_pb2

LIST_PAGE = 100
T = TypeVar("T")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``events`` and ``sessions`` commands to the main CLI's ``subparsers``."""
    events = subparsers.add_parser("events", help="watch and summarise stored session events")
    sub = events.add_subparsers(dest="events_command", metavar="COMMAND", required=True)
    p = sub.add_parser("tail", help="print events as they are stored (Ctrl-C to stop)")
    p.add_argument("--eventid", default="", help="only this Cowrie event id")
    p.add_argument("--sensor", default="", help="only events from this sensor")
    p.add_argument("--src-ip", default="", help="only events of this attacker address")
    p.add_argument("--session", default="", help="only events of this session")
    p.add_argument("--json", action="store_true", help="print Cowrie JSON lines")
    add_admin_flags(p)
    p.set_defaults(func=_cmd_tail)
    p = sub.add_parser("stats", help="top usernames, passwords, addresses, sessions, files")
    add_time_flags(p)
    p.add_argument("--sensor", default="", help="only this sensor")
    p.add_argument("--top", type=int, default=10, help="length of each list (at most 100)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_admin_flags(p)
    p.set_defaults(func=_cmd_stats)

    sessions = subparsers.add_parser("sessions", help="list and show attacker sessions")
    sub = sessions.add_subparsers(dest="sessions_command", metavar="COMMAND", required=True)
    p = sub.add_parser("list", help="sessions, newest first")
    p.add_argument("--sensor", default="", help="only sessions on this sensor")
    p.add_argument("--src-ip", default="", help="only sessions from this address")
    p.add_argument("--username", default="", help="only sessions that tried this username")
    add_time_flags(p)
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--json", action="store_true", help="print one JSON object a line")
    add_admin_flags(p)
    p.set_defaults(func=_cmd_sessions_list)
    p = sub.add_parser("show", help="a session's summary and all its events")
    p.add_argument("id", help="session id")
    p.add_argument("--json", action="store_true", help="print the events as Cowrie JSON lines")
    add_admin_flags(p)
    p.set_defaults(func=_cmd_sessions_show)


def add_time_flags(p: argparse.ArgumentParser) -> None:
    """Add --since and --until."""
    p.add_argument("--since", type=_time_arg, help="from this time (ISO-8601 or e.g. 2h)")
    p.add_argument("--until", type=_time_arg, help="before this time (ISO-8601 or e.g. 30m)")


def _time_arg(text: str) -> Timestamp:
    """argparse type: an ISO-8601 time or a duration before now, as a Timestamp."""
    try:
        moment = datetime.now(UTC) - parse_duration(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither an ISO-8601 time nor a duration like 30m"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


def _out(text: str) -> None:
    """One line on stdout, flushed (tail output is often piped)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _event_line(event: ingest_pb2.Event, as_json: bool) -> str:
    """An event as its exact Cowrie JSON line, or a compact human line (escaped)."""
    if as_json:
        return event.json
    data = json.loads(event.json)
    fields = (
        data.get("timestamp", ""),
        data.get("sensor", ""),
        event.src_ip,
        event.session,
        event.eventid,
        data.get("message", ""),
    )
    return " ".join(shown(str(f)) for f in fields)


def admin_call(
    args: argparse.Namespace, what: str, make_stub: Callable[[Any], Any], body: Any
) -> int:
    """Run ``body(make_stub(channel))`` against the controller as an admin, wrapping RPC
    failures in RPCError (named ``what``)."""
    config = admin_config(args)

    async def call() -> None:
        """Open a channel and run the body."""
        async with secure_channel(config.controller, config.tls) as channel:
            try:
                await body(make_stub(channel))
            except grpc.aio.AioRpcError as e:
                raise RPCError.wrap(what, e) from None

    asyncio.run(call())
    return 0


def _stub_call(args: argparse.Namespace, what: str, body: Any) -> int:
    """Run ``body(stub)`` with an EventQueryService stub."""
    return admin_call(args, what, events_pb2_grpc.EventQueryServiceStub, body)


def _cmd_tail(args: argparse.Namespace) -> int:
    """`events tail`: follow WatchEvents."""
    request = events_pb2.WatchEventsRequest(
        eventid=args.eventid, sensor=args.sensor, src_ip=args.src_ip, session=args.session
    )

    async def body(stub: events_pb2_grpc.EventQueryServiceAsyncStub) -> None:
        """The command's calls and output."""
        call = stub.WatchEvents(request)
        # The controller answers with headers once subscribed: say so only then.
        await call.initial_metadata()
        sys.stderr.write("watching events (Ctrl-C to stop)\n")
        sys.stderr.flush()
        async for response in call:
            _out(_event_line(response.event, args.json))

    return _stub_call(args, "WatchEvents", body)


def _cmd_stats(args: argparse.Namespace) -> int:
    """`events stats`: GetEventStats as tables or JSON."""
    request = events_pb2.GetEventStatsRequest(sensor=args.sensor, top=args.top)
    if args.since:
        request.start_time.CopyFrom(args.since)
    if args.until:
        request.end_time.CopyFrom(args.until)

    async def body(stub: events_pb2_grpc.EventQueryServiceAsyncStub) -> None:
        """The command's calls and output."""
        stats = await stub.GetEventStats(request)
        if args.json:
            _out(json.dumps(MessageToDict(stats), indent=2))
            return
        console = Console()
        lists = (
            ("Usernames", stats.top_usernames),
            ("Passwords", stats.top_passwords),
            ("Source addresses (sessions)", stats.top_src_ips),
            ("Sessions per sensor", stats.sessions_per_sensor),
            ("Sessions per pool node", stats.sessions_per_pool_node),
        )
        for title, counts in lists:
            table = Table(title=title, title_justify="left")
            table.add_column("value")
            table.add_column("count", justify="right")
            for item in counts:
                table.add_row(cell(item.key), str(item.count))
            console.print(table)
        files = Table(title="Captured files", title_justify="left")
        for column in ("sha256", "count", "name", "first seen"):
            files.add_column(column)
        for f in stats.top_uploads:
            files.add_row(cell(f.sha256), str(f.count), cell(f.example_name), when(f.first_time))
        console.print(files)

    return _stub_call(args, "GetEventStats", body)


class PagedRequest(Protocol):
    """An AIP-158 list request."""

    page_size: int
    page_token: str


class PagedResponse(Protocol):
    """An AIP-158 list response."""

    next_page_token: str


async def paged(
    call: Callable[[Any], Awaitable[Any]],
    request: PagedRequest,
    items: Callable[[Any], Sequence[T]],
    limit: int,
    page: int = LIST_PAGE,
) -> AsyncIterator[T]:
    """Up to ``limit`` items of a list call, following page tokens (``items`` picks a
    response's list)."""
    left = limit
    while left > 0:
        request.page_size = min(left, page)
        response: PagedResponse = await call(request)
        found = items(response)
        for item in found:
            yield item
        left -= len(found)
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


def _cmd_sessions_list(args: argparse.Namespace) -> int:
    """`sessions list`: ListSessions as a table or JSON lines."""
    request = events_pb2.ListSessionsRequest(
        sensor=args.sensor, src_ip=args.src_ip, username=args.username
    )
    if args.since:
        request.start_time.CopyFrom(args.since)
    if args.until:
        request.end_time.CopyFrom(args.until)

    async def body(stub: events_pb2_grpc.EventQueryServiceAsyncStub) -> None:
        """The command's calls and output."""
        found = [
            s async for s in paged(stub.ListSessions, request, lambda r: r.sessions, args.limit)
        ]
        if args.json:
            for session in found:
                _out(json.dumps(MessageToDict(session)))
            return
        table = Table(title=f"Sessions ({len(found)}, newest first)", title_justify="left")
        columns = ("start (UTC)", "session", "sensor", "source", "user", "logins", "events")
        for column in (*columns, "pool node", "ended"):
            table.add_column(column)
        for s in found:
            table.add_row(
                when(s.start_time),
                cell(s.id),
                cell(s.sensor),
                cell(s.src_ip),
                cell(s.username or "-"),
                str(s.login_attempts),
                str(s.event_count),
                cell(s.pool_node or "-"),
                when(s.end_time) if s.HasField("end_time") else "open",
            )
        Console(width=200).print(table)

    return _stub_call(args, "ListSessions", body)


def _cmd_sessions_show(args: argparse.Namespace) -> int:
    """`sessions show`: a session's summary and all its events."""

    async def body(stub: events_pb2_grpc.EventQueryServiceAsyncStub) -> None:
        """The command's calls and output, printed a page at a time (a session may have
        any number of events)."""
        response = await stub.GetSession(events_pb2.GetSessionRequest(id=args.id))
        s = response.session
        if not args.json:
            for label, value in (
                ("session", s.id),
                ("sensor", s.sensor),
                ("source", s.src_ip),
                ("started", when(s.start_time)),
                ("ended", when(s.end_time) if s.HasField("end_time") else "still open"),
                ("guest", f"{s.pool_node}/{s.guest} (lease {s.lease})" if s.pool_node else "-"),
                ("user", f"{s.username or '-'} after {s.login_attempts} login attempts"),
                ("client", s.client_version or "-"),
                ("events", str(s.event_count)),
            ):
                _out(f"{label + ':':9} {shown(value)}")
            _out("")
        ttylogs = []
        page, token = response.events, response.next_events_page_token
        while True:
            for event in page:
                _out(_event_line(event, args.json))
                if event.eventid == "cowrie.log.closed":
                    closed = json.loads(event.json)
                    ttylogs.append((closed.get("ttylog_sha256"), closed.get("ttylog")))
            if not token:
                break
            more = await stub.ListEvents(
                events_pb2.ListEventsRequest(session=args.id, page_token=token, page_size=1000)
            )
            page, token = more.events, more.next_page_token
        if args.json:
            return
        _out("")
        stored = [shown(str(sha)) for sha, _ in ttylogs if sha]
        kept = ", ".join(shown(str(path)) for sha, path in ttylogs if not sha)
        if stored:
            _out(f"recording: sha256 {', '.join(stored)} (honeyfleet replay {shown(args.id)})")
        elif kept:
            # An older sensor, or one whose outbox was full: the file stayed there.
            _out(
                f"recording: not in the controller's store (sensor {shown(s.sensor)} keeps {kept})"
            )
        else:
            _out("recording: none")

    return _stub_call(args, "GetSession", body)


def when(ts: Timestamp) -> str:
    """A timestamp as ``YYYY-MM-DD HH:MM:SS`` UTC."""
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")
