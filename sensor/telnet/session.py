"""One attacker's Telnet connection: the protocol adapter over :class:`sensor.session.core.Session`.

:class:`TelnetSession` owns what is Telnet's: the negotiation bounds on both sides, the
client's terminal (:mod:`sensor.telnet.client`), the login dialogue
(:mod:`sensor.telnet.dialogue`), the telnetlib3 client towards the guest and the relay
once logged in. The session core owns the rest (state, timers, slot, guest link,
events, recording, the end). A guest is leased only for a login that deserves one: with
spoofing once the userdb accepted it, without once a password was typed.
"""

from __future__ import annotations

import asyncio
import contextlib

from telnetlib3.stream_reader import TelnetReader
from telnetlib3.stream_writer import TelnetWriter

from honeyfleet.v1 import common_pb2
from sensor.lineinput import LineEditor
from sensor.linger import close_with_linger
from sensor.session.admission import Slot
from sensor.session.core import Adapter, Services, Session
from sensor.session.guest import GuestLink
from sensor.session.state import SessionState
from sensor.telnet.client import ClientInfo
from sensor.telnet.dialogue import Dialogue
from sensor.telnet.guest import GuestTelnet, open_guest
from sensor.telnet.login import LoginState
from sensor.telnet.negotiation import NegotiationGuard, NegotiationViolation
from sensor.telnet.rawlog import Direction, RawLog

CHUNK = 64 * 1024
# Output shown before the first keystroke, replayed into the recording when it starts.
MAX_EARLY_OUTPUT = 8192


class TelnetSession(Adapter):
    """Everything Telnet about one attacker connection."""

    def __init__(
        self,
        services: Services,
        transport: asyncio.Transport,
        slot: Slot,
        peer: tuple[str, int],
        local: tuple[str, int],
    ) -> None:
        config = services.config
        self.config = config
        self._transport = transport
        self.session = Session(services, self, slot, protocol="telnet", peer=peer, local=local)
        self.events = self.session.events
        self._writer: TelnetWriter | None = None
        self._client = ClientInfo(config, self.events)
        self._guest_guard = NegotiationGuard(
            max_subnegotiation=config.telnet_max_subnegotiation,
            max_negotiations=config.telnet_max_negotiations,
        )
        self._raw = RawLog(self.events.log, config.log_raw_max_bytes) if config.log_raw else None
        self._dialogue = Dialogue(self, config, services.userdb, peer[0])
        self._early_output = bytearray()
        self._editor: LineEditor | None = None
        self._guest: GuestTelnet | None = None

    @property
    def login_state(self) -> LoginState:
        """Where the login dialogue is."""
        return self._dialogue.state

    # The attacker's connection (TelnetdProtocol's peer).

    def from_attacker(self, data: bytes) -> bool:
        """Raw bytes from the attacker: bounds, raw log; False if the session must end."""
        if self._raw is not None:
            self._raw(Direction.FROM_ATTACKER, data)
        if reason := self.session.received(len(data)):
            self.close(reason)
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
        if self.session.closing is not None:
            return
        self._writer = writer
        self._client.report_options()
        self._dialogue.start(self._client.username)
        self.session.spawn(self._attacker_pump(reader))

    def window(self, cols: int, rows: int) -> None:
        """The client's window size: logged once, passed on to the recording and guest."""
        self._client.resized(cols, rows)
        if self.session.recording is not None:
            self.session.recording.resize(cols, rows)
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
        if self.session.recording is not None:
            self.session.recording.input(data)
        if self._editor is not None:
            self._editor.feed(data)

    def _start_recording(self) -> None:
        """The first keystroke starts the recording, with what was shown so far."""
        if self.session.recording is not None:
            return
        cols, rows = self._client.window
        recording = self.session.recorder(cols, rows, self._client.term)
        recording.output(bytes(self._early_output))
        self._early_output.clear()

    def _command(self, line: str) -> None:
        """A command line typed into the guest's shell."""
        self.events.emit("cowrie.command.input", "CMD: {input}", input=line)

    # DialogueHost.

    def show(self, data: bytes) -> None:
        """Bytes for the attacker."""
        if self._writer is None or self.session.closing is not None:
            return
        self._writer.write(data)
        if self.session.recording is not None:
            self.session.recording.output(data)
        elif len(self._early_output) < MAX_EARLY_OUTPUT:
            self._early_output += data[: MAX_EARLY_OUTPUT - len(self._early_output)]

    def echo(self, data: bytes) -> None:
        """Echo typing, if the client let us (it agreed to our WILL ECHO)."""
        if self._writer is not None and self._writer.will_echo:
            self.show(data)

    def record_input(self, data: bytes) -> None:
        """Login keystrokes the recording may keep."""
        if self.session.recording is not None and data:
            self.session.recording.input(data)

    def send_guest(self, data: bytes) -> None:
        """Bytes for the guest (login answers)."""
        if self._guest is not None and self._guest.writer is not None:
            self._guest.writer.write(data)

    def login_attempt(
        self, username: str, password: str, *, accepted: bool, penalise: bool = True
    ) -> None:
        """cowrie.login.success or .failed."""
        self.session.login_attempt(username, password, accepted=accepted, penalise=penalise)

    def want_guest(self) -> None:
        """Lease a guest and open its login, unless that is under way."""
        if self.session.closing is None and not self.session.joining:
            self.session.spawn(self._joined(self.session.join(self._open_guest)))

    def refuse(self) -> None:
        """A failed login without a guest: wait as login does, then say so."""
        self.session.spawn(self._refuse())

    async def _refuse(self) -> None:
        """The delay, then Login incorrect and the prompt."""
        await asyncio.sleep(self.config.telnet_login_fail_delay)
        self._dialogue.refused()

    def logged_in(self, typed_ahead: bytes) -> None:
        """The guest let the attacker in: relay from now on."""
        if self.session.closing is not None:
            return
        self.session.logged_in()
        self._editor = LineEditor(self._command, max_line=self.config.telnet_max_line)
        if typed_ahead:
            self._to_shell(typed_ahead)

    def too_many_attempts(self) -> None:
        """Past max_auth_attempts."""
        self.close("too many authentication failures")

    def awaiting_verdict(self, attempt: int) -> None:
        """Give the guest guest_login_timeout to say how the attempt went."""
        self.session.timers.arm(
            "verdict", self.config.guest_login_timeout, self._no_verdict, attempt
        )

    def _no_verdict(self, attempt: int) -> None:
        """guest_login_timeout after a password; a closing session logs no verdict."""
        if self.session.closing is None:
            self._dialogue.no_verdict(attempt)

    # The guest.

    async def _joined(self, joining: asyncio.Task[str | None]) -> None:
        """Once a guest is leased and its client open, hand it to the dialogue."""
        failure = await joining
        if self.session.closing is not None:
            return
        if failure is not None:
            self._dialogue.guest_unavailable()
            return
        lease = self.session.link.lease
        assert lease is not None
        self._dialogue.guest_attached(lease.username, lease.password)
        self.session.timers.arm("guest_late", self.config.guest_login_timeout, self._guest_late)

    async def _open_guest(self, link: GuestLink) -> None:
        """A tunnel to the guest's telnetd and a client on it, its output pumped."""
        tunnel = await link.open_tunnel(
            self.config.guest_login_timeout, common_pb2.GUEST_PORT_TELNET
        )
        guest = self._guest = await open_guest(tunnel.sock, self._guest_client)
        link.hold(asyncio.create_task(self._guest_pump(guest, link)), self._close_guest)

    def _close_guest(self) -> None:
        """The guest link is dropped: close the client."""
        guest, self._guest = self._guest, None
        if guest is not None and guest.writer is not None:
            guest.writer.close()

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
        lease = self.session.link.lease
        if self._client.username is None:
            return None
        if self.config.telnet_spoof_authentication and lease is not None:
            return lease.username
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

    async def _guest_pump(self, guest: GuestTelnet, link: GuestLink) -> None:
        """The guest's output: through the dialogue to the attacker, at the attacker's pace."""
        assert guest.reader is not None
        with contextlib.suppress(ConnectionError):
            while data := await guest.reader.read(CHUNK):
                self._dialogue.guest_data(data)
                if self._writer is not None:
                    await self._writer.drain()
        # A guest that closes is a logout; a tunnel that broke is an event.
        if self.session.closing is None:
            link.lost("the guest closed the connection", report=False)

    def _guest_late(self) -> None:
        """A guest that has not asked for a password in time is as good as none."""
        dialogue = self._dialogue
        if dialogue.state is LoginState.WAITING and not dialogue.passwords_sent:
            self.session.spawn(self._abandon_guest("no login prompt from the guest in time"))

    async def _abandon_guest(self, reason: str) -> None:
        """Give the guest up; the attacker sees a failed login."""
        if await self.session.abandon_guest(reason):
            self._dialogue.guest_unavailable()

    # The end (SessionAdapter).

    def hang_up(self) -> None:
        """Close the attacker's connection.

        With a linger: a client that never reads would hold the transport (and its
        write buffer) for ever after the admission slot went back.
        """
        close_with_linger(self._transport)

    async def wind_down(self) -> None:
        """Nothing of Telnet's own needs closing before the guest goes."""

    async def last_words(self) -> None:
        """What the client told during negotiation, if it was not reported yet."""
        self._client.report_options()
