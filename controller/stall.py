"""How long the controller could not listen: the lateness of a periodic job.

A job meant to run every ``period`` that runs much later than that shows the event
loop was stalled or overloaded. Liveness and expiry give that time back to the nodes
and leases they judge, so the controller's own busyness never kills a node that kept
heartbeating nor expires, in one burst after a stall, leases their sensors renewed.
"""

from __future__ import annotations

import asyncio
import time

# Lateness up to this many periods is ordinary scheduling jitter, not a stall.
TOLERANCE = 1.0
# Seconds between samples of the loop's lag.
LAG_PERIOD = 0.1


class StallMeter:
    """Measures, at each run of a periodic job, how late the run came."""

    def __init__(self, period: float) -> None:
        self._period = period
        self._last = time.monotonic()

    def stalled(self) -> float:
        """Seconds of this run's lateness beyond the tolerance (0 when on time)."""
        now = time.monotonic()
        late = now - self._last - self._period * (1 + TOLERANCE)
        self._last = now
        return max(late, 0.0)


class LoopLag:
    """The event loop's current lag: how late a short timer fires, sampled continuously.

    Under saturation every callback waits behind the ready queue, this timer included,
    so its lateness is what a request just received will wait before it is served.
    """

    def __init__(self, period: float = LAG_PERIOD) -> None:
        self._period = period
        self.seconds = 0.0

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(self._period)
            self.seconds = max(time.monotonic() - start - self._period, 0.0)
