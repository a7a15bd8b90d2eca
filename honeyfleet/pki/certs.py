"""X.509 construction and parsing: keys, CSRs, CA and leaf certificates.

Pure functions with no file-system state; ``ca.py`` owns the CA directory and calls these.
All keys are ECDSA P-256 (fast, and supported by gRPC/BoringSSL); all signatures SHA-256.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from honeyfleet.pki.errors import CsrInvalid, IssueError, PkiFileError
from honeyfleet.pki.identity import IDENTITY_DNS_SUFFIX, Identity

__all__ = [
    "CLOCK_SKEW",
    "MAX_CSR_BYTES",
    "build_ca_certificate",
    "build_issuing_certificate",
    "build_leaf_certificate",
    "csr_for",
    "fingerprint",
    "generate_key",
    "load_certificate",
    "load_csr",
    "load_private_key",
    "parse_dns_names",
    "parse_ip_addresses",
    "private_key_pem",
]

#: Backdating of not_valid_before, so a peer whose clock runs slightly behind accepts a
#: certificate issued a moment ago.
CLOCK_SKEW = timedelta(minutes=5)

#: A P-256 CSR with a few SANs is well under 1 KiB; the bound exists because CSRs arrive
#: from the network during enrolment.
MAX_CSR_BYTES = 16 * 1024

_DNS_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DNS_RE = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")


def generate_key() -> ec.EllipticCurvePrivateKey:
    """Generate a new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialize ``key`` as unencrypted PKCS#8 PEM (file permissions protect it)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def fingerprint(cert: x509.Certificate) -> str:
    """Return the lowercase hex SHA-256 of ``cert``'s DER encoding."""
    return cert.fingerprint(hashes.SHA256()).hex()


def csr_for(key: ec.EllipticCurvePrivateKey, identity: Identity) -> bytes:
    """Return a PEM CSR for ``identity`` signed by ``key``.

    The CA ignores everything but the public key; the subject and SAN are included only so the
    request is self-describing in logs and to standard tools.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR, check its self-signature and that its key is P-256; CsrInvalid if not."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CsrInvalid(
            f"certificate signing request is {len(csr_pem)} bytes, more than the "
            f"{MAX_CSR_BYTES}-byte limit; generate a plain P-256 CSR with no extra extensions"
        )
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrInvalid(f"certificate signing request is not valid PEM: {exc}") from None
    _require_p256(public_key, "certificate signing request")
    # Proof of possession: only the holder of the private key can produce this signature.
    if not csr.is_signature_valid:
        raise CsrInvalid(
            "certificate signing request signature does not verify; the request was corrupted "
            "or forged - generate a new CSR with the host's own key"
        )
    return csr


def _require_p256(public_key: object, what: str) -> ec.EllipticCurvePublicKey:
    """Return ``public_key`` if it is ECDSA P-256, else raise CsrInvalid naming ``what``."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise CsrInvalid(
            f"{what} uses an unsupported key type; honeyfleet requires ECDSA P-256 "
            "(honeyfleet.pki.generate_key)"
        )
    return public_key


def parse_dns_names(names: Sequence[str]) -> list[str]:
    """Validate and lowercase DNS SANs; IssueError on a bad one.

    Wildcards are refused (a certificate names the hosts its holder serves, no more), and so
    are names under the reserved identity domain, which only the CA itself writes.
    """
    result: list[str] = []
    for raw in names:
        name = raw.strip().lower().rstrip(".")
        if len(name) > 253 or _DNS_RE.fullmatch(name) is None:
            raise IssueError(
                f"invalid DNS name {raw!r}: use a host name such as 'node1.example.net' "
                "(no wildcards)"
            )
        if name == IDENTITY_DNS_SUFFIX or name.endswith("." + IDENTITY_DNS_SUFFIX):
            raise IssueError(
                f"DNS name {raw!r} is in the reserved domain {IDENTITY_DNS_SUFFIX}; the CA "
                "writes the identity names there itself"
            )
        if name not in result:
            result.append(name)
    return result


def parse_ip_addresses(
    addresses: Sequence[str],
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Parse IP SANs with the ipaddress module; IssueError naming the first bad one."""
    result: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for raw in addresses:
        try:
            address = ipaddress.ip_address(raw.strip())
        except ValueError:
            raise IssueError(
                f"invalid IP address {raw!r}: use a literal IPv4 or IPv6 address such as "
                "'192.0.2.10' or '2001:db8::10'"
            ) from None
        if address not in result:
            result.append(address)
    return result


def build_ca_certificate(
    key: ec.EllipticCurvePrivateKey,
    fleet: str,
    *,
    validity_days: int,
    now: datetime,
    path_length: int = 1,
) -> x509.Certificate:
    """Build the self-signed fleet root certificate.

    ``path_length=1``: it signs issuing CAs, which sign only leaves (0 makes a root that
    signs leaves itself, the layout of CAs made before issuing CAs existed).
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{fleet} honeyfleet CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def build_issuing_certificate(
    *,
    root_cert: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    fleet: str,
    validity_days: int,
    now: datetime,
) -> x509.Certificate:
    """Build an issuing CA certificate under the root: it signs leaves, never further CAs."""
    serial = x509.random_serial_number()
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"{fleet} honeyfleet issuing CA {serial:x}"[:64])]
    )
    root_ski = root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + timedelta(days=validity_days), root_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        # path_length=0: a stolen leaf key can never mint further certificates.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )


def build_leaf_certificate(
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    identity: Identity,
    public_key: ec.EllipticCurvePublicKey,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    validity_days: int,
    now: datetime,
) -> x509.Certificate:
    """Build a leaf certificate for ``identity``, usable as both TLS client and server.

    The validity is clamped to the CA's own expiry, since a chain is only as valid as its
    root; IssueError if the CA has already expired or the parameters are invalid.
    """
    if validity_days < 1:
        raise IssueError(f"validity of {validity_days} days is invalid: use at least 1 day")
    _require_p256(public_key, "subject public key")
    dns_names = parse_dns_names(dns)
    ip_addresses = parse_ip_addresses(ips)
    not_after = min(now + timedelta(days=validity_days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise IssueError(
            f"the fleet CA expired on {ca_cert.not_valid_after_utc.isoformat()}; create a new "
            "CA with `honeyfleet pki init` and re-enrol the fleet"
        )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(n) for n in (*identity.dns_names, *dns_names)]
    sans += [x509.IPAddress(a) for a in ip_addresses]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        # 159 random bits: unpredictable, positive, and within the 20-octet limit.
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=False), critical=True)
        # Every honeyfleet process both serves and calls RPCs, so every cert does both.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _key_usage(*, key_cert_sign: bool) -> x509.KeyUsage:
    """KeyUsage for a CA (certificate and CRL signing) or a leaf (digital signature)."""
    return x509.KeyUsage(
        digital_signature=not key_cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def load_certificate(path: Path) -> x509.Certificate:
    """Read one PEM (or DER) certificate from ``path``; PkiFileError if it is not one."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PkiFileError(f"certificate file {path} does not exist") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        # The parser's own message (ASN.1 internals) would not help an operator.
        raise PkiFileError(
            f"{path} is not a valid PEM or DER X.509 certificate; pass the .pem file written "
            "by `honeyfleet pki issue`"
        ) from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted PEM P-256 private key from ``path``; PkiFileError otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PkiFileError(f"private key file {path} does not exist") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PkiFileError(
            f"{path} is not an unencrypted PEM private key; restore it from backup"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiFileError(f"{path} holds a {type(key).__name__}, expected an ECDSA P-256 key")
    return key
