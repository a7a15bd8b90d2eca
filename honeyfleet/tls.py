"""Mutual-TLS credentials for fleet gRPC servers and channels."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from honeyfleet.errors import ConfigError
from honeyfleet.pki.identity import Identity, identity_from_certificate

log = logging.getLogger(__name__)

# Server-side limits that apply to every fleet endpoint. Messages are small except
# tunnel frames and event batches, which senders chunk well below this.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
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


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that demand a client certificate issued by the fleet CA.

    The files are watched: a renewed certificate (or CA) is used for new connections
    without a restart, which is what SIGHUP-driven reloads from systemd rely on.
    """
    watch = CertificateWatch(files)
    return grpc.dynamic_ssl_server_credentials(
        # grpc-stubs omits the None ("no change") the fetcher may return.
        watch.load(),
        watch,  # type: ignore[arg-type]
        require_client_authentication=True,
    )


class CertificateWatch:
    """gRPC's certificate fetcher: returns new server credentials when the files change.

    gRPC calls it from its own threads before every handshake, so it only stats the
    files unless they changed, and never raises.
    """

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
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
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

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


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Channel credentials presenting this member's certificate, trusting only the fleet CA."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def secure_channel(
    target: str,
    files: TlsFiles,
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """An mTLS channel to another fleet member (``interceptors`` e.g. record calls)."""
    options = [
        *KEEPALIVE_OPTIONS,
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    return grpc.aio.secure_channel(
        target, channel_credentials(files), options=options, interceptors=interceptors
    )
