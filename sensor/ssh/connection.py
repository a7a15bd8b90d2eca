"""One attacker connection: authentication, the guest behind it, bounds and the record.

:class:`AttackerConnection` owns everything a connection holds: its events, its state
(see :mod:`sensor.ssh.state`), the byte pump, the guest link (lease, tunnel, guest
login), the relayed channels, captured files and the recording.
:class:`sensor.ssh.server.AttackerServer` is asyncssh's view of it.

Bounds enforced here: bytes before login, auth attempts, channels, idle time once
logged in and the total session time. The login grace time is asyncssh's login timer;
connection counts are :mod:`sensor.ssh.admission`'s; buffers are the pump's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Any

import asyncssh

from honeyfleet.events import new_session_id
from sensor.artefacts import ArtefactReport
from sensor.capture import Capture, FileStore
from sensor.config import SensorConfig
from sensor.events import EventLog, SessionEvents
from sensor.leases import LeaseClient, LeaseFailed
from sensor.metrics import SensorMetrics
from sensor.recording import Recorder
from sensor.ssh.admission import Admission
from sensor.ssh.channels import RefusedForward, RelaySession
from sensor.ssh.cleartext import CleartextParser, KexInit
from sensor.ssh.compression import limit_inflation
from sensor.ssh.guest import GuestLink
from sensor.ssh.pump import AttackerSide, InnerSide
from sensor.ssh.server import AttackerServer
from sensor.ssh.state import SessionState, transition
from sensor.tunnel import TunnelConnector, TunnelFailed
from sensor.userdb import UserDB


@dataclass(frozen=True)
class Shared:
    """What every connection of a sensor uses."""

    config: SensorConfig
    sensor: str
    events: EventLog
    metrics: SensorMetrics
    userdb: UserDB
    leases: LeaseClient
    tunnels: TunnelConnector
    store: FileStore
    admission: Admission
    options: asyncssh.SSHServerConnectionOptions


# Seconds a connection asyncssh disconnected may take to pass asyncssh's last message on.
DISCONNECT_LINGER = 5.0


class DrainedInner(InnerSide):
    """The pump's asyncssh end, saying when asyncssh's last bytes have been passed on."""

    def __init__(self, attacker: AttackerSide, high_water: int) -> None:
        super().__init__(attacker, high_water)
        self.drained = asyncio.Event()

    def eof_received(self) -> bool:
        """asyncssh closed its end: everything it sent is on its way to the attacker."""
        keep_open = super().eof_received()
        self.drained.set()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        """Our end is closed."""
        super().connection_lost(exc)
        self.drained.set()


class AttackerConnection:
    """Everything about one attacker connection, from accept to the last event."""

    def __init__(
        self, shared: Shared, side: AttackerSide, peer: tuple[str, int], local: tuple[str, int]
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
            protocol="ssh",
        )
        self.artefacts = ArtefactReport(self.events, shared.metrics)
        self.files = shared.store.session(self.artefacts, self.events.log)
        self.write_buffer_high = config.write_buffer_high
        self.parser = CleartextParser(self, max_packet=config.max_packet_size)
        self.state = SessionState.CONNECTED
        self.closed = asyncio.Event()
        self._side = side
        self._inner = DrainedInner(side, config.write_buffer_high)
        side.inner = self._inner
        self._link = GuestLink(
            config=config,
            leases=shared.leases,
            tunnels=shared.tunnels,
            events=self.events,
            src_ip=self.src_ip,
            on_lost=self.close,
        )
        self._started = time.monotonic()
        self._last_input = self._started
        self._preauth_bytes = 0
        self._auth_attempts = 0
        self._channels: set[RelaySession] = set()
        self._forwards = 0
        self._ssh: asyncssh.SSHServerConnection | None = None
        self._joining: asyncio.Task[bool] | None = None
        self._recorder: Recorder | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._storing: set[asyncio.Task[None]] = set()
        self._closing: str | None = None
        loop = asyncio.get_running_loop()
        # The idle timer starts at login: before it, the login grace time is the bound.
        self._idle: asyncio.TimerHandle | None = None
        self._session_timer = loop.call_later(
            config.session_timeout, self.close, "session time limit reached"
        )
        self.events.emit(
            "cowrie.session.connect",
            "New connection: {src_ip}:{src_port} ({dst_ip}:{dst_port}) [session: {session}]",
            src_port=peer[1],
            dst_ip=local[0],
            dst_port=local[1],
        )
        shared.admission.connections.add(self)
        self._spawn(self._serve())

    @property
    def client_backlog(self) -> int:
        """Bytes waiting to be sent to the attacker (bounded by write_buffer_high)."""
        return self._side.buffered

    # Start-up: asyncssh on our end of a socketpair, the pump on the other.

    async def _serve(self) -> None:
        """Run asyncssh's server side of this connection."""
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self._inner, sock=ours)
        # asyncssh's transport inherits this task's context, where the bound is kept.
        limit_inflation(self.config.ssh_max_inflated_bytes, self.close)
        try:
            await asyncssh.run_server(
                theirs, options=self.shared.options, server_factory=lambda: AttackerServer(self)
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
        self._last_input = time.monotonic()
        if self.state is SessionState.PROXYING:
            for relay in self._channels:
                if reason := relay.environment_overflow():
                    return reason
            return None
        self._preauth_bytes += count
        if self._preauth_bytes > self.config.max_preauth_bytes:
            return f"more than {self.config.max_preauth_bytes} bytes before login"
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
            langCS=kexinit.languages,
        )

    # Authentication.

    def counted_attempt(self) -> bool:
        """Count an attempt; False (and disconnect) once past max_auth_attempts."""
        self._auth_attempts += 1
        if self._auth_attempts <= self.config.max_auth_attempts:
            return True
        if self._ssh is not None:
            self._ssh.disconnect(
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "Too many authentication failures"
            )
        # The pump passes asyncssh's disconnect message on before it closes, as OpenSSH
        # says why it hangs up.
        self.close("too many authentication failures", drain=self._ssh is not None)
        return False

    async def login(self, username: str, password: str) -> bool:
        """Check a password against the userdb; on success lease and join a guest.

        A connection already closing refuses: a join started now would hold a lease
        that nothing gives back.
        """
        if self._closing is not None or not self.counted_attempt():
            return False
        ok = self.shared.userdb.check(username, password)
        self.shared.metrics.logins.labels("success" if ok else "failed").inc()
        self.events.emit(
            "cowrie.login.success" if ok else "cowrie.login.failed",
            "login attempt [{username}/{password}] " + ("succeeded" if ok else "failed"),
            username=username,
            password=password,
        )
        if not ok:
            return False
        # The join runs as our own task so that closing can cancel it and clean up.
        self._joining = asyncio.create_task(self._join())
        try:
            return await asyncio.shield(self._joining)
        except asyncio.CancelledError:
            self.close("authentication abandoned")
            raise

    def public_key(self, username: str, key: asyncssh.SSHKey) -> None:
        """Log an offered public key (always refused)."""
        if not self.counted_attempt():
            return
        fingerprint = key.get_fingerprint("md5").removeprefix("MD5:")
        self.events.emit(
            "cowrie.client.fingerprint",
            "public key attempt for user {username} of type {type} with fingerprint {fingerprint}",
            username=username,
            fingerprint=fingerprint,
            key=key.export_public_key().decode("ascii", "replace").strip(),
            type=key.get_algorithm(),
        )

    async def _join(self) -> bool:
        """Lease a guest and log into it; False (an ordinary failed login) if that fails."""
        # The login is on disk before it costs a guest.
        await self.events.flush()
        self._move(SessionState.LEASING)
        try:
            await self._link.acquire()
        except LeaseFailed as e:
            self.shared.metrics.lease_failures.inc()
            self.events.emit(
                "honeyfleet.lease.failed", "No guest for this session: {reason}", reason=str(e)
            )
            self._move(SessionState.CONNECTED)
            return False
        self._move(SessionState.JOINING)
        try:
            await self._link.login()
        except (TunnelFailed, asyncssh.Error, OSError, TimeoutError) as e:
            reason = f"cannot log into guest: {e or type(e).__name__}"
            self.events.emit(
                "honeyfleet.guest.failed", "Guest login failed: {reason}", reason=reason
            )
            await self._link.drop(reason)
            self._move(SessionState.CONNECTED)
            return False
        self._move(SessionState.PROXYING)
        self.shared.admission.logged_in()
        self.shared.metrics.sessions.inc()
        self.shared.metrics.sessions_total.inc()
        self._last_input = time.monotonic()
        self._idle = asyncio.get_running_loop().call_later(
            self.config.idle_timeout, self._check_idle
        )
        self.events.log.info("proxying into guest")
        return True

    # Channels.

    def session_channel(self) -> RelaySession | bool:
        """A relay for a new session channel, within max_channels."""
        if self.state is not SessionState.PROXYING or not self._channel_room():
            return False
        relay = RelaySession(self)
        self._channels.add(relay)
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
            "direct-tcp connection request to {dst_ip}:{dst_port} from {orig_ip}:{src_port}",
            dst_ip=dest_host,
            dst_port=dest_port,
            src_port=orig_port,
            message_args={"orig_ip": orig_host},
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
        self.events.log.warning("refused a channel: %d open", self.config.max_channels)
        return False

    @property
    def guest(self) -> asyncssh.SSHClientConnection:
        """The guest connection (only asked for while proxying)."""
        assert self._link.conn is not None
        return self._link.conn

    def recorder(self, width: int, height: int, term: str) -> Recorder:
        """The connection's recording, made for the first terminal channel."""
        if self._recorder is None:
            self._recorder = Recorder(
                self.config.recordings_dir / f"{self.events.session}.cast",
                width=width,
                height=height,
                term=term,
                max_bytes=self.config.recording_max_bytes,
            )
        return self._recorder

    def channel_closed(self, relay: RelaySession) -> None:
        """A relayed channel ended."""
        self._channels.discard(relay)

    def file_captured(self, how: str, name: str, capture: Capture) -> None:
        """A complete upload: store it (hashed on a thread), then report it."""
        task = asyncio.create_task(self._store_file(how, name, capture))
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)

    async def _store_file(self, how: str, name: str, capture: Capture) -> None:
        """Keep a captured file under its sha256 and report it the way Cowrie does."""
        try:
            stored = await capture.finish()
        except OSError as e:
            self.events.log.error("cannot keep an uploaded file: %s", e)
            return
        if stored is None:
            return
        self.events.emit(
            "cowrie.session.file_upload",
            how + ' Uploaded file "{filename}" to {outfile}',
            filename=name.rsplit("/", 1)[-1],
            outfile=str(stored.path),
            shasum=stored.shasum,
            size=stored.size,
        )

    # The end.

    def close(self, reason: str, *, drain: bool = False) -> None:
        """End the connection (idempotent); the clean-up runs as a task.

        ``drain``: asyncssh has closed its end after a last message for the attacker,
        which the pump passes on (for at most DISCONNECT_LINGER) before it closes.
        """
        if self._closing is not None:
            return
        self._closing = reason
        self._session_timer.cancel()
        if self._idle is not None:
            self._idle.cancel()
        if not drain:
            self._close_pump()
        self._spawn(self._finish(reason, drain), keep=False)

    def _close_pump(self) -> None:
        """Close both ends of the pump (the attacker's after flushing, within a bound)."""
        self._side.close()
        self._inner.close()

    async def _finish(self, reason: str, drain: bool) -> None:
        """Release everything, then write the last events."""
        self.events.log.info("closing: %s", reason)
        if drain:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DISCONNECT_LINGER):
                    await self._inner.drained.wait()
            self._close_pump()
        if self._ssh is not None:
            self._ssh.close()
        if self._joining is not None and not self._joining.done():
            # A lease still being granted is released by the lease client when it comes.
            self._joining.cancel()
            await asyncio.wait([self._joining])
        was_proxying = self.state is SessionState.PROXYING
        await self._link.drop(reason)
        for task in list(self._tasks):
            task.cancel()
        if self._storing:
            await asyncio.wait(self._storing)  # their events come before the last ones
        duration = time.monotonic() - self._started
        summary = self._recorder.close() if self._recorder is not None else None
        self.events.emit_closed(summary, duration, reason)
        await self.events.flush()
        self.shared.admission.release(self.src_ip, logged_in=was_proxying)
        if was_proxying:
            self.shared.metrics.sessions.dec()
        self.state = transition(self.state, SessionState.CLOSED)
        self.shared.admission.connections.discard(self)
        self.closed.set()

    # Helpers.

    def _move(self, new: SessionState) -> None:
        """Change state (illegal moves raise)."""
        self.state = transition(self.state, new)

    def _check_idle(self) -> None:
        """Close after idle_timeout without client input, else check again later."""
        remaining = self.config.idle_timeout - (time.monotonic() - self._last_input)
        if remaining <= 0:
            self.close(f"idle for {self.config.idle_timeout:g}s")
            return
        self._idle = asyncio.get_running_loop().call_later(remaining, self._check_idle)

    def _spawn(self, coro: Any, *, keep: bool = True) -> None:
        """Run a task tied to this connection (cancelled at close when ``keep``)."""
        task = asyncio.create_task(coro)
        if keep:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self.shared.admission.track(task)
