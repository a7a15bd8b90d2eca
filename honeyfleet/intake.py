"""How long a call waited in the server's gRPC queues before its handler ran.

grpc.aio takes new calls from gRPC core one at a time per method, each through a turn
of the event loop: on a busy loop, unary calls queue in core, unbounded and unseen by
any handler, until their deadline. gRPC makes the caller's timeout a deadline when the
call arrives, so a caller that also sends its timeout (TIMEOUT_HEADER) lets the handler
compute that wait from two durations (no clocks of two hosts compared): the timeout
minus the time remaining. A server sheds calls that waited long, cheaply, on entry.
"""

from __future__ import annotations

from typing import Any

# Request metadata: the caller's timeout for this call, in milliseconds.
TIMEOUT_HEADER = "hf-timeout-ms"


def timeout_metadata(timeout: float) -> tuple[tuple[str, str], ...]:
    """The metadata a caller sends with a call made with ``timeout`` seconds."""
    return ((TIMEOUT_HEADER, str(round(timeout * 1000))),)


def queued_seconds(context: Any) -> float | None:
    """Seconds between the caller sending this call and its handler running.

    None when the caller sent no (usable) timeout or the call has no deadline.
    """
    remaining: float | None = context.time_remaining()
    sent = next((v for k, v in context.invocation_metadata() or () if k == TIMEOUT_HEADER), None)
    if remaining is None or not isinstance(sent, str) or not sent.isdigit():
        return None
    return max(int(sent) / 1000 - remaining, 0.0)
