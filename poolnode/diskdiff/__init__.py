"""Files from guests' disks: what a used guest left on its overlay, found when it goes.

:class:`DiskDiffer` queues destroyed guests' overlays and diffs them one at a time
against the base image in a libguestfs appliance (:mod:`poolnode.diskdiff.worker`, run
by Debian's ``/usr/bin/python3``); :mod:`poolnode.diskdiff.records` checks what the
worker reports.
"""

from poolnode.diskdiff.differ import DiffOutcome, DiskDiffer, GuestEvents
from poolnode.diskdiff.records import DiffSummary, GuestFile

__all__ = ["DiffOutcome", "DiffSummary", "DiskDiffer", "GuestEvents", "GuestFile"]
