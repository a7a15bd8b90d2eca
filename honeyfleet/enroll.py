"""Joining the fleet: trade a one-time join token for a certificate.

The joining host makes its key locally and sends only a CSR. It trusts the
controller's enrolment endpoint because that endpoint presents the fleet CA whose
SHA-256 fingerprint the token pins; nothing is sent before that check passes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from honeyfleet.errors import HoneyfleetError, PermissionDenied, RPCError, Unavailable
from honeyfleet.pki import (
    Identity,
    PkiFileError,
    Role,
    csr_for,
    fingerprint,
    generate_key,
    private_key_pem,
    read_token_unverified,
    write_private,
)
from honeyfleet.pki.files import ensure_private_dir
from honeyfleet.pki.identity import identity_from_certificate
from honeyfleet.pki.tokens import MAX_TOKEN_LENGTH
from honeyfleet.tls import TlsFiles
from honeyfleet.v1 import enrollment_pb2, enrollment_pb2_grpc

TIMEOUT = 15.0


def split_host_port(target: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 in brackets)."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise HoneyfleetError(f"controller address {target!r} must be host:port")
    return host.strip("[]"), int(port)


def presented_chain(target: str, timeout: float = TIMEOUT) -> list[x509.Certificate]:
    """The certificates a TLS server presents, read without verifying them.

    Verification happens afterwards, against the pinned fingerprint.
    """
    host, port = split_host_port(target)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            return [x509.load_der_x509_certificate(der) for der in _unverified_chain(tls)]
    except OSError as e:
        raise Unavailable(
            f"cannot reach the enrolment endpoint at {target}: {e} "
            "(use the controller's enroll_listen address, port 7301 by default)"
        ) from None


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    """The peer's certificate chain as DER, as sent (unverified).

    ``SSLSocket.get_unverified_chain`` is public from Python 3.13; on 3.11 and 3.12 the
    same method exists on the underlying C object and returns certificate objects.
    """
    public = getattr(tls, "get_unverified_chain", None)
    if public is not None:
        return list(public() or [])
    sslobj: Any = tls._sslobj  # type: ignore[attr-defined]
    der_format = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]
    return [cert.public_bytes(der_format) for cert in sslobj.get_unverified_chain() or []]


def pinned_ca(target: str, pin: str) -> bytes:
    """The fleet CA certificate (PEM) presented by ``target``, if it matches the pin."""
    for cert in presented_chain(target):
        if fingerprint(cert) == pin:
            return cert.public_bytes(serialization.Encoding.PEM)
    raise PermissionDenied(
        f"{target} does not present the fleet CA pinned by the token (sha256 {pin}); "
        "check the address, or suspect an interception"
    )


def read_token_file(path: str) -> str:
    """The join token in file ``path`` (``-``: standard input), surrounding blanks removed.

    Tokens come from a file or a pipe, never the command line, where shell history and
    ``ps`` would show them to every local user.
    """
    try:
        text = sys.stdin.read(MAX_TOKEN_LENGTH + 1) if path == "-" else _read_small(Path(path))
    except OSError as e:
        raise HoneyfleetError(f"cannot read the join token from {path}: {e.strerror}") from None
    token = text.strip()
    if not token:
        raise HoneyfleetError(f"no join token in {'standard input' if path == '-' else path}")
    return token


def _read_small(path: Path) -> str:
    """At most a token's worth of ``path``; a longer file is refused by the token parser."""
    with path.open(encoding="utf-8", errors="replace") as f:
        return f.read(MAX_TOKEN_LENGTH + 1)


async def enroll(
    target: str,
    token: str,
    role: Role,
    files: TlsFiles,
    *,
    name: str | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    overwrite: bool = False,
) -> Identity:
    """Enrol with the controller at ``target`` and write key, certificate and CA to ``files``.

    The token names the identity and its addresses; ``name``, ``dns_names`` and
    ``ip_addresses`` may only repeat them (a mismatch is refused before anything is sent).
    """
    claims = read_token_unverified(token)
    if claims.role != role:
        raise PermissionDenied(
            f"this join token is for role {claims.role}, not {role}: "
            f"run `honeyfleet {claims.role} join` or create a {role} token"
        )
    if name is not None and name != claims.name:
        raise PermissionDenied(
            f"this join token enrols {claims.role}/{claims.name}, not {name!r}: drop --name "
            "or ask the operator for a token with that name"
        )
    if files.key.exists() and not overwrite:
        # Checked before the token is spent: the controller burns it when it signs.
        raise PkiFileError(
            f"{files.key} already exists: remove it, or pass --force to replace the key"
        )
    ca_pem = await asyncio.to_thread(pinned_ca, target, claims.ca_fingerprint)
    key = generate_key()
    csr = csr_for(key, Identity(claims.fleet, role, claims.name))
    request = enrollment_pb2.EnrollRequest(
        token=token,
        csr_pem=csr.decode(),
        name=claims.name,
        dns_names=list(dns_names),
        ip_addresses=list(ip_addresses),
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        try:
            response = await stub.Enroll(request, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as e:
            raise RPCError.wrap("Enroll", e) from None
    cert_pem = response.certificate_pem.encode()
    identity = identity_from_certificate(x509.load_pem_x509_certificate(cert_pem))
    for path in (files.ca, files.cert, files.key):
        ensure_private_dir(path.parent)
    write_private(files.key, private_key_pem(key), overwrite=overwrite)
    write_private(files.cert, cert_pem, overwrite=True)
    write_private(files.ca, ca_pem, overwrite=True)
    return identity
