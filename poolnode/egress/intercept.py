"""TLS interception for guests: the deployment's own CA, leaves minted per server name,
and TLS spoken over a connection whose ClientHello the sinkhole has already read.

The interception CA is the operator's (``egress_tls_ca_cert`` and ``egress_tls_ca_key``)
or made by the node on its first start (``state_dir/egress-ca.pem`` and
``egress-ca.key``, the key readable by the node only). Its certificate, and nothing
else of it, goes into the guest images' trust stores (``honeyfleet image build
--trust-ca``), so a guest's wget or curl accepts the leaf the node presents for any
name. Leaves are minted on demand for the ClientHello's server name (or the address
the guest dialled when it sent none), all on one P-256 key the node makes at start, and
cached (``CACHED`` contexts, least recently used forgotten).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from honeyfleet.pki.certs import generate_key, load_certificate, load_private_key, private_key_pem
from honeyfleet.pki.files import write_private

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHED = 256
CA_DAYS = 3650
LEAF_DAYS = 90
SKEW = timedelta(days=1)
READ_SIZE = 65536
CIPHERS = "ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:@SECLEVEL=0"


def load_or_make_ca(cert: Path, key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The interception CA at ``cert``/``key``, made there first if neither exists."""
    if not cert.exists() and not key.exists():
        ca_key = generate_key()
        now = datetime.now(UTC)
        # Guests see this name (in their trust store, in every intercepted chain): it
        # reads as the TLS-inspection CA of a company network, never as ours.
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IT Services"),
                x509.NameAttribute(NameOID.COMMON_NAME, "Internal Root CA"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW)
            .not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key.parent.mkdir(parents=True, exist_ok=True)
        write_private(key, private_key_pem(ca_key))
        cert.write_bytes(ca.public_bytes(Encoding.PEM))
        log.info("made the egress interception CA %s: put it in guest images' trust stores", cert)
    return load_certificate(cert), load_private_key(key)


class Leaves:
    """Server contexts presenting a leaf for a name, signed by the interception CA."""

    def __init__(self, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
        self._ca = ca
        self._ca_key = ca_key
        self._key = generate_key()
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self.minted = 0

    async def context(self, name: str) -> ssl.SSLContext:
        """A server context whose certificate names ``name`` (a host name or address);
        a new one is minted on a thread (signing and loading take milliseconds)."""
        context = self._contexts.get(name)
        if context is None:
            context = await asyncio.to_thread(self._mint, name)
            self._contexts[name] = context
            while len(self._contexts) > CACHED:
                self._contexts.popitem(last=False)
        self._contexts.move_to_end(name)
        return context

    def _mint(self, name: str) -> ssl.SSLContext:
        """A leaf for ``name`` and a context loaded with it (and the CA, as its chain)."""
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        now = datetime.now(UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self._ca.subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW)
            .not_valid_after(min(now + timedelta(days=LEAF_DAYS), self._ca.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.minted += 1
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # Bots' clients are old: busybox wget's own TLS sends no signature_algorithms,
        # which in TLS 1.2 means SHA-1 signatures, refused by OpenSSL's default security
        # level (NO_SHARED_CIPHER). Level 0 takes whatever an ECDHE client offers: what
        # this protects is a dead end.
        context.set_ciphers(CIPHERS)
        # ssl loads certificates from files only: a private temporary one, gone at once.
        with tempfile.TemporaryDirectory() as folder:
            chain = Path(folder) / "leaf.pem"
            chain.write_bytes(
                leaf.public_bytes(Encoding.PEM)
                + self._ca.public_bytes(Encoding.PEM)
                + private_key_pem(self._key)
            )
            context.load_cert_chain(chain)
        return context


class TlsStream:
    """The server end of TLS over an asyncio stream whose first bytes (``prefix``, the
    ClientHello) were read already: ssl's memory BIOs, pumped by hand."""

    def __init__(
        self,
        context: ssl.SSLContext,
        read: Callable[[int], Awaitable[bytes]],
        write: Callable[[bytes], None],
        drain: Callable[[], Awaitable[None]],
        prefix: bytes,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._incoming.write(prefix)
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._read = read
        self._write = write
        self._drain = drain

    async def handshake(self) -> None:
        """Complete the handshake (ssl.SSLError if the guest refuses our certificate)."""
        await self._pump(self._tls.do_handshake)

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of plaintext; b"" at the end."""
        try:
            return await self._pump(lambda: self._tls.read(size))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""

    async def write(self, data: bytes) -> None:
        """Send ``data`` encrypted."""
        await self._pump(lambda: self._tls.write(data))

    async def close(self) -> None:
        """Send close_notify, without waiting for the guest's (a guest that never sends
        one must not hold the connection open); best effort: the guest may be gone."""
        with contextlib.suppress(ssl.SSLError, OSError):
            with contextlib.suppress(ssl.SSLWantReadError):
                self._tls.unwrap()
            await self._flush()

    async def _pump(self, operation: Callable[[], T]) -> T:
        """Run ``operation``, moving ciphertext both ways until it completes."""
        while True:
            try:
                result = operation()
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self._read(READ_SIZE)
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
                continue
            await self._flush()
            return result

    async def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self._write(pending)
            await self._drain()


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
