"""One disk budget for everything a sensor keeps of attackers: captures and recordings.

Captured files (``downloads/``) and recordings (``tty/``) draw on one total,
``artefact_max_bytes``, counted from what the directories held at start-up. Bytes are
taken from it as they are queued for disk, on the event loop, and given back when a file
is dropped (a duplicate, an abandoned upload, a recording that was never committed).
When the budget is spent the policy is: stop capturing new artefacts (a capture or
recording that reaches it ends where it is), and say so: one
``honeyfleet.artefact.budget`` event per session that lost something to it, and the
``honeyfleet_sensor_artefact_*`` metrics. An I/O error ends only the artefact it hit,
with a ``honeyfleet.artefact.failed`` event; the session goes on. Both kinds are written
by one :class:`ArtefactWriter` thread, never on the event loop. Both are also queued
for the controller's artefact store (:mod:`honeyfleet.outbox`); with
``artefact_keep_local = false``, :class:`LocalCopies` removes each once the controller
stored it and gives its bytes back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from honeyfleet.outboxqueue import Item
from honeyfleet.v1 import artefact_pb2
from sensor.config import SensorConfig
from sensor.metrics import SensorMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# Once an artefact did not fit, new ones are refused until use falls to this share of the
# budget (so a nearly spent budget does not start files only to cut each one short).
RESUME_FRACTION = 0.9


def disk_usage(*roots: Path) -> int:
    """Bytes of the regular files under ``roots`` (blocking: run it on a thread)."""
    total = 0
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                try:
                    total += (Path(folder) / name).lstat().st_size
                except OSError:
                    continue  # removed while we walked
    return total


class ArtefactWriter:
    """The one thread that writes captures and recordings, in the order asked, so that
    no data callback on the event loop waits for a disk."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="artefacts")

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` on the writer thread; RuntimeError once it is closed."""
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        """Finish what was asked and stop the thread (blocks: for shutdown)."""
        self._executor.shutdown(wait=True)


class DiskBudget:
    """Bytes of artefacts the sensor may still write (used from the event loop only)."""

    def __init__(self, max_bytes: int, used: int, metrics: SensorMetrics) -> None:
        self.max_bytes = max_bytes
        self.used = used
        self._refused = False
        metrics.artefact_bytes.set_function(lambda: self.used)
        metrics.artefact_budget_reached.set_function(lambda: int(self.reached))
        if used >= max_bytes:
            log.warning("artefacts already take %d of %d budgeted bytes", used, max_bytes)

    @property
    def reached(self) -> bool:
        """Whether new artefacts are refused: the budget is spent, or was found too small
        for one since bytes were last given back."""
        return self._refused or self.used >= self.max_bytes

    def take(self, size: int) -> bool:
        """Account ``size`` more bytes; False if they do not fit (nothing taken)."""
        if self.used + size > self.max_bytes:
            self._refused = True
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        """Bytes that are no longer on disk; refusals end once enough is free again."""
        self.used = max(0, self.used - size)
        if self.used <= self.max_bytes * RESUME_FRACTION:
            self._refused = False


class LocalCopies:
    """Frees the sensor's own copy of what the controller stored (``artefact_keep_local``
    false), giving its bytes back to the budget."""

    def __init__(self, config: SensorConfig, budget: DiskBudget) -> None:
        self._downloads = config.downloads_dir
        self._recordings = config.recordings_dir
        self._budget = budget

    async def free(self, item: Item) -> None:
        """Remove the local file of a delivered artefact (a capture or a recording)."""
        if item.kind == artefact_pb2.ARTEFACT_KIND_CAPTURE:
            path = self._downloads / item.sha256
        elif item.kind == artefact_pb2.ARTEFACT_KIND_RECORDING and "/" not in item.filename:
            path = self._recordings / item.filename
        else:
            return
        freed = await asyncio.to_thread(_remove, path)
        self._budget.give(freed)


def _remove(path: Path) -> int:
    """Delete a file; the bytes it held (0 if it was gone already)."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


class Emitter(Protocol):
    """A session's events (:class:`sensor.events.SessionEvents`, which imports recordings)."""

    def emit(
        self,
        eventid: str,
        template: str,
        *,
        message_args: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Any:
        """Build and record an event."""


class ArtefactReport:
    """What one session says about its artefacts: budget refusals (once) and failures."""

    def __init__(self, events: Emitter, metrics: SensorMetrics) -> None:
        self._events = events
        self._metrics = metrics
        self._told_budget = False

    def over_budget(self, kind: str, what: str) -> None:
        """An artefact was not kept (or stopped growing) because the budget is spent."""
        self._metrics.artefacts_refused.labels(kind).inc()
        if self._told_budget:
            return
        self._told_budget = True
        self._events.emit(
            "honeyfleet.artefact.budget",
            "Disk budget for captures and recordings reached: {artefact} not kept",
            artefact=what,
            kind=kind,
        )

    def failed(self, kind: str, what: str, error: OSError) -> None:
        """An artefact hit an I/O error and was given up."""
        self._metrics.artefacts_failed.labels(kind).inc()
        self._events.emit(
            "honeyfleet.artefact.failed",
            "Could not keep {artefact}: {reason}",
            artefact=what,
            kind=kind,
            reason=error.strerror or str(error),
        )
