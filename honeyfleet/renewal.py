"""Certificate renewal: every process replaces its own certificate well before it expires.

A renewal makes a new key, sends a CSR for the same identity to a signer (the controller's
``CertificateService.Renew`` over mTLS, authorized by the current certificate; or, on the
controller itself, its own CA), checks the answer and writes key and certificate in place.
Servers pick the new files up for new connections by themselves (``tls.CertificateWatch``);
``on_renewed`` lets a process rebuild its long-lived client channels.

A renewal is due once ``RENEW_AFTER`` of the certificate's lifetime has passed, so a 7-day
certificate is renewed with over two days to spare, and a failed attempt is retried every
``retry`` seconds until then. Revocation still covers the time between.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import grpc
from cryptography import x509

from honeyfleet.errors import HoneyfleetError, RPCError
from honeyfleet.pki import csr_for, generate_key, private_key_pem, write_private
from honeyfleet.pki.errors import PkiError
from honeyfleet.pki.identity import identity_from_certificate
from honeyfleet.tls import TlsFiles, secure_channel
from honeyfleet.v1 import certificate_pb2, certificate_pb2_grpc

log = logging.getLogger(__name__)

#: Fraction of a certificate's lifetime after which it is renewed.
RENEW_AFTER = 2 / 3
#: Longest sleep between looks at the certificate (a clock jump or a hand-replaced file is
#: noticed within this).
MAX_SLEEP = 3600.0
RPC_TIMEOUT = 30.0

#: Signs a PEM CSR for the caller's own identity; returns the PEM certificate.
Signer = Callable[[bytes], Awaitable[bytes]]


class RenewalRefused(HoneyfleetError):
    """The signer answered with a certificate that is not a renewal of ours."""


def controller_signer(controller: str, files: TlsFiles) -> Signer:
    """A signer that asks the controller at ``controller`` over mTLS."""

    async def sign(csr: bytes) -> bytes:
        async with secure_channel(controller, files) as channel:
            stub = certificate_pb2_grpc.CertificateServiceStub(channel)
            try:
                response = await stub.Renew(
                    certificate_pb2.RenewRequest(csr_pem=csr.decode()), timeout=RPC_TIMEOUT
                )
            except grpc.aio.AioRpcError as e:
                raise RPCError.wrap("Renew", e) from None
        return response.certificate_pem.encode()

    return sign


def renewal_due(cert: x509.Certificate) -> datetime:
    """When ``cert`` should be renewed."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * RENEW_AFTER


class Renewer:
    """Keeps one process's certificate files renewed; run :meth:`run` as a task."""

    def __init__(
        self,
        files: TlsFiles,
        sign: Signer,
        *,
        on_renewed: Callable[[], None] | None = None,
        retry: float = 60.0,
    ) -> None:
        self._files = files
        self._sign = sign
        self._on_renewed = on_renewed
        self._retry = retry

    async def run(self) -> None:
        """Renew whenever due, forever; failures are logged and retried."""
        while True:
            try:
                wait = await asyncio.to_thread(self._seconds_until_due)
                if wait <= 0:
                    await self.renew()
                    continue
            except (HoneyfleetError, PkiError, OSError, ValueError) as e:
                log.warning("certificate renewal failed (%s); retrying in %.0fs", e, self._retry)
                wait = self._retry
            await asyncio.sleep(min(wait, MAX_SLEEP))

    def _seconds_until_due(self) -> float:
        """Seconds until the current certificate is due (negative: overdue)."""
        _, cert_pem, _ = self._files.read()
        cert = x509.load_pem_x509_certificate(cert_pem)
        return (renewal_due(cert) - datetime.now(UTC)).total_seconds()

    async def renew(self) -> x509.Certificate:
        """Renew now: new key, CSR, signature, checks, files written. Returns the new cert."""
        _, old_pem, _ = await asyncio.to_thread(self._files.read)
        identity = identity_from_certificate(x509.load_pem_x509_certificate(old_pem))
        key = await asyncio.to_thread(generate_key)
        new_pem = await self._sign(csr_for(key, identity))
        new = x509.load_pem_x509_certificate(new_pem)
        if new.public_key() != key.public_key() or identity_from_certificate(new) != identity:
            raise RenewalRefused(
                f"the controller answered the renewal of {identity} with a certificate for "
                "another key or identity; keeping the current one"
            )
        await asyncio.to_thread(self._write, key_pem=private_key_pem(key), cert_pem=new_pem)
        log.info(
            "renewed certificate of %s: serial %x, valid until %s",
            identity,
            new.serial_number,
            new.not_valid_after_utc.isoformat(),
        )
        if self._on_renewed is not None:
            self._on_renewed()
        return new

    def _write(self, *, key_pem: bytes, cert_pem: bytes) -> None:
        """Replace key then certificate, each atomically.

        Between the two renames the pair does not match; the server's watcher refuses such
        a pair and keeps serving the old one until the certificate follows.
        """
        write_private(self._files.key, key_pem, overwrite=True)
        # As signed: the certificate, then any issuing CA certificates of its chain.
        write_private(self._files.cert, cert_pem, overwrite=True)
