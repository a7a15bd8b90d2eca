"""Downloads for guests under ``fetch``: through the operator's egress only, bounded.

The pool node asks the configured HTTP proxy for the URL the guest asked the sinkhole
for (absolute-form, HTTP/1.0, so the body ends with the connection; an ``https://`` URL
through a CONNECT tunnel, the origin's certificate checked against the system's trust
store or ``egress_fetch_ca_bundle``); a ``tftp://`` URL
(which no HTTP proxy carries) is read with the node's own TFTP client from a socket
bound to ``egress_fetch_tftp_source``, the operator's way out. Either keeps at most
``max_bytes`` within ``timeout`` seconds, and stores the body once under its sha256 in
``state_dir/downloads`` (where files from guests' disks go too). Hosts are checked
against the deny list, then the allow list, before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from poolnode.egress import tftp

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
PARALLEL = 4
"""Downloads in flight at once, all guests together."""
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")
REDIRECTS = (b"301", b"302", b"303", b"307", b"308")
MAX_REDIRECTS = 3
TFTP_PORT = 69
SCHEMES = ("http", "https", "ftp", "tftp")


class FetchFailed(Exception):
    """A download that was refused or did not complete; the message says why."""


@dataclass(frozen=True)
class Download:
    """A fetched file, stored under its sha256."""

    url: str
    shasum: str
    path: Path
    body: bytes
    final_url: str = ""
    """Where the file came from after redirects ("" when not redirected)."""


class _Redirected(Exception):
    """The proxy's answer sends us elsewhere."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class Fetcher:
    """Fetches guests' downloads through the operator's proxy."""

    def __init__(
        self,
        proxy: str,
        downloads: Path,
        *,
        max_bytes: int,
        timeout: float,
        allow: tuple[str, ...] = (),
        deny: tuple[str, ...] = (),
        tftp_source: str = "",
        ca_bundle: Path | None = None,
    ) -> None:
        """``tftp_source``: the local address TFTP downloads leave from ("" any);
        ``ca_bundle``: the CAs HTTPS origins are checked against (None: the system's)."""
        host, _, port = proxy.rpartition(":")
        self._proxy = (host.strip("[]"), int(port))
        self.downloads = downloads
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._allow = tuple(p.lower() for p in allow)
        self._deny = tuple(p.lower() for p in deny)
        self._tftp_source = tftp_source
        self._tls = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
        self._slots = asyncio.Semaphore(PARALLEL)

    def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be fetched (None: it may)."""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            return f"{parts.scheme or 'no'} scheme: only {', '.join(SCHEMES)} URLs are fetched"
        host = (parts.hostname or "").lower()
        if not host:
            return "no host in the URL"
        if any(fnmatch.fnmatchcase(host, p) for p in self._deny):
            return f"{host} is on egress_fetch_deny"
        if self._allow and not any(fnmatch.fnmatchcase(host, p) for p in self._allow):
            return f"{host} is not on egress_fetch_allow"
        return None

    async def fetch(self, url: str, user_agent: str | None = None) -> Download:
        """Fetch ``url`` and store it; raises FetchFailed saying why not."""
        async with self._slots:
            try:
                final, body = await asyncio.wait_for(self._follow(url, user_agent), self._timeout)
            except TimeoutError:
                raise FetchFailed(f"no complete answer within {self._timeout:g} s") from None
            except tftp.TftpFailed as e:
                raise FetchFailed(f"TFTP: {e}") from None
            except ssl.SSLError as e:
                raise FetchFailed(f"TLS with {urlsplit(url).hostname}: {e.reason or e}") from None
            except OSError as e:
                if urlsplit(url).scheme == "tftp":
                    raise FetchFailed(f"TFTP: {e}") from None
                raise FetchFailed(f"proxy {self._proxy[0]}:{self._proxy[1]}: {e}") from None
        shasum = hashlib.sha256(body).hexdigest()
        path = self.downloads / shasum
        await asyncio.to_thread(_store, path, body)
        return Download(url, shasum, path, body, final if final != url else "")

    async def _follow(self, url: str, user_agent: str | None) -> tuple[str, bytes]:
        """The URL the body came from and the body, following up to MAX_REDIRECTS
        redirects, each target checked like the first URL."""
        for _ in range(MAX_REDIRECTS + 1):
            problem = self.refusal(url)
            if problem is not None:
                raise FetchFailed(problem)
            if urlsplit(url).scheme == "tftp":
                return url, await self._tftp(url)
            try:
                return url, await self._get(url, user_agent)
            except _Redirected as e:
                url = urljoin(url, e.location)
        raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")

    async def _tftp(self, url: str) -> bytes:
        """A ``tftp://`` URL's file, read directly (no proxy carries TFTP)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, parts.port or TFTP_PORT, family=family, type=socket.SOCK_DGRAM
        )
        address = str(infos[0][4][0]), int(infos[0][4][1])
        return await tftp.fetch(
            address,
            parts.path.lstrip("/"),
            source=self._tftp_source,
            max_bytes=self._max_bytes,
        )

    async def _get(self, url: str, user_agent: str | None) -> bytes:
        """The body of a 200 answer from the proxy to ``GET url``."""
        reader, writer = await asyncio.open_connection(*self._proxy, limit=MAX_HEADER_BYTES)
        try:
            parts = urlsplit(url)
            host = parts.netloc
            target = url
            if parts.scheme == "https":
                await self._tunnel(reader, writer, parts.hostname or "", parts.port or 443)
                target = parts.path + (f"?{parts.query}" if parts.query else "") or "/"
            agent = f"User-Agent: {_clean(user_agent)}\r\n" if user_agent else ""
            request = f"GET {target} HTTP/1.0\r\nHost: {host}\r\n{agent}Connection: close\r\n\r\n"
            writer.write(request.encode("ascii", "replace"))
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise FetchFailed("answer headers too long") from None
            except asyncio.IncompleteReadError:
                raise FetchFailed("connection closed before the answer's headers") from None
            status = STATUS_LINE.match(head)
            if status is None:
                raise FetchFailed("not an HTTP answer")
            location = re.search(rb"(?im)^location:\s*(\S+)\s*$", head)
            if status.group(1) in REDIRECTS and location is not None:
                raise _Redirected(location.group(1).decode("ascii", "replace"))
            if status.group(1) != b"200":
                raise FetchFailed(f"HTTP status {status.group(1).decode()}")
            length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            if length is not None and int(length.group(1)) > self._max_bytes:
                raise FetchFailed(f"{int(length.group(1))} bytes, over {self._max_bytes}")
            body = await reader.read(self._max_bytes + 1)
            while body and len(body) <= self._max_bytes:
                more = await reader.read(self._max_bytes + 1 - len(body))
                if not more:
                    break
                body += more
            if len(body) > self._max_bytes:
                raise FetchFailed(f"over {self._max_bytes} bytes")
            return body
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _tunnel(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> None:
        """Ask the proxy for a tunnel to ``host:port``, then speak TLS to the origin in it."""
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            raise FetchFailed("no answer to CONNECT from the proxy") from None
        status = STATUS_LINE.match(head)
        if status is None or status.group(1) != b"200":
            line = head.split(b"\r\n", 1)[0].decode("ascii", "replace")
            raise FetchFailed(f"the proxy refused CONNECT {authority}: {line}")
        await writer.start_tls(self._tls, server_hostname=host)


def _clean(value: str) -> str:
    """A header value from a guest, without anything that could end the header."""
    return re.sub(r"[\r\n]", " ", value)[:256]


def _store(path: Path, body: bytes) -> None:
    """Write a download once (blocking: run off the event loop); one fetched again is
    marked new, so pruning (:mod:`poolnode.downloads`) counts its age from now."""
    if path.exists():
        with contextlib.suppress(FileNotFoundError):  # pruned meanwhile: written below
            os.utime(path)
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    partial.write_bytes(body)
    partial.replace(path)
