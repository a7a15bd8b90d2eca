"""Closing an attacker's connection without waiting for ever on a client that never reads.

``transport.close()`` keeps the connection until its write buffer has drained, which a
client that stopped reading never lets happen: the buffer (up to ``write_buffer_high``)
and the socket would stay after the session has released its admission slot. Both
frontends (the SSH pump and the Telnet session) close through :func:`close_with_linger`.
"""

from __future__ import annotations

import asyncio

# Seconds a closing connection may spend flushing its last bytes to the attacker.
CLOSE_LINGER = 5.0


def close_with_linger(transport: asyncio.WriteTransport) -> None:
    """Close ``transport``, flushing what is queued for at most CLOSE_LINGER seconds.

    The abort is armed even when the transport is already closing: whoever closed it
    (telnetlib3 does on ``DO LOGOUT`` or EOF) may not have. Aborting a transport that
    is already gone does nothing.
    """
    transport.close()
    # Read at call time, so tests can shorten it.
    asyncio.get_running_loop().call_later(CLOSE_LINGER, transport.abort)
