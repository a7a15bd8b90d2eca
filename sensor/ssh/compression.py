"""``zlib@openssh.com`` with bounded inflation: OpenSSH's offer without its bomb.

Debian 12's sshd offers ``none,zlib@openssh.com``, so the sensor keeps the offer. asyncssh
inflates each packet with no bound of its own: one ~200 KiB packet of zeros inflates to
200 MB. The decompressor registered here (through asyncssh's compression registry,
:func:`asyncssh.compression.register_compression_alg`, under the same name, so it replaces
asyncssh's for every connection of the process) bounds what it inflates:

* per packet, to ``MAX_INFLATED_PACKET`` (asyncssh's own packet bound; OpenSSH's
  PACKET_MAX_SIZE): a packet that would inflate further fails decompression, which
  asyncssh turns into a disconnect, as OpenSSH's "packet too big" does;
* per connection, to the budget set by :func:`limit_inflation` in the task that runs the
  connection (asyncssh makes a decompressor at each key exchange and passes it nothing,
  so the connection's budget reaches it as a context variable, which the transport's
  callbacks inherit from that task). Past it, ``on_exceeded`` is told why and
  decompression fails.
"""

from __future__ import annotations

import contextvars
import zlib
from collections.abc import Callable

from asyncssh.compression import Compressor, Decompressor, register_compression_alg

from sensor.config import ASYNCSSH_MAX_PACKET

MAX_INFLATED_PACKET = ASYNCSSH_MAX_PACKET
NAME = b"zlib@openssh.com"


class InflationBudget:
    """Bytes one connection may still inflate, and who is told when they run out."""

    __slots__ = ("_on_exceeded", "left", "max_bytes")

    def __init__(self, max_bytes: int, on_exceeded: Callable[[str], None]) -> None:
        self.max_bytes = max_bytes
        self.left = max_bytes
        self._on_exceeded = on_exceeded

    def take(self, size: int) -> bool:
        """Spend ``size`` bytes; False (and say why, once) past the budget."""
        if size > self.left:
            self.exceeded(f"more than {self.max_bytes} bytes inflated")
            return False
        self.left -= size
        return True

    def exceeded(self, reason: str) -> None:
        """Tell the connection why its decompression fails (first reason only)."""
        on_exceeded, self._on_exceeded = self._on_exceeded, lambda _: None
        on_exceeded(reason)


_budget: contextvars.ContextVar[InflationBudget | None] = contextvars.ContextVar(
    "honeyfleet_inflation_budget", default=None
)


def limit_inflation(max_bytes: int, on_exceeded: Callable[[str], None]) -> None:
    """Bound inflation for the connection asyncssh is about to run in the current task."""
    _budget.set(InflationBudget(max_bytes, on_exceeded))


class BoundedInflate(Decompressor):
    """zlib inflation of one direction of one connection, bounded per packet and in total."""

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj()
        self._budget = _budget.get()

    def decompress(self, data: bytes) -> bytes | None:
        """The packet's payload; None (asyncssh disconnects) if corrupt or over a bound."""
        try:
            # One byte more than allowed tells "exactly at the bound" from "over it".
            out = self._zlib.decompress(data, MAX_INFLATED_PACKET + 1)
        except zlib.error:
            return None
        if len(out) > MAX_INFLATED_PACKET or self._zlib.unconsumed_tail:
            if self._budget is not None:
                self._budget.exceeded(
                    f"compressed packet inflates past {MAX_INFLATED_PACKET} bytes"
                )
            return None
        if self._budget is not None and not self._budget.take(len(out)):
            return None
        return out


class Deflate(Compressor):
    """zlib deflation with a sync flush per packet, as asyncssh's own (output is ours)."""

    def __init__(self) -> None:
        self._zlib = zlib.compressobj()

    def compress(self, data: bytes) -> bytes | None:
        """The packet's payload, compressed."""
        try:
            return self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        except zlib.error:
            return None


_installed = False


def install() -> None:
    """Register the bounded decompressor as ``zlib@openssh.com`` (once per process)."""
    global _installed  # asyncssh's registry is process-wide too
    if _installed:
        return
    # after_auth=True as asyncssh registers it; default=False: asyncssh's own default
    # list already names it (registering appends the name to the supported list only).
    register_compression_alg(NAME, Deflate, BoundedInflate, True, False)
    _installed = True
