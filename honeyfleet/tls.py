"""Mutual-TLS credentials for fleet gRPC servers and channels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from honeyfleet.errors import ConfigError
from honeyfleet.pki.identity import Identity, identity_from_certificate

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
    """Server credentials that demand a client certificate issued by the fleet CA."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Channel credentials presenting this member's certificate, trusting only the fleet CA."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def secure_channel(target: str, files: TlsFiles) -> grpc.aio.Channel:
    """An mTLS channel to another fleet member."""
    options = [
        *KEEPALIVE_OPTIONS,
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    return grpc.aio.secure_channel(target, channel_credentials(files), options=options)
