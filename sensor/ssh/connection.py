"""One SSH attacker connection: the protocol adapter over :class:`sensor.session.core.Session`.

:class:`AttackerConnection` owns what is SSH's: the byte pump with asyncssh behind it,
the cleartext parser (version, KEXINIT), authentication, the relayed channels and
captured files. The session core owns the rest (state, timers, slot, guest link,
events, recording, the end). :class:`sensor.ssh.server.AttackerServer` is asyncssh's
view of the connection.

Bounds enforced here: failed logins and channels; bytes before login, idle time, login
grace time and total time are the core's; connection counts are
:mod:`sensor.session.admission`'s; buffers are the pump's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import asyncssh

from honeyfleet.v1.artefact_pb2 import ARTEFACT_KIND_CAPTURE as CAPTURE
from sensor.capture import Capture, FileStore
from sensor.config import SensorConfig
from sensor.events import SessionEvents
from sensor.recording import Recorder
from sensor.session.admission import Slot
from sensor.session.core import Adapter, Services, Session
from sensor.session.guest import GuestLink
from sensor.session.latch import Latch
from sensor.session.state import SessionState
from sensor.ssh import openssh
from sensor.ssh.channels import RefusedForward, RelaySession
from sensor.ssh.cleartext import CleartextParser, KexInit
from sensor.ssh.compression import limit_inflation
from sensor.ssh.faildelay import FailDelay
from sensor.ssh.gex import GroupChooser
from sensor.ssh.guest import GuestSessions
from sensor.ssh.pump import AttackerSide, InnerSide
from sensor.ssh.server import AttackerServer
from sensor.ssh.stdin import STDIN


@dataclass(frozen=True)
class Shared:
    """What every SSH connection of a sensor uses."""

    services: Services
    store: FileStore
    options: asyncssh.SSHServerConnectionOptions
    dh_groups: GroupChooser
    fail_delay: FailDelay


# Seconds a connection asyncssh disconnected may take to pass asyncssh's last message on.
DISCONNECT_LINGER = 5.0


class DrainedInner(InnerSide):
    """asyncssh's transport, saying when asyncssh's last bytes have been passed on."""

    __slots__ = ("drained_latch",)

    def __init__(self, attacker: AttackerSide) -> None:
        super().__init__(attacker)
        self.drained_latch = Latch()

    def drained(self) -> None:
        """asyncssh closed its end: everything it sent is on its way to the attacker."""
        self.drained_latch.set()


class AttackerConnection(Adapter):
    """One attacker's SSH connection, from accept to the last event."""

    __slots__ = (
        "_auth_failures",
        "_channels",
        "_drain",
        "_forwards",
        "_guest",
        "_inner",
        "_refused_a_channel",
        "_side",
        "_ssh",
        "_storing",
        "config",
        "events",
        "files",
        "parser",
        "persona",
        "session",
        "shared",
        "write_buffer_high",
    )

    def __init__(
        self,
        shared: Shared,
        side: AttackerSide,
        slot: Slot,
        peer: tuple[str, int],
        local: tuple[str, int],
    ) -> None:
        config = shared.services.config
        self.shared = shared
        self.config: SensorConfig = config
        self.write_buffer_high = config.write_buffer_high
        self.persona = config.persona
        self.parser = CleartextParser(
            self,
            max_packet=config.max_packet_size,
            mismatch=self.persona.protocol_mismatch,
            invalid=self.persona.invalid_identification,
        )
        self._side = side
        self._inner = DrainedInner(side)
        side.inner = self._inner
        self._auth_failures = 0
        # Lists, not sets: an empty set is 216 bytes, held by every session.
        self._channels: list[RelaySession] = []
        self._forwards = 0
        self._refused_a_channel = False
        self._ssh: asyncssh.SSHServerConnection | None = None
        self._guest: GuestSessions | None = None
        self._storing: list[asyncio.Task[None]] = []
        self._drain = False
        self.session = Session(shared.services, self, slot, protocol="ssh", peer=peer, local=local)
        self.events: SessionEvents = self.session.events
        self.files = shared.store.session(self.session.artefacts, self.events.log)
        self.session.spawn(self._serve())

    @property
    def client_backlog(self) -> int:
        """Bytes waiting to be sent to the attacker (bounded by write_buffer_high)."""
        return self._side.buffered

    # Start-up: asyncssh on the pump's transport.

    async def _serve(self) -> None:
        """Run asyncssh's server side of this connection."""
        # asyncssh runs in this task's context (the pump keeps it), where the bound is kept.
        limit_inflation(self.config.ssh_max_inflated_bytes, self.close)
        try:
            await openssh.run_server(
                self._inner,
                self.shared.options,
                self.persona,
                self.shared.dh_groups,
                # asyncssh keeps the factory for the connection's life: a partial is
                # about half the size of a closure.
                server_factory=functools.partial(AttackerServer, self, self.persona.auth_methods),
            )
        except (asyncssh.Error, OSError) as e:
            self.close(f"ssh: {e}")

    def ssh_started(self, conn: asyncssh.SSHServerConnection) -> None:
        """asyncssh made its connection (run_server only returns it after auth)."""
        self._ssh = conn

    # Pump callbacks.

    def attacker_bytes(self, count: int) -> str | None:
        """Note input; past a bound (bytes before login, environment), why the connection ends.

        The environment is checked as each read arrives, so what asyncssh keeps of env
        requests stays within its bound plus what is in flight to asyncssh (itself
        bounded by the pump's buffers).
        """
        if reason := self.session.received(count):
            return reason
        for relay in self._channels:
            if reason := relay.environment_overflow():
                return reason
        return None

    def attacker_backlog(self, high: bool) -> None:
        """A client that stops reading stops the guest's output, so nothing piles up."""
        for relay in self._channels:
            if relay.guest_reading is not None:
                hold = relay.guest_reading.hold if high else relay.guest_reading.release
                hold("client backlog")

    def pump_closed(self, reason: str) -> None:
        """Either end of the pump closed."""
        self.close(reason)

    # Cleartext parser callbacks.

    def client_version(self, version: str) -> None:
        """The client's identification line."""
        self.events.emit("cowrie.client.version", "Remote SSH version: {version}", version=version)

    def client_kexinit(self, kexinit: KexInit) -> None:
        """The client's algorithms and hassh."""
        self.events.emit(
            "cowrie.client.kex",
            "SSH client hassh fingerprint: {hassh}",
            hassh=kexinit.hassh,
            hasshAlgorithms=kexinit.hassh_algorithms,
            kexAlgs=kexinit.kex,
            keyAlgs=kexinit.host_key,
            encCS=kexinit.encryption,
            macCS=kexinit.mac,
            compCS=kexinit.compression,
            # Cowrie splits the empty name-list too, as [""].
            langCS=kexinit.languages or [""],
        )

    # Authentication.

    def can_try(self) -> bool:
        """Whether another attempt is heard (not once the connection is closing)."""
        return self.session.closing is None and self._auth_failures < self.config.max_auth_attempts

    async def refused(self, started: float, username: str) -> None:
        """A failed password (asked at ``started``): wait as OpenSSH with PAM does
        (:mod:`sensor.ssh.faildelay`), then count it.

        The wait is a sleep on the event loop, inside asyncssh's auth task (the slot is
        held meanwhile, as OpenSSH holds its MaxStartups slot until auth ends).
        """
        await self.shared.fail_delay.wait(started, username)
        self.count_failure()

    def count_failure(self) -> None:
        """One more failed attempt; the one that reaches max_auth_attempts disconnects.

        As OpenSSH's ``auth_maxtries_exceeded``: the persona's code and text (2, "Too many
        authentication failures"), in place of a USERAUTH_FAILURE.
        """
        self._auth_failures += 1
        if self._auth_failures < self.config.max_auth_attempts or self.session.closing:
            return
        if self._ssh is not None:
            self._ssh.disconnect(*self.persona.too_many_failures)
        # The pump passes asyncssh's disconnect message on before it closes, as OpenSSH
        # says why it hangs up.
        self._drain = self._ssh is not None
        self.session.close("too many authentication failures", hang_up=not self._drain)

    async def login(self, username: str, password: str) -> bool:
        """Check a password against the userdb; on success lease and join a guest.

        The attacker is let in (and ``cowrie.login.success`` written) only once the
        guest's login is open; without a guest the login fails as a wrong password
        does, and the events say why. A connection already closing refuses: a join
        started now would hold a lease that nothing gives back.
        """
        if not self.can_try():
            return False
        started = asyncio.get_running_loop().time()
        if not self.shared.services.userdb.check(username, password):
            self.session.login_attempt(username, password, accepted=False)
            await self.refused(started, username)
            return False
        joining = self.session.join(self._open_guest)
        try:
            failure = await asyncio.shield(joining)
        except asyncio.CancelledError:
            self.close("authentication abandoned")
            raise
        if failure is not None or self.session.closing is not None:
            self.session.login_attempt(username, password, accepted=False, penalise=False)
            await self.refused(started, username)
            return False
        self.session.login_attempt(username, password, accepted=True)
        self.session.logged_in()
        return True

    async def _open_guest(self, link: GuestLink) -> None:
        """Reach the guest's pool node; each channel is a session on its login there."""
        await link.reach_node()
        self._guest = GuestSessions(link, self.config.guest_login_timeout)
        link.hold(None, self._guest.close)

    async def public_key(self, username: str, key: asyncssh.SSHKey) -> None:
        """Log an offered public key and its refusal (a failed login, as Cowrie counts it),
        answered after sshd's padding (a few ms: :mod:`sensor.ssh.faildelay`)."""
        if not self.can_try():
            return
        started = asyncio.get_running_loop().time()
        self.session.auth_failed()
        self.shared.services.metrics.logins.labels("failed").inc()
        # Cowrie puts the same key fields on both events.
        fields: dict[str, Any] = {
            "username": username,
            "fingerprint": key.get_fingerprint("md5").removeprefix("MD5:"),
            "key": key.export_public_key().decode("ascii", "replace").strip(),
            "type": key.get_algorithm(),
        }
        self.events.emit(
            "cowrie.client.fingerprint",
            "public key attempt for user {username} of type {type} with fingerprint {fingerprint}",
            **fields,
        )
        self.events.emit(
            "cowrie.login.failed", "public key login attempt for [{username}] failed", **fields
        )
        await self.shared.fail_delay.pad(started, username)
        self.count_failure()

    # Channels.

    def session_channel(self) -> RelaySession | bool:
        """A relay for a new session channel, within max_channels."""
        if self.state is not SessionState.PROXYING or not self._channel_room():
            return False
        relay = RelaySession(self)
        self._channels.append(relay)
        return relay

    def direct_tcpip(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> RefusedForward | bool:
        """Log a port-forward request; accept it only to log its first bytes.

        One refused for want of room is not an event (like a refused session channel):
        a client may ask again and again.
        """
        if not self._channel_room():
            return False
        self.events.emit(
            "cowrie.direct-tcpip.request",
            "direct-tcp connection request to {dst_ip}:{dst_port} from {orig_ip}:{orig_port}",
            dst_ip=dest_host,
            dst_port=dest_port,
            orig_ip=orig_host,
            orig_port=orig_port,
        )
        self._forwards += 1
        return RefusedForward(
            self.events, self._forwards, (dest_host, dest_port), self._forward_done
        )

    def _forward_done(self) -> None:
        """A logged forward channel closed."""
        self._forwards -= 1

    def _channel_room(self) -> bool:
        """Whether another channel fits max_channels."""
        if len(self._channels) + self._forwards < self.config.max_channels:
            return True
        # Once per connection: a client may ask again and again, each a log line.
        if not self._refused_a_channel:
            self._refused_a_channel = True
            self.events.log.warning(
                "refused a channel: %d open (later refusals are not logged)",
                self.config.max_channels,
            )
        return False

    @property
    def guest(self) -> GuestSessions:
        """The guest's sessions (only asked for while proxying)."""
        assert self._guest is not None
        return self._guest

    def recorder(self, width: int, height: int, term: str) -> Recorder:
        """The connection's recording, made for the first terminal channel."""
        return self.session.recorder(width, height, term)

    def channel_closed(self, relay: RelaySession) -> None:
        """A relayed channel ended."""
        if relay in self._channels:
            self._channels.remove(relay)

    def file_captured(self, how: str, name: str, capture: Capture) -> None:
        """A complete upload (``how``: "SCP", "SFTP" or STDIN): store it (hashed on a
        thread), then report it."""
        task = asyncio.create_task(self._store_file(how, name, capture))
        self._storing.append(task)
        task.add_done_callback(self._storing.remove)

    async def _store_file(self, how: str, name: str, capture: Capture) -> None:
        """Keep a captured file under its sha256, report it the way Cowrie does, and queue it
        for the controller's artefact store."""
        try:
            stored = await capture.finish()
        except OSError as e:
            self.events.log.error("cannot keep an uploaded file: %s", e)
            return
        if stored is None:
            return
        if how == STDIN:
            # Cowrie's event for a command's saved stdin: no file name, an empty destfile.
            self.events.emit(
                "cowrie.session.file_upload",
                "Saved stdin contents with SHA-256 {shasum} to {outfile}",
                duplicate=stored.duplicate,
                outfile=str(stored.path),
                shasum=stored.shasum,
                destfile="",
                size=stored.size,
            )
        else:
            self.events.emit(
                "cowrie.session.file_upload",
                how + ' Uploaded file "{filename}" to {outfile}',
                filename=name.rsplit("/", 1)[-1],
                duplicate=stored.duplicate,
                url=name,
                outfile=str(stored.path),
                shasum=stored.shasum,
                destfile=name,
                size=stored.size,
            )
        await self.shared.services.outbox.put(
            stored.path, CAPTURE, session=self.events.session, filename=name, sha256=stored.shasum
        )

    # The end (SessionAdapter).

    def hang_up(self) -> None:
        """Close both ends of the pump (the attacker's after flushing, within a bound)."""
        self._side.close()
        self._inner.close()

    async def wind_down(self) -> None:
        """Pass asyncssh's last message on (after a disconnect), then close asyncssh."""
        if self._drain:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DISCONNECT_LINGER):
                    await self._inner.drained_latch.wait()
            self.hang_up()
        if self._ssh is not None:
            self._ssh.close()

    async def last_words(self) -> None:
        """Captured files are reported before the session's last events."""
        if self._storing:
            await asyncio.wait(self._storing)
