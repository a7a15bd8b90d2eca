"""One attacker's Telnet connection: from accept to the last event.

:class:`TelnetSession` owns what a connection holds: its events and log context, the
negotiation bounds on both sides, the login dialogue (:mod:`sensor.telnet.dialogue`),
the lease, the tunnel and the client towards the guest, the relay once logged in, the
recording, its timers and its end. Its life follows :class:`sensor.ssh.state.SessionState`:
CONNECTED until a username arrives, LEASING and JOINING while a guest is found and its
login opened (back to CONNECTED if that fails), PROXYING once logged in, then CLOSED.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from telnetlib3.stream_reader import TelnetReader
from telnetlib3.stream_writer import TelnetWriter

from honeyfleet.events import new_session_id
from honeyfleet.v1 import common_pb2
from sensor.config import SensorConfig
from sensor.events import EventLog, SessionEvents
from sensor.leases import GuestLease, LeaseClient, LeaseFailed
from sensor.linger import close_with_linger
from sensor.metrics import SensorMetrics
from sensor.recording import Recorder
from sensor.ssh.admission import Admission
from sensor.ssh.lineinput import LineEditor
from sensor.ssh.state import SessionState, transition
from sensor.telnet.client import ClientInfo
from sensor.telnet.dialogue import Dialogue
from sensor.telnet.guest import GuestTelnet, open_guest
from sensor.telnet.login import LoginState
from sensor.telnet.negotiation import NegotiationGuard, NegotiationViolation
from sensor.telnet.rawlog import Direction, RawLog
from sensor.tunnel import Tunnel, TunnelConnector, TunnelFailed
from sensor.userdb import UserDB

CHUNK = 64 * 1024
# Output shown before the first keystroke, replayed into the recording when it starts.
MAX_EARLY_OUTPUT = 8192


@dataclass(frozen=True)
class TelnetShared:
    """What every Telnet connection of a sensor uses."""

    config: SensorConfig
    sensor: str
    events: EventLog
    metrics: SensorMetrics
    userdb: UserDB
    leases: LeaseClient
    tunnels: TunnelConnector
    admission: Admission


class TelnetSession:
    """Everything about one attacker connection."""

    def __init__(
        self,
        shared: TelnetShared,
        transport: asyncio.Transport,
        peer: tuple[str, int],
        local: tuple[str, int],
        sessions: set[TelnetSession],
    ) -> None:
        config = shared.config
        self.shared = shared
        self.config = config
        self.src_ip = peer[0]
        self.events = SessionEvents(
            shared.events,
            session=new_session_id(),
            src_ip=peer[0],
            sensor=shared.sensor,
            protocol="telnet",
        )
        self.state = SessionState.CONNECTED
        self.closed = asyncio.Event()
        self._transport = transport
        self._sessions = sessions
        self._writer: TelnetWriter | None = None
        self._client = ClientInfo(config, self.events)
        self._guest_guard = NegotiationGuard(
            max_subnegotiation=config.telnet_max_subnegotiation,
            max_negotiations=config.telnet_max_negotiations,
        )
        self._raw = RawLog(self.events.log, config.log_raw_max_bytes) if config.log_raw else None
        self._dialogue = Dialogue(self, config, shared.userdb, shared.metrics)
        self._early_output = bytearray()
        self._recorder: Recorder | None = None
        self._editor: LineEditor | None = None
        self._lease: GuestLease | None = None
        self._tunnel: Tunnel | None = None
        self._guest: GuestTelnet | None = None
        self._guest_task: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._joining: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing: str | None = None
        self._started = time.monotonic()
        self._last_input = self._started
        self._preauth_bytes = 0
        loop = asyncio.get_running_loop()
        self._timers = [
            loop.call_later(config.idle_timeout, self._check_idle),
            loop.call_later(config.session_timeout, self.close, "session time limit reached"),
            loop.call_later(config.login_grace_time, self._grace_over),
        ]
        self.events.emit(
            "cowrie.session.connect",
            "New connection: {src_ip}:{src_port} ({dst_ip}:{dst_port}) [session: {session}]",
            src_port=peer[1],
            dst_ip=local[0],
            dst_port=local[1],
        )
        sessions.add(self)

    # The attacker's connection (TelnetdProtocol's peer).

    def from_attacker(self, data: bytes) -> bool:
        """Raw bytes from the attacker: bounds, raw log; False if the session must end."""
        self._last_input = time.monotonic()
        if self._raw is not None:
            self._raw(Direction.FROM_ATTACKER, data)
        if self.state is not SessionState.PROXYING:
            self._preauth_bytes += len(data)
            if self._preauth_bytes > self.config.max_preauth_bytes:
                self.close(f"more than {self.config.max_preauth_bytes} bytes before login")
                return False
        try:
            self._client.guard.feed(data)
        except NegotiationViolation as e:
            self.events.log.info("client broke a negotiation bound: %s", e)
            self.close(str(e))
            return False
        return True

    def negotiated(self, reader: TelnetReader, writer: TelnetWriter) -> None:
        """Negotiation settled: log the client's options and open the login."""
        if self._closing is not None:
            return
        self._writer = writer
        self._client.report_options()
        self._dialogue.start(self._client.username)
        self._spawn(self._attacker_pump(reader))

    def window(self, cols: int, rows: int) -> None:
        """The client's window size: logged once, passed on to the recording and guest."""
        self._client.resized(cols, rows)
        if self._recorder is not None:
            self._recorder.resize(cols, rows)
        if self._guest is not None:
            self._guest.resize(cols, rows)

    def client_info(self, name: str, value: str) -> None:
        """Terminal type, speed or X display."""
        self._client.told(name, value)

    def environment(self, env: dict[str, str]) -> None:
        """NEW-ENVIRON variables."""
        self._client.environment(env)

    async def _attacker_pump(self, reader: TelnetReader) -> None:
        """Keystrokes: to the login dialogue, then to the guest's shell."""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(CHUNK):
                self._start_recording()
                if self.state is SessionState.PROXYING:
                    self._to_shell(data)
                    if self._guest is not None and self._guest.writer is not None:
                        await self._guest.writer.drain()
                else:
                    self._dialogue.attacker_data(data)
        self.close("client disconnected")

    def _to_shell(self, data: bytes) -> None:
        """Input for the logged-in guest: relayed, recorded, read for command lines."""
        if self._guest is not None and self._guest.writer is not None:
            self._guest.writer.write(data)
        if self._recorder is not None:
            self._recorder.input(data)
        if self._editor is not None:
            self._editor.feed(data)

    def _start_recording(self) -> None:
        """The first keystroke starts the recording, with what was shown so far."""
        if self._recorder is not None:
            return
        cols, rows = self._client.window
        self._recorder = Recorder(
            self.config.recordings_dir / f"{self.events.session}.cast",
            width=cols,
            height=rows,
            term=self._client.term,
            max_bytes=self.config.recording_max_bytes,
        )
        self._recorder.output(bytes(self._early_output))
        self._early_output.clear()

    def _command(self, line: str) -> None:
        """A command line typed into the guest's shell."""
        self.events.emit("cowrie.command.input", "CMD: {input}", input=line)

    # DialogueHost.

    def show(self, data: bytes) -> None:
        """Bytes for the attacker."""
        if self._writer is None or self._closing is not None:
            return
        self._writer.write(data)
        if self._recorder is not None:
            self._recorder.output(data)
        elif len(self._early_output) < MAX_EARLY_OUTPUT:
            self._early_output += data[: MAX_EARLY_OUTPUT - len(self._early_output)]

    def echo(self, data: bytes) -> None:
        """Echo typing, if the client let us (it agreed to our WILL ECHO)."""
        if self._writer is not None and self._writer.will_echo:
            self.show(data)

    def record_input(self, data: bytes) -> None:
        """Login keystrokes the recording may keep."""
        if self._recorder is not None and data:
            self._recorder.input(data)

    def send_guest(self, data: bytes) -> None:
        """Bytes for the guest (login answers)."""
        if self._guest is not None and self._guest.writer is not None:
            self._guest.writer.write(data)

    def want_guest(self) -> None:
        """Lease a guest and open its login, unless that is under way."""
        if self._closing is None and (self._joining is None or self._joining.done()):
            self._joining = asyncio.create_task(self._join())

    def refuse(self) -> None:
        """A failed login without a guest: wait as login does, then say so."""
        self._spawn(self._refuse())

    async def _refuse(self) -> None:
        """The delay, then Login incorrect and the prompt."""
        await asyncio.sleep(self.config.telnet_login_fail_delay)
        self._dialogue.refused()

    def logged_in(self, typed_ahead: bytes) -> None:
        """The guest let the attacker in: relay from now on."""
        if self._closing is not None:
            return
        self._move(SessionState.PROXYING)
        self.shared.admission.logged_in()
        self.shared.metrics.sessions.inc()
        self.shared.metrics.sessions_total.inc()
        self._editor = LineEditor(self._command, max_line=self.config.telnet_max_line)
        self.events.log.info("logged into the guest")
        if typed_ahead:
            self._to_shell(typed_ahead)

    def too_many_attempts(self) -> None:
        """Past max_auth_attempts."""
        self.close("too many authentication failures")

    def awaiting_verdict(self, attempt: int) -> None:
        """Give the guest guest_login_timeout to say how the attempt went."""
        if self._closing is not None:
            return  # close() has cancelled the timers already: arm none after it
        self._timers.append(
            asyncio.get_running_loop().call_later(
                self.config.guest_login_timeout, self._no_verdict, attempt
            )
        )

    def _no_verdict(self, attempt: int) -> None:
        """guest_login_timeout after a password; a closing session logs no verdict."""
        if self._closing is None:
            self._dialogue.no_verdict(attempt)

    # The guest.

    async def _join(self) -> None:
        """Lease a guest, open a tunnel to its telnetd and a client on it."""
        shared, config = self.shared, self.config
        self._move(SessionState.LEASING)
        try:
            lease = await shared.leases.acquire(
                self.src_ip, self.events.session, common_pb2.PROTOCOL_TELNET
            )
        except LeaseFailed as e:
            shared.metrics.lease_failures.inc()
            self.events.emit(
                "honeyfleet.lease.failed", "No guest for this session: {reason}", reason=str(e)
            )
            self._move(SessionState.CONNECTED)
            self._dialogue.guest_unavailable()
            return
        self._lease = lease
        self.events.context.update(lease.context)
        self._keeper = asyncio.create_task(shared.leases.keep(lease, self._lease_lost))
        self._move(SessionState.JOINING)
        try:
            async with asyncio.timeout(config.guest_login_timeout):
                self._tunnel = await shared.tunnels.open(
                    lease, config.guest_login_timeout, port=common_pb2.GUEST_PORT_TELNET
                )
                self._guest = await open_guest(self._tunnel.sock, self._guest_client)
        except (TunnelFailed, OSError, TimeoutError) as e:
            await self._abandon_guest(f"cannot reach the guest's telnetd: {e or type(e).__name__}")
            return
        self._dialogue.guest_attached(lease.username, lease.password)
        self._guest_task = asyncio.create_task(self._guest_pump(self._guest))
        self._timers.append(
            asyncio.get_running_loop().call_later(config.guest_login_timeout, self._guest_late)
        )

    def _guest_client(self) -> GuestTelnet:
        """The client towards the guest, wearing the attacker's terminal."""
        environ = {k: v for k, v in self._client.environ.items() if k != "USER"}
        user = self._guest_user()
        if user:
            environ["USER"] = user
        return GuestTelnet(
            term=self._client.term,
            size=self._client.window,
            environ=environ,
            from_guest=self._from_guest,
        )

    def _guest_user(self) -> str | None:
        """USER for the guest: the lease's when spoofing, the attacker's otherwise."""
        if self._client.username is None:
            return None
        if self.config.telnet_spoof_authentication and self._lease is not None:
            return self._lease.username
        return self._client.username

    def _from_guest(self, data: bytes) -> bool:
        """Raw bytes from the guest: bounds and raw log; False if the session must end."""
        if self._raw is not None:
            self._raw(Direction.FROM_GUEST, data)
        try:
            self._guest_guard.feed(data)
        except NegotiationViolation as e:
            self.close(f"guest broke a negotiation bound: {e}")
            return False
        return True

    async def _guest_pump(self, guest: GuestTelnet) -> None:
        """The guest's output: through the dialogue to the attacker, at the attacker's pace."""
        assert guest.reader is not None
        with contextlib.suppress(ConnectionError):
            while data := await guest.reader.read(CHUNK):
                self._dialogue.guest_data(data)
                if self._writer is not None:
                    await self._writer.drain()
        if self._closing is None:
            tunnel_error = self._tunnel.error if self._tunnel is not None else None
            if tunnel_error:
                self.events.emit(
                    "honeyfleet.guest.lost", "Guest connection lost: {reason}", reason=tunnel_error
                )
            self.close(tunnel_error or "the guest closed the connection")

    def _guest_late(self) -> None:
        """A guest that has not asked for a password in time is as good as none."""
        if self._closing is not None:
            return  # armed by a _join that ran on after close(): _finish drops the guest
        dialogue = self._dialogue
        if dialogue.state is LoginState.WAITING and not dialogue.passwords_sent:
            self._spawn(self._abandon_guest("no login prompt from the guest in time"))

    async def _abandon_guest(self, reason: str) -> None:
        """Give the guest up; the attacker sees a failed login.

        Only while joining: by the time a late timer's task runs, the attacker may have
        logged in (the guest stays) or the session closed (_finish drops the guest and
        writes the last events; none may follow them).
        """
        if self._closing is not None or self.state is not SessionState.JOINING:
            return
        self.events.emit("honeyfleet.guest.failed", "Guest login failed: {reason}", reason=reason)
        await self._drop_guest(reason)
        if self._closing is not None:
            return  # closed while the guest was released: _finish ends the session
        self._move(SessionState.CONNECTED)
        self._dialogue.guest_unavailable()

    def _lease_lost(self, reason: str) -> None:
        """The controller ended the lease under the session."""
        self.events.emit("honeyfleet.lease.lost", "Lease ended: {reason}", reason=reason)
        self.close(f"lease lost: {reason}")

    async def _drop_guest(self, reason: str) -> None:
        """Close the guest client and tunnel and release the lease, if there are any."""
        guest, self._guest = self._guest, None
        tunnel, self._tunnel = self._tunnel, None
        lease, self._lease = self._lease, None
        for task in (self._guest_task, self._keeper):
            if task is not None:
                task.cancel()
        self._guest_task = self._keeper = None
        if guest is not None and guest.writer is not None:
            guest.writer.close()
        try:
            if tunnel is not None:
                await tunnel.close()
        finally:
            if lease is not None:
                # Shielded: a session cancelled while releasing still gives the guest
                # back (the release is bounded by its own timeout).
                await asyncio.shield(self.shared.leases.release(lease, reason))

    # The end.

    def close(self, reason: str) -> None:
        """End the session (idempotent); the clean-up runs as a task."""
        if self._closing is not None:
            return
        self._closing = reason
        for timer in self._timers:
            timer.cancel()
        # A client that never reads would hold the transport (and its write buffer) for
        # ever after _finish has released the admission slot.
        close_with_linger(self._transport)
        task = asyncio.create_task(self._finish(reason))
        self.shared.admission.track(task)

    async def _finish(self, reason: str) -> None:
        """Release everything, then write the last events."""
        self.events.log.info("closing: %s", reason)
        if self._joining is not None and not self._joining.done():
            self._joining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._joining
        was_proxying = self.state is SessionState.PROXYING
        await self._drop_guest(reason)
        for task in list(self._tasks):
            task.cancel()
        self._client.report_options()
        duration = time.monotonic() - self._started
        summary = self._recorder.close() if self._recorder is not None else None
        self.events.emit_closed(summary, duration, reason)
        # Durable before anyone is told the session is over (shutdown closes the spool).
        await self.events.flush()
        self.shared.admission.release(self.src_ip, logged_in=was_proxying)
        if was_proxying:
            self.shared.metrics.sessions.dec()
        self.state = transition(self.state, SessionState.CLOSED)
        self._sessions.discard(self)
        self.closed.set()

    # Helpers.

    def _move(self, new: SessionState) -> None:
        """Change state (illegal moves raise)."""
        self.state = transition(self.state, new)

    def _grace_over(self) -> None:
        """login_grace_time passed without a login."""
        if self.state is not SessionState.PROXYING:
            self.close(f"not logged in after {self.config.login_grace_time:.0f}s")

    def _check_idle(self) -> None:
        """Close after idle_timeout without client input, else check again later."""
        remaining = self.config.idle_timeout - (time.monotonic() - self._last_input)
        if remaining <= 0:
            self.close(f"idle for {self.config.idle_timeout:.0f}s")
            return
        self._timers[0] = asyncio.get_running_loop().call_later(remaining, self._check_idle)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a task tied to this session (cancelled when it closes)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
