"""Egress benchmark: what a guest's DNS queries and sinkhole connections cost the node.

    .venv/bin/python bench/egress.py                     # a few seconds
    .venv/bin/python bench/egress.py --queries 20000 --connections 5000 --https 2000

The node's DNS server and sinkhole run in this process on loopback (no redirect rules:
the "guest" talks to them directly), each event spooled to a real SQLite spool as on a
pool node, with the per-guest bound lifted so every event is made. ``--queries`` DNS
queries are sent one at a time (query, answer, next), then ``--connections`` HTTP
requests, ``--parallel`` connections at once, then ``--https`` HTTPS requests the same way
(each a TLS handshake with a leaf of the node's interception CA, which the client trusts
as a guest image does; server names cycle over ``--names``, so leaves are minted once
each and then served from the cache). Printed: rate, and this process's CPU
per item (the client's share included: it runs here too, so the figure is an upper
bound). Run under ``flock /tmp/hf-bench.lock``; other load on the machine shows.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from honeyfleet.config import parse_section  # noqa: E402
from honeyfleet.eventlog import EventLog, SpoolMetrics  # noqa: E402
from honeyfleet.spool import Spool  # noqa: E402
from poolnode.config import PoolNodeConfig  # noqa: E402
from poolnode.egress import Egress  # noqa: E402
from poolnode.egress.dns import HEADER  # noqa: E402
from poolnode.events import NodeEvents  # noqa: E402

GUEST = "127.0.0.1"
REQUEST = b"GET /bins/x86 HTTP/1.1\r\nHost: cnc.example.org\r\nUser-Agent: Wget\r\n\r\n"


def free_port() -> int:
    """An unused loopback port (TCP and UDP are both free in practice)."""
    with socket.socket() as s:
        s.bind((GUEST, 0))
        return int(s.getsockname()[1])


def dns_query(ident: int) -> bytes:
    """An A query for a name that changes with ``ident``."""
    name = f"n{ident}.example.org"
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return HEADER.pack(ident & 0xFFFF, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


async def queries(port: int, count: int) -> float:
    """Send ``count`` queries one after another; seconds taken."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, (GUEST, port))
        started = time.perf_counter()
        for i in range(count):
            await loop.sock_sendall(s, dns_query(i))
            await asyncio.wait_for(loop.sock_recv(s, 512), 5)
        return time.perf_counter() - started


async def connections(port: int, count: int, parallel: int) -> float:
    """Make ``count`` HTTP requests to the sinkhole, ``parallel`` at once; seconds taken."""
    left = iter(range(count))

    async def worker() -> None:
        for _ in left:
            reader, writer = await asyncio.open_connection(GUEST, port)
            writer.write(REQUEST)
            answer = await asyncio.wait_for(reader.read(), 10)
            assert answer.startswith(b"HTTP/1.1 404"), answer
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(parallel)))
    return time.perf_counter() - started


async def https(port: int, count: int, parallel: int, ca: Path, names: int) -> float:
    """Make ``count`` HTTPS requests to the sinkhole, ``parallel`` at once; seconds taken."""
    context = ssl.create_default_context(cafile=str(ca))
    left = iter(range(count))

    async def worker() -> None:
        for i in left:
            host = f"h{i % names}.example.org"
            reader, writer = await asyncio.open_connection(
                GUEST, port, ssl=context, server_hostname=host
            )
            writer.write(REQUEST.replace(b"cnc.example.org", host.encode()))
            answer = await asyncio.wait_for(reader.read(), 10)
            assert answer.startswith(b"HTTP/1.1 404"), answer
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(parallel)))
    return time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        table = {
            "backend_pass": "x",
            "state_dir": tmp,
            "network_address": f"{GUEST}/8",
            "egress_dns_port": free_port(),
            "egress_sinkhole_port": free_port(),
            "egress_events_burst": 10_000_000,
            "egress_max_connections": args.parallel * 2,
        }
        config = parse_section(PoolNodeConfig, "poolnode", table, base_dir=Path(tmp), env={})
        spool = Spool(Path(tmp) / "spool.sqlite3", max_bytes=1 << 30, near_full=0.9)
        log = EventLog(spool, SpoolMetrics("bench", CollectorRegistry()), instance_uuid="b")
        egress = Egress(config, lambda _: "g1", redirect=False)
        egress.events = NodeEvents(log, pool_node="bench")
        await egress.start()
        try:
            for what, run, count in (
                ("DNS queries", queries(config.egress_dns_port, args.queries), args.queries),
                (
                    "sinkhole HTTP connections",
                    connections(config.egress_sinkhole_port, args.connections, args.parallel),
                    args.connections,
                ),
                (
                    "sinkhole HTTPS connections (intercepted)",
                    https(
                        config.egress_sinkhole_port,
                        args.https,
                        args.parallel,
                        config.egress_ca[0],
                        args.names,
                    ),
                    args.https,
                ),
            ):
                cpu = time.process_time()
                seconds = await run
                await log.flush()
                cpu = time.process_time() - cpu
                print(
                    f"{what}: {count} in {seconds:.2f} s = {count / seconds:,.0f}/s; "
                    f"CPU {cpu * 1e6 / count:.0f} us each (client included)"
                )
            print(f"events suppressed: {egress.reporter.suppressed}")
        finally:
            await egress.stop()
            await log.flush()
            await log.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--https", type=int, default=1000)
    parser.add_argument("--names", type=int, default=8, help="server names HTTPS cycles over")
    parser.add_argument("--parallel", type=int, default=16)
    asyncio.run(main(parser.parse_args()))
