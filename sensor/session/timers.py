"""Named timers of one session: armed by name, all cancelled at close, none armed after it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Timers:
    """A session's timers (``grace``, ``idle``, ``session``, and the adapter's own)."""

    __slots__ = ("_handles", "_stopped")

    def __init__(self) -> None:
        self._handles: dict[str, asyncio.TimerHandle] = {}
        self._stopped = False

    def arm(self, name: str, delay: float, callback: Callable[..., Any], *args: Any) -> None:
        """(Re)arm ``name``; does nothing once the session is closing."""
        if self._stopped:
            return
        self.cancel(name)
        self._handles[name] = asyncio.get_running_loop().call_later(delay, callback, *args)

    def cancel(self, name: str) -> None:
        """Disarm ``name`` if it is armed."""
        handle = self._handles.pop(name, None)
        if handle is not None:
            handle.cancel()

    def stop(self) -> None:
        """Cancel every timer and arm none from now on (the session is closing)."""
        self._stopped = True
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()

    @property
    def armed(self) -> list[str]:
        """The names of the timers still to fire."""
        return [name for name, handle in self._handles.items() if not handle.cancelled()]
