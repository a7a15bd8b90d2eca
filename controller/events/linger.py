"""The linger hint: how long sensors gather events before sending, from the fleet's load.

A batch costs the controller about the same whatever it carries (a gRPC message, a
queue hop, a share of a commit), so at a fleet's trickle of one or two events a batch,
the cost per event is the cost per batch. Every acknowledgement therefore tells its
sensor how long to gather new events before sending a batch that is not full, chosen
so that the fleet's batches arrive at about ``target`` a second.

With N open streams bringing E events a second in all (r = E/N each), a sensor that
gathers for L seconds after its first new event sends one batch per L + 1/r seconds,
so the fleet sends R = E / (1 + E*L/N) batches a second. R = target gives

    L = N * (1/target - 1/E)

which is 0 while the fleet sends fewer events a second than ``target`` (no batch is
worth delaying then) and grows with the fleet; it is capped at ``max_linger``. E is the
offered load and does not depend on L, so hint and measurement cannot oscillate.
Sensors sending at unequal rates make R smaller than the target, never larger.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LingerPolicy:
    """What the hint aims at."""

    target: float
    """Event batches a second the controller wants from all sensors together."""
    max_linger: float
    """Seconds the hint never exceeds (0 turns the hint off)."""
    window: float = 2.0
    """Seconds over which the event rate is measured."""


class LingerAdvisor:
    """Measures the fleet's event rate and turns it into the linger hint."""

    def __init__(self, policy: LingerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._start = clock()
        # Events counted in the window before the current one (none yet: a quiet one).
        self._previous = 0
        self._current = 0

    def received(self, events: int) -> None:
        """Count ``events`` received from any sensor."""
        self._roll()
        self._current += events

    def rate(self) -> float:
        """Events a second over the last one to two windows."""
        elapsed = self._roll()
        return (self._previous + self._current) / (self.policy.window + elapsed)

    def hint(self, streams: int) -> float:
        """Seconds a sensor should gather events before sending a batch that is not full."""
        rate = self.rate()
        if rate <= self.policy.target or not self.policy.max_linger:
            return 0.0
        linger = streams * (1 / self.policy.target - 1 / rate)
        return min(max(linger, 0.0), self.policy.max_linger)

    def _roll(self) -> float:
        """Start a new window if the current one is over; seconds into the current one."""
        now = self._clock()
        elapsed = now - self._start
        if elapsed >= self.policy.window:
            # A gap of two windows or more was quiet: nothing carries over.
            self._previous = self._current if elapsed < 2 * self.policy.window else 0
            self._current = 0
            self._start = now
            elapsed = 0.0
        return elapsed
