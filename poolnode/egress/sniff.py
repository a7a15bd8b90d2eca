"""What a guest's first bytes on a connection say: an HTTP request, a TLS hello, or data.

The sinkhole reads a bounded prefix of each connection (``egress_capture_bytes``) and
this module names what it holds, for the connection's event and for ``fetch``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any

REQUEST_LINE = re.compile(rb"([A-Z]{3,10}) (\S{1,8192}) HTTP/(1\.[01])\r?\n")
HEADER_END = re.compile(rb"\r?\n\r?\n")
TLS_HANDSHAKE = 0x16
CLIENT_HELLO = 1
SERVER_NAME = 0
DATA_SHOWN = 256
"""Bytes of an unrecognised stream shown in its event (escaped)."""


@dataclass(frozen=True)
class Sniffed:
    """What the prefix of a connection is."""

    kind: str
    """"http", "tls", "data" (something else) or "none" (the guest sent nothing)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """Event fields: ``method``, ``url``, ``host``, ``user_agent`` for HTTP; ``sni`` for
    TLS; ``data`` (escaped) otherwise."""


def complete(data: bytes) -> bool:
    """Whether ``data`` holds enough to name it: HTTP headers, a TLS record, or any
    bytes that start neither."""
    if not data:
        return False
    if _looks_http(data):
        return HEADER_END.search(data) is not None
    if data[0] == TLS_HANDSHAKE:
        return len(data) >= 5 and len(data) >= 5 + struct.unpack_from("!H", data, 3)[0]
    return True


def sniff(data: bytes, dst: str, port: int, scheme: str = "http") -> Sniffed:
    """Name the prefix ``data`` of a connection to ``dst:port`` (``scheme`` "https" for
    what a guest sent inside TLS)."""
    if not data:
        return Sniffed("none")
    http = _http(data, dst, port, scheme)
    if http is not None:
        return Sniffed("http", http)
    sni = _sni(data)
    if sni is not None:
        return Sniffed("tls", {"sni": sni} if sni else {})
    return Sniffed("data", {"data": escaped(data)})


def _looks_http(data: bytes) -> bool:
    """Whether ``data`` starts like an HTTP request (a method, a space)."""
    return re.match(rb"[A-Z]{3,10} ", data[:11]) is not None


def _http(data: bytes, dst: str, port: int, scheme: str) -> dict[str, Any] | None:
    """An HTTP request's method, URL, Host and User-Agent; None if ``data`` is not one."""
    line = REQUEST_LINE.match(data)
    if line is None:
        return None
    method, target = line.group(1).decode(), line.group(2).decode("ascii", "backslashreplace")
    end = HEADER_END.search(data)
    headers = _headers(data[line.end() : end.start() if end else len(data)])
    default = 443 if scheme == "https" else 80
    host = headers.get("host") or (dst if port == default else f"{dst}:{port}")
    url = target if "://" in target or method == "CONNECT" else f"{scheme}://{host}{target}"
    fields: dict[str, Any] = {"method": method, "url": url, "host": host}
    if "user-agent" in headers:
        fields["user_agent"] = headers["user-agent"]
    return fields


def _headers(block: bytes) -> dict[str, str]:
    """Header fields by lower-case name (the first of each)."""
    headers: dict[str, str] = {}
    for raw in re.split(rb"\r?\n", block):
        name, sep, value = raw.partition(b":")
        if sep:
            key = name.strip().decode("ascii", "backslashreplace").lower()
            headers.setdefault(key, value.strip().decode("ascii", "backslashreplace"))
    return headers


def _sni(data: bytes) -> str | None:
    """The server name of a TLS ClientHello ("" when it names none); None if not one."""
    try:
        if data[0] != TLS_HANDSHAKE or data[5] != CLIENT_HELLO:
            return None
        # record header (5), handshake header (4), version (2), random (32)
        offset = 5 + 4 + 2 + 32
        offset += 1 + data[offset]  # session id
        offset += 2 + struct.unpack_from("!H", data, offset)[0]  # cipher suites
        offset += 1 + data[offset]  # compression methods
        end = offset + 2 + struct.unpack_from("!H", data, offset)[0]
        offset += 2
        while offset + 4 <= min(end, len(data)):
            kind, length = struct.unpack_from("!HH", data, offset)
            offset += 4
            if kind == SERVER_NAME:
                # list length (2), name type (1), name length (2), name
                size = struct.unpack_from("!H", data, offset + 3)[0]
                return data[offset + 5 : offset + 5 + size].decode("ascii", "backslashreplace")
            offset += length
    except (IndexError, struct.error):
        return None
    return ""


def tftp_request(payload: bytes) -> dict[str, Any] | None:
    """A TFTP read or write request's ``method`` and ``filename`` (None if not one)."""
    if len(payload) < 4 or payload[:2] not in (b"\0\1", b"\0\2"):
        return None
    name, sep, rest = payload[2:].partition(b"\0")
    mode = rest.partition(b"\0")[0].lower()
    if not sep or not name or mode not in (b"octet", b"netascii", b"mail"):
        return None
    method = "read" if payload[1] == 1 else "write"
    return {"method": method, "filename": name.decode("ascii", "backslashreplace")}


def escaped(data: bytes) -> str:
    """Bytes shown as text: printable ASCII as is, the rest escaped."""
    return data[:DATA_SHOWN].decode("latin-1").encode("unicode_escape").decode("ascii")
