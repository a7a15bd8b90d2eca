"""CertificateService: members renew their own certificate, authorized by that certificate.

The caller's identity and addresses come from the certificate it presented (checked by TLS
and by the Authorizer, which refuses revoked serials); the request only contributes a public
key. So a member can renew itself, never become someone else or add an address.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from cryptography import x509

from honeyfleet.authz import current_caller
from honeyfleet.pki import CertificateAuthority, PkiError
from honeyfleet.pki.identity import IDENTITY_DNS_SUFFIX, identity_from_certificate
from honeyfleet.renewal import Signer
from honeyfleet.tls import TlsFiles
from honeyfleet.v1 import certificate_pb2, certificate_pb2_grpc

log = logging.getLogger(__name__)


class CertificateServicer(certificate_pb2_grpc.CertificateServiceServicer):
    """Signs renewals for the fleet CA."""

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        validity_days: int,
        revoked: Callable[[], frozenset[int]],
    ) -> None:
        self._ca = ca
        self._validity_days = validity_days
        self._revoked = revoked

    async def Renew(
        self, request: certificate_pb2.RenewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> certificate_pb2.RenewResponse:
        """A new certificate for the caller's identity and addresses, over the CSR's key."""
        caller = current_caller()
        dns, ips = addresses_of(caller.certificate)
        try:
            cert = await asyncio.to_thread(
                self._ca.sign_csr,
                request.csr_pem.encode(),
                caller.identity,
                dns=dns,
                ips=ips,
                validity_days=self._validity_days,
            )
        except PkiError as e:
            await context.abort(e.code, str(e))
        log.info("renewed the certificate of %s (was serial %x)", caller, caller.serial)
        return certificate_pb2.RenewResponse(
            certificate_pem=cert.decode(), ca_certificate_pem=self._ca.cert_pem.decode()
        )

    async def ListRevoked(
        self,
        request: certificate_pb2.ListRevokedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> certificate_pb2.ListRevokedResponse:
        """Every revoked serial, as the controller enforces it."""
        serials = sorted(self._revoked())
        return certificate_pb2.ListRevokedResponse(serials=[f"{s:x}" for s in serials])


def local_signer(ca: CertificateAuthority, files: TlsFiles, *, validity_days: int) -> Signer:
    """The controller's own renewals: signed by its CA directly, same identity and addresses."""

    def sign_now(csr: bytes) -> bytes:
        _, pem, _ = files.read()
        current = x509.load_pem_x509_certificate(pem)
        dns, ips = addresses_of(current)
        identity = identity_from_certificate(current)
        return ca.sign_csr(csr, identity, dns=dns, ips=ips, validity_days=validity_days)

    async def sign(csr: bytes) -> bytes:
        return await asyncio.to_thread(sign_now, csr)

    return sign


def addresses_of(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The operator-given DNS names and IP addresses of ``cert`` (not its identity names)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    dns = [n for n in san.get_values_for_type(x509.DNSName) if not _is_identity_name(n)]
    return dns, [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def _is_identity_name(name: str) -> bool:
    return name.lower().endswith("." + IDENTITY_DNS_SUFFIX)
