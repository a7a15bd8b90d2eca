"""Capped, jittered exponential backoff for clients that retry the controller."""

from __future__ import annotations

import random


class Backoff:
    """Delays between retries: doubling from ``first`` up to ``most``, each spread by
    jitter, so members that failed together (a controller restart) do not return together.
    """

    def __init__(self, first: float, most: float) -> None:
        self.first = first
        self.most = most
        self._next = first

    def delay(self, hint: float = 0.0) -> float:
        """The next delay; a server's ``hint`` is never undercut, only stretched by up to half."""
        delay = max(
            self._next * random.uniform(0.8, 1.2),  # noqa: S311 (jitter, not secrecy)
            hint * random.uniform(1.0, 1.5),  # noqa: S311
        )
        self._next = min(self._next * 2, self.most)
        return delay

    def reset(self) -> None:
        """A call went through: the next failure starts from ``first`` again."""
        self._next = self.first
