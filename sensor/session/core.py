"""The protocol-neutral life of one attacker session: admission slot to last event.

:class:`Session` owns what every session holds whatever its protocol: its events and
log context, its state (:mod:`sensor.session.state`), the named timers (login grace,
idle, total time), the admission slot, the guest link (lease within the budget, tunnel),
the recording, the tasks tied to it and its end. The SSH and Telnet adapters own only
their protocol (asyncssh behind a byte pump; telnetlib3 and the login dialogue) and
call in here; the session calls back through :class:`SessionAdapter`.

Ending a session (:meth:`Session.close`) is immediate for what others wait on: the
timers stop, the admission slot goes back (its source penalised for how it ended) and
the attacker's connection is closed. The clean-up that takes I/O (the guest, the lease,
the recording, the last events) runs afterwards as a task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from honeyfleet.events import new_session_id
from honeyfleet.outbox import Outbox
from honeyfleet.v1 import common_pb2
from honeyfleet.v1.artefact_pb2 import ARTEFACT_KIND_RECORDING as RECORDING
from sensor.artefacts import ArtefactReport
from sensor.config import SensorConfig
from sensor.events import EventLog, SessionEvents
from sensor.leases import LeaseClient, LeaseFailed
from sensor.metrics import SensorMetrics
from sensor.recording import Recorder, Recordings
from sensor.session.admission import Admission, Slot
from sensor.session.budget import LeaseBudget
from sensor.session.guest import GuestFailed, GuestLink
from sensor.session.latch import Latch
from sensor.session.penalties import Outcome
from sensor.session.state import SessionState, transition
from sensor.session.timers import Timers
from sensor.tunnel import TunnelConnector, TunnelFailed
from sensor.userdb import UserDB

PROTOCOLS = {"ssh": common_pb2.PROTOCOL_SSH, "telnet": common_pb2.PROTOCOL_TELNET}
# What an adapter's guest client may raise besides GuestFailed.
GUEST_ERRORS = (GuestFailed, TunnelFailed, OSError, TimeoutError)


@dataclass(frozen=True)
class Services:
    """What every session of a sensor uses, whatever its protocol."""

    config: SensorConfig
    sensor: str
    events: EventLog
    metrics: SensorMetrics
    userdb: UserDB
    leases: LeaseClient
    tunnels: TunnelConnector
    admission: Admission
    budget: LeaseBudget
    recordings: Recordings
    outbox: Outbox


class SessionAdapter(Protocol):
    """What the session needs from its protocol adapter."""

    def close(self, reason: str) -> None:
        """End the session (the admission registry evicts and shuts down through this)."""

    def hang_up(self) -> None:
        """Close the attacker's connection now (flushing what is queued, within a bound)."""

    async def wind_down(self) -> None:
        """The protocol's own clean-up, before the guest is dropped."""

    async def last_words(self) -> None:
        """Emit what must come before the session's last events."""


GuestOpener = Callable[[GuestLink], Awaitable[None]]


class Adapter:
    """What every protocol adapter offers of its session: its state, its end, close()."""

    __slots__ = ()

    session: Session

    @property
    def state(self) -> SessionState:
        """Where the session is in its life."""
        return self.session.state

    @property
    def closed(self) -> Latch:
        """Set once the session's last event is written."""
        return self.session.closed

    def close(self, reason: str) -> None:
        """End the session (idempotent); the clean-up runs as a task."""
        self.session.close(reason)


class Session:
    """One attacker session's protocol-neutral state, bounds and end."""

    __slots__ = (
        "_adapter",
        "_failed_logins",
        "_grace_exceeded",
        "_joining",
        "_last_input",
        "_preauth_bytes",
        "_slot",
        "_started",
        "_tasks",
        "artefacts",
        "closed",
        "closing",
        "config",
        "events",
        "link",
        "protocol",
        "recording",
        "services",
        "src_ip",
        "state",
        "timers",
    )

    def __init__(
        self,
        services: Services,
        adapter: SessionAdapter,
        slot: Slot,
        *,
        protocol: str,
        peer: tuple[str, int],
        local: tuple[str, int],
    ) -> None:
        config = services.config
        self.services = services
        self.config = config
        self.src_ip = peer[0]
        self.protocol = protocol
        self.events = SessionEvents(
            services.events,
            session=new_session_id(),
            peer=peer,
            local=local,
            sensor=services.sensor,
            protocol=protocol,
        )
        self.state = SessionState.CONNECTED
        self.closed = Latch()
        self.closing: str | None = None
        self.timers = Timers()
        self.link = GuestLink(
            leases=services.leases,
            tunnels=services.tunnels,
            budget=services.budget,
            events=self.events,
            src_ip=self.src_ip,
            protocol=PROTOCOLS[protocol],
            on_lost=adapter.close,
        )
        self.recording: Recorder | None = None
        # What the session says about its recording and captures (budget, failures).
        self.artefacts = ArtefactReport(self.events, services.metrics)
        self._adapter = adapter
        self._slot = slot
        self._started = time.monotonic()
        self._last_input = self._started
        self._preauth_bytes = 0
        self._failed_logins = 0
        self._grace_exceeded = False
        self._joining: asyncio.Task[str | None] | None = None
        # A list, not a set: an empty set is 216 bytes, held by every session.
        self._tasks: list[asyncio.Task[Any]] = []
        slot.attach(adapter)
        self.timers.arm(
            "session", config.session_timeout, adapter.close, "session time limit reached"
        )
        self.timers.arm("grace", config.login_grace_time, self._grace_over)
        self.timers.arm("idle", config.idle_timeout, self._check_idle)
        self.events.emit(
            "cowrie.session.connect",
            "New connection: {src_ip}:{src_port} ({dst_ip}:{dst_port}) [session: {session}]",
        )

    # Input and bounds.

    def received(self, count: int) -> str | None:
        """Note ``count`` bytes from the attacker; why the session must end, past a bound."""
        self._last_input = time.monotonic()
        if self.state is SessionState.PROXYING:
            return None
        self._preauth_bytes += count
        if self._preauth_bytes > self.config.max_preauth_bytes:
            return f"more than {self.config.max_preauth_bytes} bytes before login"
        return None

    # Logins and the guest.

    def login_attempt(
        self, username: str, password: str, *, accepted: bool, penalise: bool = True
    ) -> None:
        """cowrie.login.success or .failed; a refused password counts towards a penalty.

        ``penalise`` False: the credentials were good but no guest could be had (the
        attacker sees a failed login, the source is not to blame).
        """
        if not accepted and penalise:
            self.auth_failed()
        self.services.metrics.logins.labels("success" if accepted else "failed").inc()
        self.events.emit(
            "cowrie.login.success" if accepted else "cowrie.login.failed",
            "login attempt [{username}/{password}] " + ("succeeded" if accepted else "failed"),
            username=username,
            password=password,
        )

    def auth_failed(self) -> None:
        """An authentication attempt failed (any method): the source earns authfail."""
        self._failed_logins += 1

    def join(self, opener: GuestOpener) -> asyncio.Task[str | None]:
        """Lease a guest and open its login with ``opener``, as a task close() cancels.

        The task's result is None once the guest's login is open, else why not (the
        session is CONNECTED again, the guest given back, the reason an event).
        """
        task = self._joining = asyncio.create_task(self._join(opener))
        # A finished join is not kept: its task would stay with every held session.
        task.add_done_callback(self._joined)
        return task

    def _joined(self, task: asyncio.Task[str | None]) -> None:
        """Forget a join that is over (unless another has started since)."""
        if self._joining is task:
            self._joining = None

    @property
    def joining(self) -> bool:
        """Whether a join is under way."""
        return self._joining is not None and not self._joining.done()

    async def _join(self, opener: GuestOpener) -> str | None:
        """The work of :meth:`join`."""
        self._move(SessionState.LEASING)
        try:
            await self.link.acquire()
        except LeaseFailed as e:
            self.services.metrics.lease_failures.inc()
            self.events.emit(
                "honeyfleet.lease.failed", "No guest for this session: {reason}", reason=str(e)
            )
            self._move(SessionState.CONNECTED)
            return str(e)
        self._move(SessionState.JOINING)
        try:
            async with asyncio.timeout(self.config.guest_login_timeout):
                await opener(self.link)
        except GUEST_ERRORS as e:
            reason = f"cannot log into the guest: {e or type(e).__name__}"
            await self.abandon_guest(reason)
            return reason
        return None

    async def abandon_guest(self, reason: str) -> bool:
        """Give up a guest being joined; True if the session is back to CONNECTED.

        Only while joining: by the time a late timer's task runs, the attacker may have
        logged in (the guest stays) or the session closed (its end drops the guest and
        writes the last events; none may follow them).
        """
        if self.closing is not None or self.state is not SessionState.JOINING:
            return False
        self.events.emit("honeyfleet.guest.failed", "Guest login failed: {reason}", reason=reason)
        await self.link.drop(reason)
        if self.closing is not None:
            return False
        self._move(SessionState.CONNECTED)
        return True

    def logged_in(self) -> None:
        """The attacker is in the guest: the slot leaves the unauthenticated pool."""
        self._move(SessionState.PROXYING)
        self._slot.logged_in()
        self.timers.cancel("grace")
        if self.recording is not None:
            self.recording.commit()  # what was held in memory before login goes to disk
        self.services.metrics.sessions.inc()
        self.services.metrics.sessions_total.inc()
        self._last_input = time.monotonic()
        self.events.log.info("proxying into the guest")
        # Cowrie writes it (with an empty message) when its shell starts.
        self.events.emit("cowrie.session.params", "", arch=self.config.guest_arch)

    # The recording and tasks.

    def recorder(self, width: int, height: int, term: str) -> Recorder:
        """The session's recording, made on first use; before login it is held in memory
        (nothing an unauthenticated client sends reaches disk) until :meth:`logged_in`."""
        if self.recording is None:
            self.recording = self.services.recordings.start(
                self.events.session,
                self.artefacts,
                width=width,
                height=height,
                term=term,
                held=self.state is not SessionState.PROXYING,
            )
        return self.recording

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a task tied to this session (cancelled when it ends)."""
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # The end.

    def close(self, reason: str, *, hang_up: bool = True) -> None:
        """End the session (idempotent): slot and timers now, the rest as a task.

        ``hang_up`` False: the adapter closes the attacker's connection itself, later
        (SSH passes asyncssh's last message on first).
        """
        if self.closing is not None:
            return
        self.closing = reason
        self.timers.stop()
        self._slot.release(self._outcome())
        if hang_up:
            self._adapter.hang_up()
        self.services.admission.track(asyncio.create_task(self._finish(reason)))

    def _outcome(self) -> Outcome:
        """How the session ended, as far as its source's penalty goes."""
        if self.state is SessionState.PROXYING:
            return Outcome.AUTHENTICATED
        if self._grace_exceeded:
            return Outcome.GRACE_EXCEEDED
        if self._failed_logins:
            return Outcome.AUTH_FAILED
        return Outcome.NO_AUTH

    async def _finish(self, reason: str) -> None:
        """Release everything, then write the last events."""
        self.events.log.info("closing: %s", reason)
        was_proxying = self.state is SessionState.PROXYING
        try:
            await self._adapter.wind_down()
            if self._joining is not None and not self._joining.done():
                # A lease still being granted is released by the lease client when it comes.
                self._joining.cancel()
                await asyncio.wait([self._joining])
            was_proxying = self.state is SessionState.PROXYING
            await self.link.drop(reason)
            for task in list(self._tasks):
                task.cancel()
            await self._adapter.last_words()
            duration = time.monotonic() - self._started
            summary = await self.recording.close() if self.recording is not None else None
            uploaded = None
            if summary is not None:
                uploaded = await self.services.outbox.put(
                    summary.path, RECORDING, session=self.events.session, filename=summary.path.name
                )
            self.events.emit_closed(summary, duration, reason, recording_sha256=uploaded)
            # Durable before anyone is told the session is over (shutdown closes the spool).
            await self.events.flush()
        finally:
            if was_proxying:
                self.services.metrics.sessions.dec()
            self.state = transition(self.state, SessionState.CLOSED)
            self.closed.set()

    # Helpers.

    def _move(self, new: SessionState) -> None:
        """Change state (illegal moves raise)."""
        self.state = transition(self.state, new)

    def _grace_over(self) -> None:
        """login_grace_time passed without a login."""
        if self.state is not SessionState.PROXYING:
            self._grace_exceeded = True
            self._adapter.close(f"not logged in after {self.config.login_grace_time:.0f}s")

    def _check_idle(self) -> None:
        """Close after idle_timeout without client input, else check again later."""
        remaining = self.config.idle_timeout - (time.monotonic() - self._last_input)
        if remaining <= 0:
            self._adapter.close(f"idle for {self.config.idle_timeout:.0f}s")
            return
        self.timers.arm("idle", remaining, self._check_idle)
