"""How long the controller could not listen: the lateness of a periodic job.

A job meant to run every ``period`` that runs much later than that shows the event
loop was stalled or overloaded. Liveness and expiry give that time back to the nodes
and leases they judge, so the controller's own busyness never kills a node that kept
heartbeating nor expires, in one burst after a stall, leases their sensors renewed.
"""

from __future__ import annotations

import time

# Lateness up to this many periods is ordinary scheduling jitter, not a stall.
TOLERANCE = 1.0


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
