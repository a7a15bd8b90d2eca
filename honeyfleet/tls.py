"""Mutual-TLS credentials for fleet gRPC servers and channels."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from honeyfleet.errors import ConfigError
from honeyfleet.pki.identity import (
    Identity,
    Role,
    identity_dns_name,
    identity_from_certificate,
)

log = logging.getLogger(__name__)

# Server-side limits that apply to every fleet endpoint. Messages are small except
# tunnel frames and event batches, which senders chunk well below this.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_RECONNECT_BACKOFF_MS = 5000
# For channels with one long stream per session (the sensor's tunnels): gRPC's retry
# filter keeps about 6 KB of C state per call, held for the stream's life, only for
# transparent retries of streams that never reached the server (none of our calls has
# a retry policy). Without it such a stream fails UNAVAILABLE, as any broken one does.
NO_RETRY_STATE: tuple[tuple[str, int], ...] = (("grpc.enable_retries", 0),)
# For a member's channel on which every answer is small (its lease stream, its heartbeat
# stream): without BDP probing, a message the member receives no longer makes it send an
# HTTP/2 PING that the controller must read and acknowledge, a good part of the
# controller's gRPC thread wake-ups at fleet rates. The channel's receive window then
# stays at HTTP/2's 64 KB, which only bounds what the *member receives* (answers of a
# few hundred bytes). What it sends is bound by the controller's window, which this
# does not touch, and channels that carry bulk (uploads, tunnels, operators' queries)
# keep probing. Such a channel has a TCP connection of its own anyway: gRPC shares one
# only between channels with the same arguments and credentials.
SMALL_ANSWERS: tuple[tuple[str, int], ...] = (("grpc.http2.bdp_probe", 0),)
KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class TlsFiles:
    """Where a fleet member keeps its certificate, key and the fleet CA."""

    ca: Path
    """The fleet CA certificate (PEM)."""
    cert: Path
    """This member's certificate (PEM)."""
    key: Path
    """This member's private key (PEM); never leaves the host."""

    def read(self) -> tuple[bytes, bytes, bytes]:
        """Return (ca, cert, key) PEM bytes, with an actionable error if one is missing."""
        out = []
        for what, path in (("ca", self.ca), ("cert", self.cert), ("key", self.key)):
            try:
                out.append(path.read_bytes())
            except OSError as e:
                raise ConfigError(
                    f"tls {what}",
                    f"cannot read {path}: {e.strerror}; issue one with `honeyfleet pki issue` "
                    "or enrol with `honeyfleet <role> join`",
                ) from None
        return out[0], out[1], out[2]

    def identity(self) -> Identity:
        """The fleet identity in this member's own certificate."""
        _, cert, _ = self.read()
        return identity_from_certificate(x509.load_pem_x509_certificate(cert))


def server_credentials(files: TlsFiles, *, client_auth: bool = True) -> grpc.ServerCredentials:
    """Server credentials from ``files``, watched: a renewed certificate (or CA) is used for
    new connections without a restart, which is what renewal and SIGHUP reloads rely on.

    With ``client_auth`` (every fleet API) a client certificate from the fleet CA is
    required. Without it (the enrolment endpoint, whose callers have no certificate yet) the
    CA certificate is sent along with ours, so a joiner can pin it by the token's fingerprint.
    """
    watch = CertificateWatch(files, send_ca=not client_auth)
    return grpc.dynamic_ssl_server_credentials(
        # grpc-stubs omits the None ("no change") the fetcher may return.
        watch.load(),
        watch,  # type: ignore[arg-type]
        require_client_authentication=client_auth,
    )


class CertificateWatch:
    """gRPC's certificate fetcher: returns new server credentials when the files change.

    gRPC calls it from its own threads before every handshake, so it only stats the
    files unless they changed, and never raises.
    """

    def __init__(self, files: TlsFiles, *, send_ca: bool = False) -> None:
        self._files = files
        self._send_ca = send_ca
        self._stamp = self._stat()

    def _stat(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in (self._files.ca, self._files.cert, self._files.key):
            try:
                st = path.stat()
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append((0, 0))
        return tuple(stamps)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The current files as a certificate configuration (raises if unusable)."""
        ca, cert, key = self._files.read()
        certificate = x509.load_pem_x509_certificate(cert)
        private_key = serialization.load_pem_private_key(key, password=None)
        if certificate.public_key() != private_key.public_key():
            raise ConfigError("tls", f"{self._files.key} does not belong to {self._files.cert}")
        chain = cert + ca if self._send_ca else cert
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        # Remembered even when loading fails: this runs before every handshake, so a
        # broken renewal is reported once per change to the files, not per connection.
        self._stamp = stamp
        try:
            config = self.load()
        except Exception as e:  # a half-written renewal must not take the server down
            log.warning("not reloading TLS files (%s); keeping the current certificate", e)
            return None
        log.info("reloaded TLS certificate %s", self._files.cert)
        return config


@dataclass(frozen=True)
class Peer:
    """Who a client expects at the other end of a channel."""

    role: Role
    """The server's role; a certificate of any other role is refused in the handshake."""
    name: str | None = None
    """The server's name, where the client knows it (the pool node a lease names)."""

    def __str__(self) -> str:
        return f"{self.role}/{self.name}" if self.name else f"any {self.role}"


#: Members and operators talk to the controller unless they say otherwise.
CONTROLLER = Peer(Role.CONTROLLER)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Channel credentials presenting this member's certificate, trusting only the fleet CA."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def secure_channel(
    target: str,
    files: TlsFiles,
    peer: Peer = CONTROLLER,
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    extra_options: Sequence[tuple[str, int]] = (),
) -> grpc.aio.Channel:
    """An mTLS channel to ``peer`` at ``target``: every handshake checks the server's identity.

    ``interceptors`` (e.g. ones that record calls) wrap every call; ``extra_options``
    are further gRPC channel arguments (e.g. NO_RETRY_STATE).

    gRPC Python offers no certificate callback on the client, and checks only DNS and IP
    SANs. So instead of the host name, the handshake checks the identity DNS name the fleet
    CA writes into every certificate (``honeyfleet.pki.identity``): a server whose
    certificate is of another role, or names another member, fails the handshake, on the
    first connection and every reconnection alike.
    """
    fleet = files.identity().fleet
    options = [
        ("grpc.ssl_target_name_override", identity_dns_name(fleet, peer.role, peer.name)),
        *KEEPALIVE_OPTIONS,
        # gRPC's own reconnect backoff grows to 2 minutes by default: a member would
        # find a restarted controller that late, after its leases' and nodes' grace.
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *extra_options,
    ]
    return grpc.aio.secure_channel(
        target, channel_credentials(files), options=options, interceptors=interceptors
    )


class ChannelCache:
    """Long-lived mTLS channels, one per (target, peer), that follow certificate renewal.

    A channel's credentials are read once, when it is made; after a renewal, ``retire``
    makes later ``get`` calls build new channels with the new files. Retired channels are
    not closed until ``close``: streams on them (tunnels of running sessions) carry on,
    since an established TLS connection outlives the certificate it started with.
    ``extra_options`` go to every channel made (:func:`secure_channel`).
    """

    def __init__(self, files: TlsFiles, extra_options: Sequence[tuple[str, int]] = ()) -> None:
        self._files = files
        self._extra_options = tuple(extra_options)
        self._channels: dict[tuple[str, Peer], grpc.aio.Channel] = {}
        self._retired: list[grpc.aio.Channel] = []

    def get(self, target: str, peer: Peer = CONTROLLER) -> grpc.aio.Channel:
        """The channel to ``peer`` at ``target``, made on first use."""
        key = (target, peer)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = secure_channel(
                target, self._files, peer, extra_options=self._extra_options
            )
        return channel

    def retire(self) -> None:
        """Make new channels from now on (the certificate files were renewed)."""
        self._retired.extend(self._channels.values())
        self._channels.clear()

    async def close(self) -> None:
        """Close every channel, current and retired."""
        self.retire()
        channels, self._retired = self._retired, []
        for channel in channels:
            await channel.close(None)


def presented_certificate(target: str, files: TlsFiles, timeout: float) -> x509.Certificate:
    """The certificate the server at ``target`` presents in a full mTLS handshake.

    Blocking (run it in a thread). The chain is verified against the fleet CA; the host
    name is not (callers check the identity). gRPC Python never shows a client the
    server's certificate, so a client that must check more than the identity (a revoked
    serial) looks with its own handshake first; the gRPC handshake that follows still
    checks the identity on its own.
    """
    host, _, port = target.rpartition(":")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
    context.check_hostname = False
    context.load_cert_chain(files.cert, files.key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host.strip("[]")) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ssl.SSLError(f"{target} presented no certificate")
    return x509.load_der_x509_certificate(der)
