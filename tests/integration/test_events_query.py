"""EventQueryService, Cowrie's SQL shape, the live watch, JSON lines, metrics and the CLI."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry

from controller.events.broadcast import Broadcaster, WatchFilter
from controller.events.metrics import EventMetrics
from controller.events.query_service import MAX_STATS_KEY
from controller.events.store import SessionQuery
from controller.events.validate import to_row
from controller.server import Controller
from honeyfleet.errors import ResourceExhausted
from honeyfleet.events import Event, make_event, new_session_id, parse_timestamp, to_proto
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import events_pb2, events_pb2_grpc
from tests.conftest import ControllerFactory, FleetPki
from tests.integration.test_events_ingest import (
    DB_TIMEOUT,
    RPC_TIMEOUT,
    batches,
    session_events,
    stream_all,
)
from tests.integration.test_fleet_tools import BIN, run

pytest_plugins = ["tests.postgres"]
COWRIE_SHARED = ("eventid", "timestamp", "src_ip", "session", "sensor", "message")
MAX_PAGES = 100  # more pages than any test needs: a token that never ends fails the test
WATCH_TIMEOUT = 30  # for a watch to deliver the events it should


def ts(moment: datetime) -> Timestamp:
    """A protobuf Timestamp."""
    out = Timestamp()
    out.FromDatetime(moment)
    return out


async def fleet_of_sessions(
    start_controller: ControllerFactory, fleet_pki: FleetPki, **overrides: Any
) -> tuple[Controller, str, dict[str, list[Event]]]:
    """A controller that stored three sessions: two on edge1, one on edge2."""
    controller, address = await start_controller(metrics_listen="127.0.0.1:0", **overrides)
    sessions = {
        "a": session_events("edge1", "198.51.100.1", username="root", password="toor"),
        "b": session_events("edge1", "198.51.100.2", username="pi", password="raspberry"),
        "c": session_events(
            "edge2", "2001:db8::5", username="root", password="toor", pool_node="n2"
        ),
    }
    for name, sensor in (("a", "edge1"), ("b", "edge1"), ("c", "edge2")):
        await stream_all(fleet_pki, address, sensor, batches(sessions[name]))
    return controller, address, sessions


def admin_stub(fleet_pki: FleetPki, address: str) -> events_pb2_grpc.EventQueryServiceStub:
    """The query API as an admin."""
    return events_pb2_grpc.EventQueryServiceStub(
        secure_channel(address, fleet_pki.files(Role.ADMIN, "alice"))
    )


async def test_queries_return_what_was_written(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    _, address, sessions = await fleet_of_sessions(start_controller, fleet_pki, **store_overrides)
    stub = admin_stub(fleet_pki, address)
    ids = {name: events[0]["session"] for name, events in sessions.items()}

    listed = await stub.ListSessions(events_pb2.ListSessionsRequest(), timeout=RPC_TIMEOUT)
    assert [s.id for s in listed.sessions] == [ids["c"], ids["b"], ids["a"]]  # newest first
    one = {s.id: s for s in listed.sessions}[ids["a"]]
    a = sessions["a"]
    assert (one.sensor, one.src_ip, one.username, one.login_attempts) == (
        "edge1",
        "198.51.100.1",
        "root",
        2,
    )
    assert (one.client_version, one.terminal_size, one.event_count) == ("SSH-2.0-Go", "80x24", 9)
    assert (one.pool_node, one.guest, one.lease) == ("n1", "g1", a[3]["lease"])
    assert one.start_time.ToDatetime(tzinfo=UTC) == parse_timestamp(a[0]["timestamp"])
    assert one.end_time.ToDatetime(tzinfo=UTC) == parse_timestamp(a[-1]["timestamp"])

    async def session_ids(**filters: Any) -> list[str]:
        reply = await stub.ListSessions(
            events_pb2.ListSessionsRequest(**filters), timeout=RPC_TIMEOUT
        )
        return [s.id for s in reply.sessions]

    assert await session_ids(sensor="edge1") == [ids["b"], ids["a"]]
    assert await session_ids(sensor="sensor/edge2") == [ids["c"]]
    assert await session_ids(src_ip="2001:DB8:0::5") == [ids["c"]]
    assert await session_ids(username="root") == [ids["c"], ids["a"]]
    assert await session_ids(username="admin") == [ids["c"], ids["b"], ids["a"]]  # failed ones
    b_start = parse_timestamp(sessions["b"][0]["timestamp"])
    assert await session_ids(start_time=ts(b_start)) == [ids["c"], ids["b"]]
    assert await session_ids(end_time=ts(b_start)) == [ids["a"]]

    pages, token = [], ""
    for _ in range(MAX_PAGES):
        page = await stub.ListSessions(
            events_pb2.ListSessionsRequest(page_size=1, page_token=token), timeout=RPC_TIMEOUT
        )
        pages.extend(s.id for s in page.sessions)
        token = page.next_page_token
        if not token:
            break
    else:
        raise AssertionError(f"ListSessions still paging after {MAX_PAGES} pages")
    assert pages == [ids["c"], ids["b"], ids["a"]]

    got = await stub.GetSession(events_pb2.GetSessionRequest(id=ids["b"]), timeout=RPC_TIMEOUT)
    assert [json.loads(e.json) for e in got.events] == sessions["b"]
    assert not got.next_events_page_token and not got.HasField("recording")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetSession(events_pb2.GetSessionRequest(id="nope"), timeout=RPC_TIMEOUT)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    failed = await stub.ListEvents(
        events_pb2.ListEventsRequest(eventid="cowrie.login.failed"), timeout=RPC_TIMEOUT
    )
    assert [e.session for e in failed.events] == [ids["a"], ids["b"], ids["c"]]
    on_c = await stub.ListEvents(
        events_pb2.ListEventsRequest(src_ip="2001:db8::5"), timeout=RPC_TIMEOUT
    )
    assert [json.loads(e.json) for e in on_c.events] == sessions["c"]
    everything: list[str] = []
    token = ""
    for _ in range(MAX_PAGES):
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(page_size=4, page_token=token), timeout=RPC_TIMEOUT
        )
        everything.extend(e.hf_event_id for e in page.events)
        token = page.next_page_token
        if not token:
            break
    else:
        raise AssertionError(f"ListEvents still paging after {MAX_PAGES} pages")
    assert everything == [e["hf_event_id"] for name in "abc" for e in sessions[name]]
    c_start = parse_timestamp(sessions["c"][0]["timestamp"])
    before_c = await stub.ListEvents(
        events_pb2.ListEventsRequest(sensor="edge2", end_time=ts(c_start), page_size=100),
        timeout=RPC_TIMEOUT,
    )
    assert list(before_c.events) == []
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.ListEvents(
            events_pb2.ListEventsRequest(page_token="garbage"), timeout=RPC_TIMEOUT
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    stats = await stub.GetEventStats(events_pb2.GetEventStatsRequest(), timeout=RPC_TIMEOUT)
    assert [(k.key, k.count) for k in stats.top_usernames] == [("admin", 3), ("root", 2), ("pi", 1)]
    assert (stats.top_passwords[0].key, stats.top_passwords[0].count) == ("toor", 2)
    assert {(k.key, k.count) for k in stats.top_src_ips} == {
        ("198.51.100.1", 1),
        ("198.51.100.2", 1),
        ("2001:db8::5", 1),
    }
    assert [(k.key, k.count) for k in stats.sessions_per_sensor] == [("edge1", 2), ("edge2", 1)]
    assert [(k.key, k.count) for k in stats.sessions_per_pool_node] == [("n1", 2), ("n2", 1)]
    assert [(f.sha256, f.count, f.example_name) for f in stats.top_uploads] == [
        ("ab" * 32, 3, "x.sh")
    ]
    only_edge2 = await stub.GetEventStats(
        events_pb2.GetEventStatsRequest(sensor="edge2", top=1), timeout=RPC_TIMEOUT
    )
    assert [(k.key, k.count) for k in only_edge2.top_usernames] == [("admin", 1)]


async def test_cowrie_sql_tables_answer_cowrie_queries(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, _, sessions = await fleet_of_sessions(
        start_controller, fleet_pki, **store_overrides
    )
    a = sessions["a"]
    queries = {
        # Kippo-Graph / Cowrie-style joins on the integer sensor and client ids.
        "sessions": "SELECT s.ip, se.ip, c.version, s.termsize FROM sessions s "
        "JOIN sensors se ON s.sensor = se.id LEFT JOIN clients c ON s.client = c.id "
        "WHERE s.id = {p}",
        "auth": "SELECT username, password, success FROM auth WHERE session = {p} ORDER BY id",
        "input": "SELECT input, success FROM input WHERE session = {p}",
        "downloads": "SELECT url, outfile, shasum FROM downloads WHERE session = {p}",
        "ttylog": "SELECT ttylog, size FROM ttylog WHERE session = {p}",
    }
    if store_overrides["store"] == "sqlite":
        with sqlite3.connect(controller.config.state_dir / "events.sqlite3") as db:
            got = {
                name: db.execute(q.format(p="?"), (a[0]["session"],)).fetchall()
                for name, q in queries.items()
            }
            endtime = db.execute("SELECT endtime FROM sessions WHERE id = ?", (a[0]["session"],))
            # The ISO text Cowrie's sqlite output keeps, to the microsecond.
            assert endtime.fetchone()[0] == a[-1]["timestamp"]
    else:
        import psycopg

        async with (
            asyncio.timeout(DB_TIMEOUT),
            await psycopg.AsyncConnection.connect(store_overrides["postgres_dsn"]) as conn,
        ):
            got = {}
            for name, q in queries.items():
                cursor = await conn.execute(q.format(p="%s"), (a[0]["session"],))
                got[name] = [tuple(row) for row in await cursor.fetchall()]
    assert got["sessions"] == [("198.51.100.1", "edge1", "SSH-2.0-Go", "80x24")]
    assert [(u, p, bool(s)) for u, p, s in got["auth"]] == [
        ("admin", "toorx", False),
        ("root", "toor", True),
    ]
    assert [(i, bool(s)) for i, s in got["input"]] == [("uname -a", True)]
    assert got["downloads"] == [("x.sh", "var/lib/x", "ab" * 32)]
    assert [(t, int(s)) for t, s in got["ttylog"]] == [(a[7]["ttylog"], 1234)]


async def test_cowrie_sql_ipforwards_and_refused_sessions(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller(**store_overrides)
    common: dict[str, Any] = {
        "src_ip": "198.51.100.7", "sensor": "edge1", "sensor_uuid": "edge1-uuid",
        "protocol": "ssh",
    }  # fmt: skip
    forwarded = new_session_id()
    events = [
        make_event(
            "cowrie.direct-tcpip.request", "direct-tcp connection request", session=forwarded,
            dst_ip="10.1.2.3", dst_port=8080, orig_ip="127.0.0.1", orig_port=5555, **common,
        ),
        make_event(
            "cowrie.direct-tcpip.data", "discarded direct-tcp forward request", session=forwarded,
            dst_ip="10.1.2.3", dst_port=8080, data="b'GET / HTTP/1.0'", id=1, **common,
        ),
        make_event(
            "honeyfleet.session.refused", "Refused 3 connection(s): full",
            session=new_session_id(), reason="full", count=3, **common,
        ),
    ]  # fmt: skip
    await stream_all(fleet_pki, address, "edge1", batches(events))
    refused = events[2]["session"]
    queries = {
        "ipforwards": "SELECT dst_ip, dst_port FROM ipforwards WHERE session = {p}",
        "ipforwardsdata": "SELECT dst_ip, dst_port, data FROM ipforwardsdata WHERE session = {p}",
        "ended": "SELECT endtime IS NOT NULL FROM sessions WHERE id = {p}",
    }
    args = {"ipforwards": forwarded, "ipforwardsdata": forwarded, "ended": refused}
    if store_overrides["store"] == "sqlite":
        with sqlite3.connect(controller.config.state_dir / "events.sqlite3") as db:
            got = {
                n: db.execute(q.format(p="?"), (args[n],)).fetchall() for n, q in queries.items()
            }
    else:
        import psycopg

        async with (
            asyncio.timeout(DB_TIMEOUT),
            await psycopg.AsyncConnection.connect(store_overrides["postgres_dsn"]) as conn,
        ):
            got = {}
            for name, q in queries.items():
                cursor = await conn.execute(q.format(p="%s"), (args[name],))
                got[name] = [tuple(row) for row in await cursor.fetchall()]
    assert [(ip, int(port)) for ip, port in got["ipforwards"]] == [("10.1.2.3", 8080)]
    assert [(ip, int(port), d) for ip, port, d in got["ipforwardsdata"]] == [
        ("10.1.2.3", 8080, "b'GET / HTTP/1.0'")
    ]
    # A refusal is a session of one event: it has ended.
    assert [bool(e) for (e,) in got["ended"]] == [True]


async def test_watch_sees_events_as_they_arrive(
    start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    _, address = await start_controller()
    stub = admin_stub(fleet_pki, address)
    everything = stub.WatchEvents(events_pb2.WatchEventsRequest())
    logins = stub.WatchEvents(events_pb2.WatchEventsRequest(eventid="cowrie.login.success"))
    on_edge2 = stub.WatchEvents(events_pb2.WatchEventsRequest(sensor="edge2"))
    async with asyncio.timeout(WATCH_TIMEOUT):
        for call in (everything, logins, on_edge2):
            await call.initial_metadata()  # subscribed from here on
    first, second = session_events("edge1"), session_events("edge2")
    await stream_all(fleet_pki, address, "edge1", batches(first))
    await stream_all(fleet_pki, address, "edge2", batches(second))
    async with asyncio.timeout(WATCH_TIMEOUT):
        seen = [json.loads((await everything.read()).event.json) for _ in range(18)]
        login_uuids = [(await logins.read()).event.hf_event_id for _ in range(2)]
        edge2_uuids = [(await on_edge2.read()).event.hf_event_id for _ in range(9)]
    assert seen == first + second
    assert login_uuids == [first[3]["hf_event_id"], second[3]["hf_event_id"]]
    assert edge2_uuids == [e["hf_event_id"] for e in second]
    for call in (everything, logins, on_edge2):
        call.cancel()


def test_a_watcher_that_falls_behind_is_dropped() -> None:
    metrics = EventMetrics(CollectorRegistry())
    broadcaster = Broadcaster(metrics, queue_events=5)
    rows = [to_row(to_proto(e), "edge1")[0] for e in session_events() + session_events()]
    with (
        broadcaster.subscribe(WatchFilter()) as slow,
        broadcaster.subscribe(WatchFilter(eventid="cowrie.session.closed")) as picky,
    ):
        broadcaster.publish(rows)
        assert picky.queue.qsize() == 2
        with pytest.raises(ResourceExhausted, match="fell more than 5 events behind"):
            asyncio.run(asyncio.wait_for(slow.next(), WATCH_TIMEOUT))
        assert metrics.watchers_dropped._value.get() == 1
        broadcaster.publish(rows[:1])  # the dropped watcher gets nothing more
        assert slow.queue.qsize() == 0


async def test_json_lines_file_is_cowrie_format(
    start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller()
    sent = session_events("edge1")
    sent[2]["sensor"] = "spoofed"
    wire = batches(sent)
    # Line breaks between JSON tokens are valid JSON, but must not split a line.
    wire[0].events[4].json = json.dumps(sent[4], indent=1, ensure_ascii=False)
    await stream_all(fleet_pki, address, "edge1", wire)
    await stream_all(fleet_pki, address, "edge1", batches(sent))  # resent: not written twice
    lines = (controller.config.state_dir / "cowrie.json").read_text().splitlines()
    assert len(lines) == len(sent)
    for line, event in zip(lines, sent, strict=True):
        parsed = json.loads(line)
        assert parsed == {**event, "sensor": "edge1"}
        assert all(isinstance(parsed[key], str) for key in COWRIE_SHARED)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", parsed["timestamp"])
        assert parsed["eventid"].startswith("cowrie.")


async def test_metrics_are_served_without_unbounded_labels(
    start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller(metrics_listen="127.0.0.1:0")
    await stream_all(fleet_pki, address, "edge1", batches(session_events("edge1")))
    url = f"http://127.0.0.1:{controller.events.metrics_port}/metrics"
    text = (
        await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    ).decode()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["honeyfleet_events_ingested_total"] == 9
    assert values["honeyfleet_sessions_started_total"] == 1
    assert values["honeyfleet_store_up"] == 1
    assert values["honeyfleet_ingest_batches_total"] == 1
    assert values["honeyfleet_ingest_lag_seconds_count"] == 9
    for gauge in ("pool_nodes_up", "sensors_up", "leases_active", "sessions_active"):
        assert f"honeyfleet_{gauge}" in values
    assert values["honeyfleet_sensors_known"] >= 0
    # Labels only from fixed vocabularies: no addresses, sessions or sensor names.
    for line in text.splitlines():
        assert "198.51.100" not in line and "edge1" not in line
        for label in re.findall(r'(\w+)="', line):
            assert label in {"stage", "operation", "sink", "le", "quantile"}


async def test_cli_tails_lists_and_shows(
    start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    _, address, sessions = await fleet_of_sessions(start_controller, fleet_pki)
    admin = fleet_pki.files(Role.ADMIN, "alice")
    flags = ["--controller", address, "--ca", str(admin.ca), "--cert", str(admin.cert)]
    flags += ["--key", str(admin.key)]
    honeyfleet = str(BIN / "honeyfleet")

    code, out, err = await run(honeyfleet, "sessions", "list", *flags, "--json")
    assert code == 0, err
    listed = [json.loads(line) for line in out.splitlines()]
    assert [s["id"] for s in listed] == [sessions[n][0]["session"] for n in "cba"]
    code, out, err = await run(honeyfleet, "sessions", "list", *flags, "--username", "pi")
    assert code == 0, err
    assert sessions["b"][0]["session"] in out and sessions["a"][0]["session"] not in out
    code, out, err = await run(honeyfleet, "sessions", "list", *flags, "--since", "1h")
    assert code == 0 and "Sessions (3" in out, err

    b = sessions["b"]
    code, out, err = await run(honeyfleet, "sessions", "show", b[0]["session"], *flags)
    assert code == 0, err
    assert "user:     pi after 2 login attempts" in out
    assert "cowrie.command.input CMD: uname -a" in out
    kept = f"sensor edge1 keeps {b[7]['ttylog']}"
    assert f"recording: not in the controller's store ({kept})" in out
    code, out, err = await run(honeyfleet, "sessions", "show", b[0]["session"], *flags, "--json")
    assert [json.loads(line) for line in out.splitlines()] == b
    code, out, err = await run(honeyfleet, "sessions", "show", "unknown", *flags)
    assert code == 2 and "NOT_FOUND" in err and "Traceback" not in err

    code, out, err = await run(honeyfleet, "events", "stats", *flags, "--json")
    assert code == 0, err
    assert json.loads(out)["topUsernames"][0] == {"key": "admin", "count": "3"}

    tail = await asyncio.create_subprocess_exec(
        honeyfleet,
        "events",
        "tail",
        *flags,
        "--eventid",
        "cowrie.login.success",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert tail.stderr is not None and tail.stdout is not None
        assert "watching events" in (await asyncio.wait_for(tail.stderr.readline(), 30)).decode()
        fresh = session_events("edge3", "192.0.2.99", username="oracle")
        await stream_all(fleet_pki, address, "edge3", batches(fresh))
        line = await asyncio.wait_for(tail.stdout.readline(), 30)
        assert json.loads(line) == fresh[3]
    finally:
        tail.terminate()
        try:
            async with asyncio.timeout(RPC_TIMEOUT):
                await tail.wait()
        except TimeoutError:
            tail.kill()
            await tail.wait()


async def test_retention_drops_old_events(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller(retention_days=3, **store_overrides)
    old = session_events("edge1", "198.51.100.50")
    for event in old:
        moment = parse_timestamp(event["timestamp"]) - timedelta(days=10)
        event["timestamp"] = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    new = session_events("edge1", "198.51.100.51")
    await stream_all(fleet_pki, address, "edge1", batches(old + new))
    store = controller.events.store
    assert len(await store.list_sessions(SessionQuery(limit=100))) == 2
    await store.maintain(datetime.now(UTC))
    remaining = await store.list_sessions(SessionQuery(limit=100))
    assert [s.session for s in remaining] == [new[0]["session"]]
    stub = admin_stub(fleet_pki, address)
    listed = await stub.ListEvents(events_pb2.ListEventsRequest(page_size=100), timeout=RPC_TIMEOUT)
    assert [e.hf_event_id for e in listed.events] == [e["hf_event_id"] for e in new]
    if store_overrides["store"] == "postgres":
        import psycopg

        async with (
            asyncio.timeout(DB_TIMEOUT),
            await psycopg.AsyncConnection.connect(store_overrides["postgres_dsn"]) as conn,
        ):
            cursor = await conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'events'::regclass"
            )
            partitions = {name for (name,) in await cursor.fetchall()}
        today = datetime.now(UTC).date()
        old_day = (today - timedelta(days=10)).strftime("%Y%m%d")
        assert f"events_p{old_day}" not in partitions
        ahead = [(today + timedelta(days=n)).strftime("%Y%m%d") for n in range(3)]
        assert {f"events_p{day}" for day in ahead} <= partitions


async def test_pages_of_large_events_stay_under_the_message_limit(
    start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    _, address = await start_controller()
    big: list[Event] = []
    template = session_events("edge1")[5]
    for n in range(20):
        event = dict(template, hf_event_id=str(uuid.uuid4()), input=f"{n}:" + "A" * 200_000)
        big.append(event)
    await stream_all(fleet_pki, address, "edge1", batches(big, size=5))
    stub = admin_stub(fleet_pki, address)
    first = await stub.GetSession(
        events_pb2.GetSessionRequest(id=template["session"]), timeout=RPC_TIMEOUT
    )
    assert 0 < len(first.events) < 20 and first.next_events_page_token
    seen = [e.hf_event_id for e in first.events]
    token = first.next_events_page_token
    for _ in range(MAX_PAGES):
        if not token:
            break
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(session=template["session"], page_token=token),
            timeout=RPC_TIMEOUT,
        )
        assert page.ByteSize() < 4 * 1024 * 1024
        seen.extend(e.hf_event_id for e in page.events)
        token = page.next_page_token
    else:
        raise AssertionError(f"ListEvents still paging after {MAX_PAGES} pages")
    assert seen == [e["hf_event_id"] for e in big]


async def test_pages_of_non_ascii_events_stay_under_the_message_limit(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    _, address = await start_controller(**store_overrides)
    template = session_events("edge1")[5]
    # 240,000 bytes in UTF-8 (under the event size limit) but 60,000 characters: 40 of
    # them are 2.4 million characters, 9.6 MB.
    heavy = [
        dict(template, hf_event_id=str(uuid.uuid4()), input=f"{n}:" + "\U0001f608" * 60_000)
        for n in range(40)
    ]
    await stream_all(fleet_pki, address, "edge1", batches(heavy, size=8))
    stub = admin_stub(fleet_pki, address)
    first = await stub.GetSession(
        events_pb2.GetSessionRequest(id=template["session"]), timeout=RPC_TIMEOUT
    )
    assert 0 < len(first.events) < 40 and first.next_events_page_token
    assert first.ByteSize() < 4 * 1024 * 1024
    seen = [e.hf_event_id for e in first.events]
    token = first.next_events_page_token
    for _ in range(MAX_PAGES):
        if not token:
            break
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(session=template["session"], page_token=token),
            timeout=RPC_TIMEOUT,
        )
        assert page.events and page.ByteSize() < 4 * 1024 * 1024
        seen.extend(e.hf_event_id for e in page.events)
        token = page.next_page_token
    else:
        raise AssertionError(f"ListEvents still paging after {MAX_PAGES} pages")
    assert seen == [e["hf_event_id"] for e in heavy]
    assert json.loads(page.events[-1].json)["input"] == heavy[-1]["input"]


async def test_stats_of_huge_attacker_texts_fit_in_a_reply(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    _, address = await start_controller(**store_overrides)
    logins = []
    for n in range(20):
        # 120,000 bytes each: 20 usernames and 20 passwords are more than a 4 MiB reply.
        event = session_events("edge1", f"198.51.100.{n + 1}")[3]
        event["username"] = f"{n:02}" + "\U0001f464" * 30_000
        event["password"] = f"{n:02}" + "\U0001f511" * 30_000
        event["message"] = "login attempt succeeded"
        logins.append(event)
    upload = session_events("edge1")[6]
    upload["shasum"] = "f" * 100_000
    upload["filename"] = "\U0001f4c4" * 30_000
    await stream_all(fleet_pki, address, "edge1", batches([*logins, upload], size=4))
    stub = admin_stub(fleet_pki, address)
    stats = await stub.GetEventStats(events_pb2.GetEventStatsRequest(top=20), timeout=RPC_TIMEOUT)
    assert stats.ByteSize() < 4 * 1024 * 1024
    cut = MAX_STATS_KEY - 1
    for top, field in ((stats.top_usernames, "username"), (stats.top_passwords, "password")):
        assert sorted((k.key, k.count) for k in top) == sorted(
            (e[field][:cut] + "\u2026", 1) for e in logins
        )
    [file] = stats.top_uploads
    assert (file.sha256, file.example_name, file.count) == (
        "f" * cut + "\u2026",
        upload["filename"][:cut] + "\u2026",
        1,
    )
    # Short keys stay whole.
    assert [(k.key, k.count) for k in stats.sessions_per_sensor] == [("edge1", 21)]


async def test_pages_of_sessions_with_huge_client_versions_stay_under_the_message_limit(
    store_overrides: dict[str, Any], start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    _, address = await start_controller(**store_overrides)
    versions = []
    for n in range(20):
        # 240,000 bytes of client version per session: 20 sessions are 4.8 MB.
        event = session_events("edge1", f"198.51.100.{n + 1}")[1]
        event["version"] = f"{n:02}" + "\U0001f916" * 60_000
        event["message"] = "Remote SSH version"
        versions.append(event)
    await stream_all(fleet_pki, address, "edge1", batches(versions, size=8))
    stub = admin_stub(fleet_pki, address)
    seen: list[str] = []
    token = ""
    for _ in range(MAX_PAGES):
        page = await stub.ListSessions(
            events_pb2.ListSessionsRequest(page_size=100, page_token=token), timeout=RPC_TIMEOUT
        )
        assert page.sessions and page.ByteSize() < 4 * 1024 * 1024
        seen.extend(s.client_version for s in page.sessions)
        token = page.next_page_token
        if not token:
            break
    else:
        raise AssertionError(f"ListSessions still paging after {MAX_PAGES} pages")
    assert sorted(seen) == sorted(e["version"] for e in versions)
