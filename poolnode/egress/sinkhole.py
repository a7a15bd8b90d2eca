"""The sinkhole: accepts guests' TCP to any address and port, records, answers a dead end.

Guests' connections arrive here redirected (see :mod:`poolnode.egress.netfilter`); the
address and port the guest asked for are read back from conntrack. The sinkhole reads
a bounded prefix of what the guest sends (until an HTTP request's headers or a TLS
record are complete, ``capture_bytes``, or ``read_timeout``), names it
(:mod:`poolnode.egress.sniff`) and reports ``honeyfleet.egress.connect``. An HTTP
request gets ``404 Not Found``; anything else is closed. Under ``fetch``, an HTTP GET is
fetched through the operator's proxy instead and the body served to the guest
(``cowrie.session.file_download``, or ``cowrie.session.file_download.failed`` and 404).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass

from honeyfleet.outbox import Outbox
from honeyfleet.v1 import artefact_pb2
from poolnode.egress.fetch import Download, Fetcher, FetchFailed
from poolnode.egress.report import CONNECT, DOWNLOAD, Reporter
from poolnode.egress.sniff import Sniffed, complete, sniff
from poolnode.metrics import PoolMetrics

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
DEAD_END = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class SinkholeLimits:
    """How much a guest's connection may cost the sinkhole."""

    capture_bytes: int
    read_timeout: float
    max_connections: int
    """Per guest address, at once."""


class Sinkhole:
    """Handles redirected guest connections (``handle`` is an asyncio server callback)."""

    def __init__(
        self,
        reporter: Reporter,
        limits: SinkholeLimits,
        fetcher: Fetcher | None = None,
        metrics: PoolMetrics | None = None,
    ) -> None:
        self._reporter = reporter
        self._limits = limits
        self._metrics = metrics
        self._fetcher = fetcher
        self._open: Counter[str] = Counter()
        self._handlers: set[asyncio.Task[None]] = set()
        self.artefacts: Outbox | None = None
        """Where downloads are queued for the controller's artefact store (None: kept
        in downloads/ only)."""
        self.refused = 0
        """Connections closed at once: their guest held ``max_connections`` already."""

    def open_connections(self, guest_ip: str) -> int:
        """Connections the guest at ``guest_ip`` holds open now."""
        return self._open[guest_ip]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Record one guest connection and answer it."""
        guest_ip = str(writer.get_extra_info("peername")[0])
        dst_ip, dst_port = original_destination(writer)
        if self._open[guest_ip] >= self._limits.max_connections:
            self.refused += 1
            if self._metrics is not None:
                self._metrics.egress_refused.inc()
            writer.close()
            return
        self._open[guest_ip] += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            data = await self._read(reader)
            seen = sniff(data, dst_ip, dst_port)
            self._reporter.report(
                guest_ip,
                CONNECT,
                "honeyfleet.egress.connect",
                "Guest connection to {dst_ip}:{dst_port} ({kind})",
                dst_ip=dst_ip,
                dst_port=dst_port,
                transport="tcp",
                kind=seen.kind,
                **seen.fields,
            )
            answer, download = await self._answer(guest_ip, seen)
            writer.write(answer)
            await writer.drain()
            if download is not None and self.artefacts is not None:
                # After the guest has its file: the store's copy is no hurry.
                await self.artefacts.put(
                    download.path,
                    artefact_pb2.ARTEFACT_KIND_DOWNLOAD,
                    session=self._reporter.session_of(guest_ip),
                    filename=download.url,
                    sha256=download.shasum,
                )
        except OSError as e:
            log.debug("guest %s connection: %s", guest_ip, e)
        except asyncio.CancelledError:
            # Only close() cancels a handler; ending quietly spares asyncio's server
            # callback (Python 3.11) a traceback for a task it did not expect cancelled.
            pass
        finally:
            self._handlers.discard(task)
            self._open[guest_ip] -= 1
            if not self._open[guest_ip]:
                del self._open[guest_ip]
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        """End the connections in progress (the listener is closed first)."""
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        """The connection's prefix: bounded in bytes and time."""
        data = b""
        deadline = time.monotonic() + self._limits.read_timeout
        while len(data) < self._limits.capture_bytes and not complete(data):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(
                    reader.read(self._limits.capture_bytes - len(data)), left
                )
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
        return data

    async def _answer(self, guest_ip: str, seen: Sniffed) -> tuple[bytes, Download | None]:
        """What the guest gets back (a download under ``fetch``, else a dead end), and
        the download."""
        if seen.kind != "http":
            return b"", None
        if self._fetcher is None or seen.fields["method"] != "GET":
            return DEAD_END, None
        url = seen.fields["url"]
        try:
            download = await self._fetcher.fetch(url, seen.fields.get("user_agent"))
        except FetchFailed as e:
            self._reporter.report(
                guest_ip,
                DOWNLOAD,
                "cowrie.session.file_download.failed",
                "Attempt to download file(s) from URL ({url}) failed: {reason}",
                url=url,
                reason=str(e),
            )
            return DEAD_END, None
        self._reporter.report(
            guest_ip,
            DOWNLOAD,
            "cowrie.session.file_download",
            "Downloaded URL ({url}) with SHA-256 {shasum} to {outfile}",
            url=url,
            outfile=str(download.path),
            shasum=download.shasum,
            size=len(download.body),
        )
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(download.body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + download.body, download


def original_destination(writer: asyncio.StreamWriter) -> tuple[str, int]:
    """Where the guest meant to connect: conntrack's original destination of a
    redirected connection, else the address it reached (a connection not redirected)."""
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        return socket.inet_ntoa(packed), port
    except OSError:
        host, port = writer.get_extra_info("sockname")[:2]
        return str(host), int(port)
