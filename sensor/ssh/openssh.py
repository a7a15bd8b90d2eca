"""Where asyncssh's transport says what OpenSSH 9.2's sshd would not: overridden here
(what the server says comes from its persona, :mod:`sensor.ssh_persona`).

Written against asyncssh 2.24 (pinned in pyproject.toml): each override names the
asyncssh method it replaces, all of them private, so a new asyncssh release must be
checked against tests/integration/test_stealth_ssh.py (which compares the sensor with
Debian's own sshd) before the pin moves.

* KEXINIT: asyncssh adds ``ext-info-s`` (an OpenSSH 9.6 name) to the server's kex list;
  OpenSSH 9.2 with Debian's Terrapin fix adds only ``kex-strict-s-v00@openssh.com``
  (the persona's ``extra_kex_algs``).
* ext-info: asyncssh sends ``global-requests-ok`` and never
  ``publickey-hostbound@openssh.com``; OpenSSH 9.2 sends ``server-sig-algs`` then
  ``publickey-hostbound@openssh.com=0`` (the persona's ``ext_info``). OpenSSH clients
  then authenticate with ``publickey-hostbound-v00@openssh.com``, which asyncssh does
  not know: such a request is handled as the ``publickey`` request it extends (the key
  is still logged and refused).
* A NEWKEYS before any key exchange: asyncssh disconnects; OpenSSH answers UNIMPLEMENTED
  and waits.
* After login OpenSSH announces all its host keys (hostkeys-00@openssh.com); asyncssh
  skips that on connections started as ours are (``wait="auth"``).
* DH group exchange: asyncssh answers from its own groups, down to 1024 bits; OpenSSH
  picks from its moduli (:mod:`sensor.ssh.gex`), or closes.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.constants import MSG_NEWKEYS, MSG_UNIMPLEMENTED
from asyncssh.kex import _kex_handlers
from asyncssh.kex_dh import MSG_KEX_DH_GEX_REQUEST_OLD, _KexDHGex
from asyncssh.misc import ProtocolError
from asyncssh.packet import MPInt, SSHPacket, String, UInt32

from sensor.session.latch import Latch
from sensor.ssh.gex import GroupChooser
from sensor.ssh.pump import InnerSide
from sensor.ssh_persona import Persona

HOSTBOUND_METHOD = b"publickey-hostbound-v00@openssh.com"
# Shared by every server connection in place of sets only a client fills.
_NEVER_FILLED: set[Any] = set()


class OpenSSHServerConnection(asyncssh.SSHServerConnection):
    """asyncssh's server connection, saying what OpenSSH 9.2 says where they differ."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        options: asyncssh.SSHServerConnectionOptions,
        persona: Persona,
        dh_groups: GroupChooser,
        server_factory: Callable[[], asyncssh.SSHServer],
        waiter: asyncio.Future[None],
    ) -> None:
        # ``options`` are the sensor's, shared by every connection as asyncssh's own
        # listeners share theirs; what is this connection's is set here instead (asyncssh's
        # run_server would copy the options, about 4 KB a connection, to carry these two).
        super().__init__(loop, options)
        # A client's host key checks: asyncssh makes five empty sets per connection, a
        # server never fills or reads them (about 1 KB a held session). A client's
        # ext-info replaces ``_server_sig_algs`` rather than adding to it.
        self._trusted_host_keys = self._trusted_ca_keys = None
        self._revoked_host_keys = self._x509_revoked_certs = _NEVER_FILLED
        self._server_sig_algs = _NEVER_FILLED
        self._protocol_factory = server_factory
        self._wait, self._waiter = "auth", waiter
        self.persona = persona
        self.dh_groups = dh_groups
        self._host_keys_sent = False
        # asyncssh's asyncio.Event here makes its waiter deque up front (about 0.75 KB a
        # held session); asyncssh only sets it, tests it and waits on it, as a Latch does.
        self._close_event = Latch()  # type: ignore[assignment]

    def create_server_channel(
        self, encoding: str | None = "", errors: str = "", window: int = 0, max_pktsize: int = 0
    ) -> asyncssh.SSHServerChannel[Any]:
        """asyncssh's channel, with a :class:`Latch` for its close event (as the
        connection's: about 0.75 KB a held channel)."""
        chan = super().create_server_channel(encoding, errors, window, max_pktsize)
        chan._close_event = Latch()  # type: ignore[assignment]
        return chan

    def forget_waiter(self) -> None:
        """:func:`run_server` has heard of the login: asyncssh would keep the done
        future for the connection's life (and only ever tests it for None)."""
        self._waiter = None

    async def reload_config(self) -> None:
        """Nothing to re-evaluate: the sensor's options come from no sshd_config, so
        no Match block can apply. asyncssh would build a copy of them per login (about
        5 KB held for the session's life, made on a worker thread) to find that out."""

    def _get_extra_kex_algs(self) -> list[bytes]:
        """Replaces asyncssh's ``[ext-info-s, kex-strict-s-v00@openssh.com]``."""
        return [name.encode() for name in self.persona.extra_kex_algs]

    def _send_ext_info(self) -> None:
        """The persona's extensions (asyncssh has filled in server-sig-algs)."""
        self._extensions_to_send.pop(b"global-requests-ok", None)
        for name, value in self.persona.ext_info:
            self._extensions_to_send[name.encode()] = value.encode()
        super()._send_ext_info()
        # Sent once, after the first key exchange; kept, they cost a held session 0.5 KB.
        self._extensions_to_send = OrderedDict()

    async def send_userauth_success(self) -> None:
        """Then the host keys, as sshd's ``notify_hostkeys`` right after login."""
        await super().send_userauth_success()
        self.send_server_host_keys()

    def send_server_host_keys(self) -> None:
        """Once (asyncssh sends them itself on connections not waited for)."""
        if not self._host_keys_sent:
            self._host_keys_sent = True
            super().send_server_host_keys()

    def _process_newkeys(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        """A NEWKEYS with no key exchange under way is an unknown message to OpenSSH."""
        if self._kex is None and not self._next_recv_encryption and not self._strict_kex:
            packet.check_end()
            self.send_packet(MSG_UNIMPLEMENTED, UInt32(pktid))
            return
        super()._process_newkeys(pkttype, pktid, packet)
        # Both KEXINIT payloads served only the exchange hash, which is computed by now;
        # a later key exchange sends and receives new ones. Kept, they cost a held
        # session 2-6 KB for nothing.
        self._client_kexinit = self._server_kexinit = b""

    # asyncssh dispatches through this class attribute, not through method lookup.
    _packet_handlers = {
        **asyncssh.SSHServerConnection._packet_handlers,
        MSG_NEWKEYS: _process_newkeys,
    }

    async def _finish_userauth(self, begin_auth: bool, method: bytes, packet: SSHPacket) -> None:
        """A host-bound public key request goes on as the plain ``publickey`` one."""
        if method == HOSTBOUND_METHOD:
            method, packet = b"publickey", without_host_key(packet)
        await super()._finish_userauth(begin_auth, method, packet)


def without_host_key(packet: SSHPacket) -> SSHPacket:
    """A ``publickey-hostbound-v00`` request body as a ``publickey`` one: the server host
    key after the client's key taken out (the rest, a signature if any, kept)."""
    has_signature = packet.get_boolean()
    algorithm = packet.get_string()
    key = packet.get_string()
    packet.get_string()  # the server's host key
    rest = packet.get_remaining_payload()
    return SSHPacket(bytes([has_signature]) + String(algorithm) + String(key) + rest)


class OpenSSHGroupExchange(_KexDHGex):
    """asyncssh's DH group exchange, answering requests with OpenSSH's choice of group."""

    def _process_request(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        """Replaces ``_KexDHGex._process_request`` on our server connections."""
        conn = self._conn
        if not isinstance(conn, OpenSSHServerConnection):
            super()._process_request(pkttype, pktid, packet)
            return
        if self._p:
            raise ProtocolError("Kex DH group already requested")
        self._gex_data = packet.get_remaining_payload()
        if pkttype == MSG_KEX_DH_GEX_REQUEST_OLD:
            (minimum, maximum), preferred = conn.dh_groups.bits, packet.get_uint32()
        else:
            minimum, preferred, maximum = (packet.get_uint32() for _ in range(3))
        packet.check_end()
        group = conn.dh_groups.choose(minimum, preferred, maximum)
        if group is None:
            # OpenSSH logs "DH_GEX_REQUEST, bad parameters" and exits: no DISCONNECT.
            conn.abort()
            return
        self._init_group(group.g, group.p)
        self._gex_data += MPInt(group.p) + MPInt(group.g)
        self.send_packet(self._group_type, MPInt(group.p), MPInt(group.g))

    _packet_handlers = {
        **_KexDHGex._packet_handlers,
        MSG_KEX_DH_GEX_REQUEST_OLD: _process_request,
        _KexDHGex._request_type: _process_request,
    }


def install() -> None:
    """Make asyncssh's group-exchange kex names use :class:`OpenSSHGroupExchange`
    (process-wide; only server connections of ours take the new path)."""
    for name, (handler, hash_alg, args) in list(_kex_handlers.items()):
        if handler is _KexDHGex:
            _kex_handlers[name] = (OpenSSHGroupExchange, hash_alg, args)


async def run_server(
    transport: InnerSide,
    options: asyncssh.SSHServerConnectionOptions,
    persona: Persona,
    dh_groups: GroupChooser,
    server_factory: Callable[[], asyncssh.SSHServer],
) -> asyncssh.SSHServerConnection:
    """``asyncssh.run_server`` with an :class:`OpenSSHServerConnection` on the pump's
    ``transport``, on the shared ``options``; returns the connection once the client has
    logged in."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    conn = OpenSSHServerConnection(loop, options, persona, dh_groups, server_factory, waiter)
    transport.attach(conn)
    try:
        async with asyncio.timeout(options.connect_timeout):
            await waiter
    except BaseException:
        # As asyncssh's run_server: a connection that failed before login is torn down.
        conn.abort()
        await conn.wait_closed()
        raise
    conn.forget_waiter()
    return conn
