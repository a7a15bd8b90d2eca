"""The sinkhole: accepts guests' TCP to any address and port, records, answers a dead end.

Guests' connections arrive here redirected (see :mod:`poolnode.egress.netfilter`); the
address and port the guest asked for are read back from conntrack. The sinkhole reads
a bounded prefix of what the guest sends (until an HTTP request's headers or a TLS
record are complete, ``capture_bytes``, or ``read_timeout``), names it
(:mod:`poolnode.egress.sniff`) and reports ``honeyfleet.egress.connect``. An HTTP
request gets ``404 Not Found``; anything else is closed. Under ``fetch``, an HTTP GET is
fetched through the operator's proxy instead and the body served to the guest
(``cowrie.session.file_download``, or ``cowrie.session.file_download.failed`` and 404).
Port 21 gets an FTP dialogue (:mod:`poolnode.egress.ftp`), whose passive data
connections come back here and are handed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from honeyfleet.outbox import Outbox
from honeyfleet.v1 import artefact_pb2
from poolnode.downloads import Downloads
from poolnode.egress.dnsserver import RecentNames
from poolnode.egress.fetch import Download, Fetcher, FetchFailed
from poolnode.egress.ftp import FtpDialogue
from poolnode.egress.intercept import Leaves, TlsStream
from poolnode.egress.report import CONNECT, DOWNLOAD, Reporter
from poolnode.egress.sniff import Sniffed, complete, sniff
from poolnode.metrics import PoolMetrics

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
FTP_PORT = 21
DATA_PORTS = (30000, 60000)
"""Passive FTP data ports announced (any port reaches the sinkhole)."""
DATA_HOLD = 60.0
"""Seconds beyond read_timeout a data connection is held for its dialogue."""
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
        *,
        names: RecentNames | None = None,
        address: str = "",
    ) -> None:
        """``names`` and ``address`` (the sinkhole's, which DNS answers give) name the
        server of a connection without a Host header: the guest's last lookup."""
        self.reporter = reporter
        self._limits = limits
        self._metrics = metrics
        self._names = names
        self._address = address
        self._fetcher = fetcher
        self._open: Counter[str] = Counter()
        self._handlers: set[asyncio.Task[None]] = set()
        # Passive FTP data ports announced to guests, by (guest address, port).
        self._data_ports: dict[tuple[str, int], asyncio.Future[asyncio.StreamWriter]] = {}
        self.artefacts: Outbox | None = None
        """Where downloads are queued for the controller's artefact store (None: kept
        in downloads/ only)."""
        self.leaves: Leaves | None = None
        """Leaves of the interception CA (None: TLS is recorded by its server name only)."""
        self.downloads: Downloads | None = None
        """The downloads directory's pruner, told which files are being served."""
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
            data_channel = self._data_ports.pop((guest_ip, dst_port), None)
            if data_channel is not None:
                await self._lend(writer, data_channel)
            elif dst_port == FTP_PORT:
                await self._ftp(reader, writer, guest_ip, dst_ip)
            else:
                await self._sniffed(reader, writer, guest_ip, dst_ip, dst_port)
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

    async def _read(self, read: Callable[[int], Awaitable[bytes]]) -> bytes:
        """The connection's prefix (``read`` is a stream's): bounded in bytes and time."""
        data = b""
        deadline = time.monotonic() + self._limits.read_timeout
        while len(data) < self._limits.capture_bytes and not complete(data):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(read(self._limits.capture_bytes - len(data)), left)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
        return data

    async def _sniffed(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        guest_ip: str,
        dst_ip: str,
        dst_port: int,
    ) -> None:
        """A connection where the guest speaks first: read, name, report, answer."""
        prefix = await self._read(reader.read)
        seen = sniff(prefix, dst_ip, dst_port)
        if seen.kind == "tls" and self.leaves is not None:
            await self._intercepted(reader, writer, guest_ip, (dst_ip, dst_port), prefix, seen)
            return
        self._report_connect(guest_ip, dst_ip, dst_port, seen.kind, seen.fields)
        if seen.kind == "http":
            await self._answer(guest_ip, seen.fields, _sender(writer))

    async def _intercepted(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        guest_ip: str,
        dst: tuple[str, int],
        prefix: bytes,
        hello: Sniffed,
    ) -> None:
        """TLS a guest opened: answered with a leaf for its server name, then the request
        inside read, reported and answered like plain HTTP (``https://`` URLs). A guest
        that refuses the leaf (its trust store lacks the CA) is reported as before, by
        server name."""
        assert self.leaves is not None
        sni = hello.fields.get("sni") or ""
        context = await self.leaves.context(sni or dst[0])
        tls = TlsStream(context, reader.read, writer.write, writer.drain, prefix)
        try:
            await asyncio.wait_for(tls.handshake(), self._limits.read_timeout)
        except (ssl.SSLError, TimeoutError) as e:
            reason = e.reason if isinstance(e, ssl.SSLError) else "no handshake in time"
            fields = {**hello.fields, "tls_error": str(reason or e)}
            self._report_connect(guest_ip, *dst, "tls", fields)
            return
        seen = sniff(await self._read(tls.read), *dst, scheme="https")
        fields = {**seen.fields, **({"sni": sni} if sni else {})}
        self._report_connect(guest_ip, *dst, "https" if seen.kind == "http" else seen.kind, fields)
        if seen.kind == "http":
            await self._answer(guest_ip, seen.fields, tls.write)
        await tls.close()

    async def _answer(
        self,
        guest_ip: str,
        request: dict[str, Any],
        send: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Answer an HTTP request: a dead end, or under fetch a GET's download."""
        download = None
        if self._fetcher is not None and request["method"] == "GET":
            download = await self.download(guest_ip, request["url"], request.get("user_agent"))
        if download is None:
            await send(DEAD_END)
            return
        with self.holding(download):
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {len(download.body)}\r\nConnection: close\r\n\r\n"
            )
            await send(head.encode() + download.body)
            await self.keep(guest_ip, download)

    async def _ftp(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        guest_ip: str,
        dst_ip: str,
    ) -> None:
        """A connection to port 21: an FTP dialogue, reported once it ends."""
        announced: list[int] = []
        downloads: list[Download] = []
        holds = contextlib.ExitStack()

        def open_data() -> tuple[int, asyncio.Future[asyncio.StreamWriter]]:
            port = self._free_data_port(guest_ip)
            future: asyncio.Future[asyncio.StreamWriter] = (
                asyncio.get_running_loop().create_future()
            )
            self._data_ports[(guest_ip, port)] = future
            announced.append(port)
            return port, future

        async def fetch(url: str) -> Download | None:
            download = await self.download(guest_ip, url, None)
            if download is not None:
                holds.enter_context(self.holding(download))
                downloads.append(download)
            return download

        looked_up = self._names.last(guest_ip) if self._names is not None else None
        dialogue = FtpDialogue(
            reader,
            writer,
            host=dst_ip,
            server=looked_up if looked_up and dst_ip == self._address else dst_ip,
            timeout=self._limits.read_timeout,
            open_data=open_data,
            fetch=fetch if self._fetcher is not None else None,
        )
        with holds:
            try:
                seen = await dialogue.run()
            finally:
                for port in announced:
                    future = self._data_ports.pop((guest_ip, port), None)
                    if future is not None:
                        future.cancel()
            fields: dict[str, Any] = {"username": seen.username, "password": seen.password}
            if seen.urls:
                fields["url"] = seen.urls[0]
            self._report_connect(guest_ip, dst_ip, FTP_PORT, "ftp", fields)
            for download in downloads:
                await self.keep(guest_ip, download)

    async def _lend(
        self, writer: asyncio.StreamWriter, channel: asyncio.Future[asyncio.StreamWriter]
    ) -> None:
        """Hand a passive data connection to its FTP dialogue; wait until it is done."""
        if channel.done():
            return
        channel.set_result(writer)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), self._limits.read_timeout + DATA_HOLD)

    def _free_data_port(self, guest_ip: str) -> int:
        """A passive data port not announced to this guest yet (nor FTP's own)."""
        while True:
            port = secrets.randbelow(DATA_PORTS[1] - DATA_PORTS[0]) + DATA_PORTS[0]
            if (guest_ip, port) not in self._data_ports:
                return port

    def _report_connect(
        self, guest_ip: str, dst_ip: str, dst_port: int, kind: str, fields: dict[str, Any]
    ) -> None:
        """Report a connection the sinkhole took."""
        self.reporter.report(
            guest_ip,
            CONNECT,
            "honeyfleet.egress.connect",
            "Guest connection to {dst_ip}:{dst_port} ({kind})",
            dst_ip=dst_ip,
            dst_port=dst_port,
            transport="tcp",
            kind=kind,
            **fields,
        )

    async def download(self, guest_ip: str, url: str, user_agent: str | None) -> Download | None:
        """Fetch ``url`` for a guest and report the download or its failure."""
        assert self._fetcher is not None
        try:
            download = await self._fetcher.fetch(url, user_agent)
        except FetchFailed as e:
            self.reporter.report(
                guest_ip,
                DOWNLOAD,
                "cowrie.session.file_download.failed",
                "Attempt to download file(s) from URL ({url}) failed: {reason}",
                url=url,
                reason=str(e),
            )
            return None
        self.reporter.report(
            guest_ip,
            DOWNLOAD,
            "cowrie.session.file_download",
            "Downloaded URL ({url}) with SHA-256 {shasum} to {outfile}",
            url=url,
            outfile=str(download.path),
            shasum=download.shasum,
            size=len(download.body),
            **({"final_url": download.final_url} if download.final_url else {}),
        )
        return download

    def holding(self, download: Download) -> contextlib.AbstractContextManager[None]:
        """Keep ``download``'s file from pruning while it is served and queued."""
        if self.downloads is None:
            return contextlib.nullcontext()
        return self.downloads.hold(download.shasum)

    async def keep(self, guest_ip: str, download: Download) -> None:
        """Queue a download for the controller's artefact store (after the guest has it:
        the store's copy is no hurry)."""
        if self.artefacts is not None:
            await self.artefacts.put(
                download.path,
                artefact_pb2.ARTEFACT_KIND_DOWNLOAD,
                session=self.reporter.session_of(guest_ip),
                filename=download.url,
                sha256=download.shasum,
            )


def _sender(writer: asyncio.StreamWriter) -> Callable[[bytes], Awaitable[None]]:
    """Send bytes on a plain stream: write, then wait until they are on their way."""

    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    return send


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
