"""Diffs the disks of destroyed guests, one at a time, each in a worker process.

The pool hands over a used guest's overlay once its VM is gone (the backend moves it
into ``state_dir/diskdiff``): :meth:`DiskDiffer.submit` queues it and returns at once,
so neither the event loop nor the replacement guest waits for a diff. A single task
runs the queue; each diff is :mod:`poolnode.diskdiff.worker` under Debian's
``/usr/bin/python3`` (where ``python3-guestfs`` lives), in a session of its own so
that a diff over ``disk_diff_timeout`` is killed with its appliance. The overlay is
deleted afterwards (kept when ``save_snapshots`` asked for it). Overlays still queued
when the node stops stay in ``state_dir/diskdiff`` and are diffed after the next start.

Each file becomes a ``honeyfleet.guest.file`` event on the guest's last session, its
content (when within bounds) kept in ``state_dir/downloads/<sha256>`` like a sensor's
captures; each diff ends with a ``honeyfleet.guest.diff`` event with the counts. Kept
files are then queued in the node's artefact outbox (:mod:`honeyfleet.outbox`) for the
controller's store, on the same session and named by sha256 as their events are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from honeyfleet.errors import ConfigError
from honeyfleet.outbox import Outbox
from honeyfleet.v1 import artefact_pb2
from poolnode.config import PoolNodeConfig
from poolnode.diskdiff.records import (
    MAX_LINE,
    DiffSummary,
    GuestFile,
    WorkerError,
    WorkerOutputError,
    parse_line,
)
from poolnode.metrics import PoolMetrics

log = logging.getLogger(__name__)

# Debian's interpreter: python3-guestfs is built for it, not for the venv's Python.
GUESTFS_PYTHON = "/usr/bin/python3"
WORKER = Path(__file__).with_name("worker.py")
# Overlays waiting for a diff; past this the newest is deleted undiffed (each holds disk).
MAX_PENDING = 8
# MiB of memory for the libguestfs appliance.
APPLIANCE_MEMSIZE = 512
CHECK_TIMEOUT = 30.0
STDERR_KEEP = 4096


class GuestEvents(Protocol):
    """Where the node's events about a guest go (the guest's session is found by id)."""

    def emit(
        self, guest_id: str | None, eventid: str, template: str, **fields: Any
    ) -> Mapping[str, Any]:
        """Emit an event (``template`` names fields in braces); the event."""
        ...


@dataclass
class DiffOutcome:
    """What one diff found, and how it ended."""

    files: list[GuestFile] = field(default_factory=list)
    summary: DiffSummary | None = None
    error: str | None = None
    """Why the diff stopped early (timeout, worker failure), if it did."""


class DiskDiffer:
    """The node's queue of overlays to diff, and its one worker at a time."""

    def __init__(
        self,
        config: PoolNodeConfig,
        metrics: PoolMetrics,
        events: GuestEvents | None = None,
        artefacts: Outbox | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.events = events
        """Where file events go; None: they are only logged."""
        self.artefacts = artefacts
        """Where kept files are queued for the controller; None: they stay in downloads/."""
        self.jobs_dir = config.state_dir / "diskdiff"
        self.downloads = config.state_dir / "downloads"
        self._queue: deque[tuple[str, Path, bool]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._base_format = "qcow2"
        self._env = dict(os.environ, LIBGUESTFS_BACKEND="direct")
        if config.hypervisor == "qemu":
            # Nested KVM can accept a VM and never run it; the guests' own setting
            # says whether this host's KVM is to be trusted.
            self._env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"

    def scratch(self, guest_id: str) -> Path:
        """Where the backend should move a guest's overlay for its diff."""
        return self.jobs_dir / f"{guest_id}.qcow2"

    async def start(self) -> None:
        """Check libguestfs works here, learn the base image's format, queue leftovers."""
        await self._check_guestfs()
        self._base_format = await self._image_format()
        leftovers = await asyncio.to_thread(self._prepare_dirs)
        for overlay in leftovers:
            log.info("diffing %s, left by an earlier run", overlay)
            self.submit(overlay.stem, overlay, delete=True)
        self._task = asyncio.create_task(self._run_queue(), name="disk diff")

    async def stop(self) -> None:
        """Stop diffing: a running worker is killed; queued overlays wait for the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def idle(self) -> None:
        """Wait until no overlay is queued or being diffed."""
        await self._idle.wait()

    def submit(self, guest_id: str, overlay: Path, *, delete: bool) -> None:
        """Queue a destroyed guest's overlay (returns at once); ``delete`` it once diffed."""
        if len(self._queue) >= MAX_PENDING:
            log.warning(
                "guest %s: %d disks already wait for a diff; its disk is not diffed",
                guest_id,
                len(self._queue),
            )
            self.metrics.disk_diffs.labels("dropped").inc()
            if delete:
                overlay.unlink(missing_ok=True)
            return
        self._queue.append((guest_id, overlay, delete))
        self._idle.clear()
        self._wake.set()

    async def _run_queue(self) -> None:
        """Diff queued overlays in order; an overlay stays queued if the node stops mid-diff."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                guest_id, overlay, delete = self._queue[0]
                try:
                    await self._diff_and_report(guest_id, overlay)
                except Exception:
                    log.exception("guest %s: disk diff failed", guest_id)
                self._queue.popleft()
                if delete:
                    await asyncio.to_thread(overlay.unlink, missing_ok=True)
            self._idle.set()

    async def _diff_and_report(self, guest_id: str, overlay: Path) -> None:
        """Diff one overlay; report each file and the summary as events."""
        started = time.monotonic()
        outcome = await self.diff(guest_id, overlay, on_file=lambda f: self._report(guest_id, f))
        seconds = time.monotonic() - started
        self.metrics.disk_diff_seconds.observe(seconds)
        result = "failed" if outcome.error else "done"
        self.metrics.disk_diffs.labels(result).inc()
        summary = outcome.summary
        fields: dict[str, Any] = {
            "outcome": result,
            "reason": outcome.error or "",
            "reported": len(outcome.files),
            "duration": round(seconds, 3),
        }
        if summary is not None:
            fields.update(
                created=summary.created,
                changed=summary.changed,
                deleted=summary.deleted,
                other=summary.other,
                stored_bytes=summary.stored_bytes,
                truncated=summary.walk_cut or summary.reported < summary.created + summary.changed,
            )
        log.info(
            "guest %s: disk diff %s in %.1fs: %d files reported%s",
            guest_id,
            result,
            seconds,
            len(outcome.files),
            f" ({outcome.error})" if outcome.error else "",
        )
        event = self._emit(
            guest_id,
            "honeyfleet.guest.diff",
            "Disk of guest {guest} compared with its base image: {reported} files ({outcome})",
            **fields,
        )
        session = str(event["session"]) if event is not None else "-"
        await self._upload(session, [f for f in outcome.files if f.stored])

    async def _upload(self, session: str, files: list[GuestFile]) -> None:
        """Queue kept files for the controller's artefact store, on the guest's session."""
        if self.artefacts is None:
            return
        for file in files:
            await self.artefacts.put(
                self.downloads / file.sha256,
                artefact_pb2.ARTEFACT_KIND_EXTRACTED_FILE,
                session=session,
                filename=file.path,
                sha256=file.sha256,
            )

    async def diff(
        self, guest_id: str, overlay: Path, on_file: Callable[[GuestFile], None] | None = None
    ) -> DiffOutcome:
        """Run the worker on ``overlay`` within the bounds; files kept go to downloads/."""
        job = self.jobs_dir / guest_id
        await asyncio.to_thread(_fresh_dir, job)
        config = self.config
        request = {
            "base": str(config.guest_image.resolve()),
            "base_format": self._base_format,
            "overlay": str(overlay),
            "out": str(job),
            "max_file_bytes": config.disk_diff_max_file_bytes,
            "max_total_bytes": config.disk_diff_max_total_bytes,
            "max_files": config.disk_diff_max_files,
            "memsize": APPLIANCE_MEMSIZE,
        }
        outcome = DiffOutcome()
        proc = await asyncio.create_subprocess_exec(
            GUESTFS_PYTHON,
            "-I",
            str(WORKER),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
            start_new_session=True,  # its appliance's QEMU is killed with it
            limit=MAX_LINE + 1,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stderr = asyncio.create_task(_tail(proc.stderr))
        try:
            proc.stdin.write(json.dumps(request).encode())
            proc.stdin.close()
            async with asyncio.timeout(config.disk_diff_timeout):
                while line := await proc.stdout.readline():
                    record = parse_line(line)
                    if isinstance(record, GuestFile):
                        if record.stored:
                            await asyncio.to_thread(self._keep, job, record.sha256)
                        outcome.files.append(record)
                        if on_file is not None:
                            on_file(record)
                    elif isinstance(record, DiffSummary):
                        outcome.summary = record
                    elif isinstance(record, WorkerError):
                        outcome.error = f"worker: {record.message}"
                await proc.wait()
        except TimeoutError:
            outcome.error = f"over disk_diff_timeout ({config.disk_diff_timeout:.0f}s)"
        except (WorkerOutputError, ValueError) as e:
            outcome.error = f"bad worker output: {e}"
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            tail = await stderr
            await asyncio.to_thread(shutil.rmtree, job, True)
        if outcome.error is None and outcome.summary is None:
            outcome.error = f"worker exited with {proc.returncode}: {tail[-500:]}"
        if outcome.error:
            log.warning("guest %s: disk diff: %s; worker said: %s", guest_id, outcome.error, tail)
        return outcome

    def _keep(self, job: Path, shasum: str) -> None:
        """Move a kept file from the job's directory into downloads/ (blocking)."""
        (job / shasum).replace(self.downloads / shasum)

    def _report(self, guest_id: str, file: GuestFile) -> None:
        """One file as a ``honeyfleet.guest.file`` event."""
        self.metrics.disk_diff_files.labels("stored" if file.stored else "hashed").inc()
        self._emit(
            guest_id,
            "honeyfleet.guest.file",
            "File {filename} {change} on guest {guest}: {size} bytes, sha256 {shasum}",
            **file.fields(),
        )

    def _emit(
        self, guest_id: str, eventid: str, template: str, **fields: Any
    ) -> Mapping[str, Any] | None:
        """Emit an event about the guest (only logged without an event log); the event."""
        if self.events is None:
            log.info("guest %s: %s %s", guest_id, eventid, json.dumps(fields))
            return None
        return self.events.emit(guest_id, eventid, template, **fields)

    def _prepare_dirs(self) -> list[Path]:
        """Make the directories; returns overlays an earlier run left undiffed."""
        self.downloads.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for entry in self.jobs_dir.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)  # a killed worker's partial files
        return sorted(self.jobs_dir.glob("*.qcow2"))[:MAX_PENDING]

    async def _check_guestfs(self) -> None:
        """Refuse to start (naming disk_diff) if the worker cannot import guestfs."""
        try:
            proc = await asyncio.create_subprocess_exec(
                GUESTFS_PYTHON,
                "-I",
                "-c",
                "import guestfs",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            proc = None
        ok = False
        if proc is not None:
            try:
                async with asyncio.timeout(CHECK_TIMEOUT):
                    await proc.communicate()
                ok = proc.returncode == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        if not ok:
            raise ConfigError(
                "disk_diff",
                f"needs libguestfs for {GUESTFS_PYTHON}: install python3-guestfs and "
                "linux-image-amd64 (make system-deps), or set disk_diff = false",
            )

    async def _image_format(self) -> str:
        """The base image's format (qemu-img info; -U as guests hold it open)."""
        proc = await asyncio.create_subprocess_exec(
            "qemu-img",
            "info",
            "-U",
            "--output=json",
            str(self.config.guest_image),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        try:
            return str(json.loads(out)["format"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                "guest_image", f"qemu-img cannot read {self.config.guest_image}"
            ) from None


async def _tail(stream: asyncio.StreamReader) -> str:
    """The last STDERR_KEEP bytes a worker wrote to stderr (read to the end)."""
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-STDERR_KEEP:]
    return kept.decode(errors="replace").strip()


def _fresh_dir(path: Path) -> None:
    """An empty directory for a job (a killed run's leftovers removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
