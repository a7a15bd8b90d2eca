"""Refusing a connection at the door, as OpenSSH does, and reporting refusals at a bounded rate.

OpenSSH 9.2's sshd, past MaxStartups (or PerSourceMaxStartups), writes
``Exceeded MaxStartups\\r\\n`` and closes the socket: the client sees that line and a
FIN. The SSH frontend sends that text for every refusal (9.2 has no other); the Telnet
frontend sends nothing, as a telnetd behind tcpd does. Closing a socket while bytes the
client sent are still unread makes the kernel answer with an RST, and a client sends its
version line at once, so a refused connection is half-closed (FIN) after the text and
read (and its bytes dropped) until the client closes too, for at most REFUSAL_LINGER.
At most MAX_LINGERING refused connections linger at once; beyond that they are closed
straight away.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from honeyfleet.events import make_event, new_session_id, plain_ip
from sensor.events import EventLog

# Seconds a refused connection is read (and dropped) waiting for the client's close.
REFUSAL_LINGER = 2.0
MAX_LINGERING = 256


class _Refused(asyncio.Protocol):
    """A refused connection: what arrives is dropped; the client's EOF ends it."""

    def __init__(self, reporter: RefusalReporter) -> None:
        self._reporter = reporter

    def data_received(self, data: bytes) -> None:
        """Dropped: read only so that the close sends a FIN, not an RST."""

    def eof_received(self) -> bool:
        """The client closed its side: close ours."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Gone."""
        self._reporter.lingering -= 1


class RefusalReporter:
    """Refuses connections, counts them and reports them as one event per interval.

    However many connections a flood brings, it costs one event per interval, so it
    cannot eat the spool headroom kept for running sessions.
    """

    def __init__(
        self, events: EventLog, *, sensor: str, protocol: str, interval: float, text: bytes
    ) -> None:
        self._events = events
        self._sensor = sensor
        self._protocol = protocol
        self._interval = interval
        self._text = text
        self._refused = 0
        self._last_event = 0.0
        self.lingering = 0

    def refuse(self, transport: asyncio.Transport, src_ip: str, reason: str) -> None:
        """Say no like OpenSSH (its text, then FIN) and count the refusal."""
        transport.set_protocol(_Refused(self))
        self.lingering += 1
        if self._text:
            transport.write(self._text)
        if self.lingering > MAX_LINGERING:
            transport.close()
        else:
            try:
                if transport.can_write_eof():
                    transport.write_eof()
            except OSError:
                # The client reset the connection already (ENOTCONN): nothing to linger
                # for. abort() still ends it through _Refused, which uncounts it.
                transport.abort()
            else:
                transport.resume_reading()
                asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.abort)
        self._count(src_ip, reason, transport)

    def _count(self, src_ip: str, reason: str, transport: asyncio.Transport) -> None:
        """Count one refusal; emit the event (with this connection's ends) if it is time."""
        self._refused += 1
        now = time.monotonic()
        if now - self._last_event < self._interval:
            return
        self._events.emit(
            make_event(
                "honeyfleet.session.refused",
                f"Refused {self._refused} connection(s): {reason}",
                session=new_session_id(),
                src_ip=src_ip,
                sensor=self._sensor,
                sensor_uuid=self._events.sensor_uuid,
                protocol=self._protocol,
                **_endpoints(transport),
                reason=reason,
                count=self._refused,
            )
        )
        self._refused = 0
        self._last_event = now


def _endpoints(transport: asyncio.Transport) -> dict[str, Any]:
    """Cowrie's ``src_port``, ``dst_ip`` and ``dst_port`` of a connection (what is known)."""
    peer = transport.get_extra_info("peername")
    local = transport.get_extra_info("sockname")
    ends: dict[str, Any] = {}
    if peer:
        ends["src_port"] = peer[1]
    if local:
        ends["dst_ip"] = plain_ip(local[0])
        ends["dst_port"] = local[1]
    return ends
