"""The fleet certificate authority: its directory on disk and the operations it performs.

Two levels: a root, whose key can stay offline, signs issuing CAs; the current issuing CA,
whose key lives here (on the controller), signs every leaf. Members trust the root, so an
issuing CA that is lost or stolen is replaced (``rotate_issuing``, with the root key) and
revoked without touching the trust bundle on any host. CA directories from before this
layout (no ``issuing.pem``: the root signs leaves itself) still load.

CA directory layout (every file 0600, the directory 0700 when we create it)::

    <dir>/
      ca.pem        root certificate (PEM): the fleet's trust anchor, safe to distribute
      issuing.pem   the current issuing CA certificate (signed by the root)
      ca.key        the issuing CA's private key (PKCS#8 PEM, unencrypted)
      root/         made by init; move it OFFLINE: root.key (the root's private key) and a
                    copy of ca.pem. Needed only to rotate the issuing CA.
      token.key     32 random bytes (raw): the HMAC key for join tokens (tokens.py)
      fleet         the fleet name, one line of text
      revoked.json  revoked serials (revocation.py); created empty by init
      revoked.json.lock  flock target serialising concurrent revocations
      issued.jsonl  append-only ledger, one JSON object per issued certificate:
                    {"serial": hex, "identity": uri, "dns": [...], "ips": [...],
                     "not_after": iso8601, "issued_at": iso8601}
      issued/       default output of `honeyfleet pki issue`: issued/<role>-<name>/

``ca.pem`` is written last by ``init_ca``, so its presence means initialisation finished.
"""

from __future__ import annotations

import json
import logging
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from honeyfleet.pki import certs
from honeyfleet.pki.certs import csr_for, generate_key
from honeyfleet.pki.errors import (
    CaCorrupt,
    CaError,
    CaExists,
    CaNotFound,
    IdentityError,
    PkiFileError,
)
from honeyfleet.pki.files import append_private, ensure_private_dir, write_private
from honeyfleet.pki.identity import Identity, Role, validate_label

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "FLEET_FILE",
    "ISSUED_DIR",
    "ISSUING_CERT_FILE",
    "LEAF_VALIDITY_DAYS",
    "LEDGER_FILE",
    "REVOKED_FILE",
    "ROOT_DIR",
    "ROOT_KEY_FILE",
    "TOKEN_KEY_BYTES",
    "TOKEN_KEY_FILE",
    "CertificateAuthority",
    "IssuedFiles",
    "csr_for",
    "generate_key",
    "init_ca",
    "load_ca",
    "rotate_issuing",
]

logger = logging.getLogger(__name__)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
ISSUING_CERT_FILE = "issuing.pem"
ROOT_DIR = "root"
ROOT_KEY_FILE = "root.key"
TOKEN_KEY_FILE = "token.key"  # noqa: S105 - a file name, not a secret
FLEET_FILE = "fleet"
REVOKED_FILE = "revoked.json"
LEDGER_FILE = "issued.jsonl"
ISSUED_DIR = "issued"
TOKEN_KEY_BYTES = 32
#: Default lifetime of a leaf certificate: fleet processes renew theirs long before.
LEAF_VALIDITY_DAYS = 7

_CA_FILES = (CA_CERT_FILE, CA_KEY_FILE, TOKEN_KEY_FILE, FLEET_FILE, REVOKED_FILE)


@dataclass(frozen=True)
class IssuedFiles:
    """Where ``CertificateAuthority.issue`` put a new identity's files."""

    identity: Identity
    """The identity in the certificate's URI SAN."""
    serial: int
    """The certificate's serial number (what ``pki revoke --serial`` takes, in hex)."""
    key_path: Path
    """``<name>.key``: the private key, generated in place."""
    cert_path: Path
    """``<name>.pem``: the leaf certificate."""
    ca_path: Path
    """``ca.pem``: a copy of the CA certificate, the trust anchor for peers."""


@dataclass(frozen=True, repr=False)
class CertificateAuthority:
    """A loaded fleet CA. Build with ``init_ca`` or ``load_ca``, not directly."""

    directory: Path
    """The CA directory (see the module docstring for its layout)."""
    fleet: str
    """The fleet (SPIFFE trust domain) this CA issues for."""
    cert: x509.Certificate
    """The issuing CA certificate: the signer of every leaf (the root, in old layouts)."""
    key: ec.EllipticCurvePrivateKey
    """The issuing CA's signing key."""
    token_key: bytes
    """HMAC key for join tokens."""
    root: x509.Certificate
    """The self-signed root: the trust anchor every member holds as ``ca.pem``."""

    def __repr__(self) -> str:
        """Identify the CA without ever printing key material."""
        return f"CertificateAuthority(fleet={self.fleet!r}, directory={str(self.directory)!r})"

    @property
    def fingerprint(self) -> str:
        """SHA-256 hex of the root certificate's DER; join tokens pin this value."""
        return certs.fingerprint(self.root)

    @property
    def cert_pem(self) -> bytes:
        """The root certificate as PEM, for trust bundles and enrolment responses."""
        return self.root.public_bytes(serialization.Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        """What follows a leaf in its certificate file: the issuing CA (none if the root
        signs leaves itself), so peers that trust only the root can verify it."""
        if self.cert == self.root:
            return b""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def revoked_path(self) -> Path:
        """Path of the CA's revocation list (``revoked.json``)."""
        return self.directory / REVOKED_FILE

    def is_issuer_of(self, cert: x509.Certificate) -> bool:
        """Return True if ``cert`` was signed by this CA's issuing key or its root (an
        earlier issuing CA, for instance)."""
        for issuer in (self.cert, self.root):
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
        return False

    def issue(
        self,
        role: Role,
        name: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        validity_days: int = 365,
        out_dir: Path,
    ) -> IssuedFiles:
        """Generate a key in ``out_dir`` and issue a certificate for ``role``/``name``.

        Writes ``<name>.key``, ``<name>.pem`` and a copy of ``ca.pem`` into ``out_dir``
        (created 0700 if missing). Refuses with PkiFileError if the key or certificate already
        exists there, so re-running never replaces a deployed key.
        """
        identity = Identity(self.fleet, Role.parse(role), name)
        key_path = out_dir / f"{name}.key"
        cert_path = out_dir / f"{name}.pem"
        for path in (key_path, cert_path):
            if path.exists():
                raise PkiFileError(
                    f"{path} already exists; remove it, or pass another --out directory"
                )
        key = generate_key()
        # Sign first: bad SANs or validity then fail before anything touches the disk.
        cert = self._issue(identity, key.public_key(), dns, ips, validity_days)
        ensure_private_dir(out_dir)
        write_private(key_path, certs.private_key_pem(key))
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM) + self.chain_pem)
        ca_path = out_dir / CA_CERT_FILE
        write_private(ca_path, self.cert_pem, overwrite=True)
        return IssuedFiles(identity, cert.serial_number, key_path, cert_path, ca_path)

    def sign_csr(
        self,
        csr_pem: bytes,
        identity: Identity,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        validity_days: int = LEAF_VALIDITY_DAYS,
    ) -> bytes:
        """Issue a PEM certificate for ``identity`` over the public key in ``csr_pem``,
        followed by its issuing CA (what a member writes to its certificate file).

        Only the CSR's public key is used. Its subject and SANs are ignored: the requester
        is not trusted to choose its own identity; the caller decides it (from a verified
        join token). Raises CsrInvalid if the CSR is malformed or its signature is wrong.
        """
        if identity.fleet != self.fleet:
            raise IdentityError(
                f"identity {identity.uri} is for fleet {identity.fleet!r} but this CA issues "
                f"for fleet {self.fleet!r}"
            )
        csr = certs.load_csr(csr_pem)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # checked by load_csr
        cert = self._issue(identity, public_key, dns, ips, validity_days)
        return cert.public_bytes(serialization.Encoding.PEM) + self.chain_pem

    def _issue(
        self,
        identity: Identity,
        public_key: ec.EllipticCurvePublicKey,
        dns: Sequence[str],
        ips: Sequence[str],
        validity_days: int,
    ) -> x509.Certificate:
        """Build, sign and record in the ledger a leaf certificate."""
        now = datetime.now(UTC)
        cert = certs.build_leaf_certificate(
            ca_cert=self.cert,
            ca_key=self.key,
            identity=identity,
            public_key=public_key,
            dns=dns,
            ips=ips,
            validity_days=validity_days,
            now=now,
        )
        if now + timedelta(days=validity_days) > self.cert.not_valid_after_utc:
            logger.warning(
                "certificate for %s expires with the CA on %s, before the requested %d days",
                identity.uri,
                cert.not_valid_after_utc.isoformat(),
                validity_days,
            )
        self._record(cert, identity, now)
        return cert

    def live_serials(self, identity: Identity, revoked: frozenset[int]) -> list[int]:
        """Serials of ``identity``'s certificates that are unexpired and not in ``revoked``.

        Read from the issuance ledger, so it knows every certificate this CA signed, including
        ones never delivered. Blocking file I/O: call it off the event loop.
        """
        now = datetime.now(UTC)
        serials: list[int] = []
        try:
            lines = (self.directory / LEDGER_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return serials
        for line in lines:
            try:
                entry = json.loads(line)
                serial = int(entry["serial"], 16)
                live = datetime.fromisoformat(entry["not_after"]) > now
                mine = entry["identity"] == identity.uri
            except (ValueError, KeyError, TypeError):
                # A torn last line after a crash must not block enrolment; the rest is intact.
                logger.warning("skipping an unreadable line of %s", LEDGER_FILE)
                continue
            if mine and live and serial not in revoked:
                serials.append(serial)
        return serials

    def _record(self, cert: x509.Certificate, identity: Identity, now: datetime) -> None:
        """Append the issued certificate to ``issued.jsonl`` so operators can audit issuance."""
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        entry = {
            "serial": f"{cert.serial_number:x}",
            "identity": identity.uri,
            "dns": san.get_values_for_type(x509.DNSName),
            "ips": [str(a) for a in san.get_values_for_type(x509.IPAddress)],
            "not_after": cert.not_valid_after_utc.isoformat(),
            "issued_at": now.isoformat(),
        }
        line = json.dumps(entry, sort_keys=True) + "\n"
        append_private(self.directory / LEDGER_FILE, line.encode())


def init_ca(
    directory: Path,
    fleet: str,
    *,
    validity_days: int = 3650,
    root_dir: Path | None = None,
) -> CertificateAuthority:
    """Create a new fleet CA in ``directory`` (root and first issuing CA) and return it.

    The root's key goes to ``root_dir`` (default ``<directory>/root``), which the operator
    moves offline. Raises CaExists if any CA file is already there: replacing a fleet CA
    invalidates every certificate it issued, so that must be a deliberate manual step.
    """
    validate_label(fleet, "fleet")
    if validity_days < 1:
        raise CaError(f"CA validity of {validity_days} days is invalid: use at least 1 day")
    root_dir = directory / ROOT_DIR if root_dir is None else root_dir
    existing = [name for name in _CA_FILES if (directory / name).exists()]
    existing += [str(root_dir / ROOT_KEY_FILE)] if (root_dir / ROOT_KEY_FILE).exists() else []
    if existing:
        raise CaExists(
            f"{directory} already contains CA files ({', '.join(existing)}); refusing to "
            "overwrite them. Use another --dir, or move the old files away if you really mean "
            "to replace the fleet CA (every certificate it issued will stop working)"
        )
    ensure_private_dir(directory)
    ensure_private_dir(root_dir)
    now = datetime.now(UTC)
    root_key = generate_key()
    root = certs.build_ca_certificate(root_key, fleet, validity_days=validity_days, now=now)
    root_pem = root.public_bytes(serialization.Encoding.PEM)
    write_private(root_dir / ROOT_KEY_FILE, certs.private_key_pem(root_key))
    write_private(root_dir / CA_CERT_FILE, root_pem)
    key, cert = _new_issuing(root, root_key, fleet, validity_days, now)
    token_key = secrets.token_bytes(TOKEN_KEY_BYTES)
    write_private(directory / CA_KEY_FILE, certs.private_key_pem(key))
    write_private(directory / ISSUING_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))
    write_private(directory / TOKEN_KEY_FILE, token_key)
    write_private(directory / FLEET_FILE, f"{fleet}\n".encode())
    write_private(directory / REVOKED_FILE, b"{}\n")
    # Last: a present ca.pem marks a complete CA directory.
    write_private(directory / CA_CERT_FILE, root_pem)
    logger.info("created CA for fleet %s in %s (root key in %s)", fleet, directory, root_dir)
    return CertificateAuthority(directory, fleet, cert, key, token_key, root)


def rotate_issuing(
    directory: Path, root_dir: Path, *, validity_days: int = 3650
) -> tuple[CertificateAuthority, x509.Certificate]:
    """Replace the issuing CA of the CA in ``directory`` with a new one signed by the root
    key in ``root_dir``; returns the CA and the retired issuing certificate.

    The retired certificate and key are kept as ``issuing-<serial>.pem`` / ``.key``; the
    certificates it signed stay valid until they expire or its serial is revoked.
    """
    ca = load_ca(directory)
    root_key_path = root_dir / ROOT_KEY_FILE
    try:
        root_key = certs.load_private_key(root_key_path)
    except PkiFileError as exc:
        raise CaNotFound(f"cannot use the root key: {exc}") from None
    if root_key.public_key() != ca.root.public_key():
        raise CaCorrupt(f"{root_key_path} is not the key of {directory / CA_CERT_FILE}")
    old = ca.cert
    key, cert = _new_issuing(ca.root, root_key, ca.fleet, validity_days, datetime.now(UTC))
    if old != ca.root:
        suffix = f"issuing-{old.serial_number:x}"
        write_private(directory / f"{suffix}.pem", old.public_bytes(serialization.Encoding.PEM))
        write_private(directory / f"{suffix}.key", certs.private_key_pem(ca.key))
    # Key first: a crash in between leaves a mismatch that load_ca reports, never a
    # certificate that a stale key would sign under.
    write_private(directory / CA_KEY_FILE, certs.private_key_pem(key), overwrite=True)
    write_private(
        directory / ISSUING_CERT_FILE,
        cert.public_bytes(serialization.Encoding.PEM),
        overwrite=True,
    )
    logger.info("new issuing CA %x for fleet %s", cert.serial_number, ca.fleet)
    return load_ca(directory), old


def _new_issuing(
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    fleet: str,
    validity_days: int,
    now: datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh issuing key and its certificate under ``root``."""
    key = generate_key()
    cert = certs.build_issuing_certificate(
        root_cert=root,
        root_key=root_key,
        public_key=key.public_key(),
        fleet=fleet,
        validity_days=validity_days,
        now=now,
    )
    return key, cert


def load_ca(directory: Path) -> CertificateAuthority:
    """Load the CA in ``directory``; CaNotFound if there is none, CaCorrupt if it is damaged."""
    cert_path = directory / CA_CERT_FILE
    key_path = directory / CA_KEY_FILE
    if not cert_path.is_file():
        raise CaNotFound(
            f"no fleet CA in {directory} ({cert_path} not found); create one with "
            f"`honeyfleet pki init --fleet NAME --dir {directory}` or point --dir / "
            "HONEYFLEET_PKI_DIR at the existing CA directory"
        )
    if not key_path.is_file():
        raise CaNotFound(
            f"{directory} has {CA_CERT_FILE} but no {CA_KEY_FILE}; it is a trust bundle, not a "
            "CA directory - point --dir / HONEYFLEET_PKI_DIR at the CA directory"
        )
    issuing_path = directory / ISSUING_CERT_FILE
    try:
        root = certs.load_certificate(cert_path)
        cert = certs.load_certificate(issuing_path) if issuing_path.exists() else root
        key = certs.load_private_key(key_path)
    except PkiFileError as exc:
        raise CaCorrupt(f"fleet CA in {directory} is damaged: {exc}") from None
    _warn_if_exposed(key_path)
    signer_path = issuing_path if cert is not root else cert_path
    if key.public_key() != cert.public_key():
        raise CaCorrupt(
            f"{key_path} does not match {signer_path}; restore both files from the same backup"
        )
    if cert is not root:
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            raise CaCorrupt(
                f"{issuing_path} was not signed by the root {cert_path}; restore it from "
                "backup or make a new one with `honeyfleet pki rotate-issuing`"
            ) from None
    fleet = _read_fleet(directory / FLEET_FILE)
    expected_cn = f"{fleet} honeyfleet CA"
    cns = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in cns] != [expected_cn]:
        raise CaCorrupt(
            f"{directory / FLEET_FILE} names fleet {fleet!r} but {cert_path} is not that "
            f"fleet's CA; restore {FLEET_FILE} from backup"
        )
    token_key = _read_token_key(directory / TOKEN_KEY_FILE)
    return CertificateAuthority(directory, fleet, cert, key, token_key, root)


def _read_fleet(path: Path) -> str:
    """Read and validate the fleet name file."""
    try:
        fleet = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        raise CaCorrupt(
            f"{path} is missing or unreadable; recreate it containing the fleet name"
        ) from None
    try:
        return validate_label(fleet, "fleet")
    except IdentityError as exc:
        raise CaCorrupt(f"{path}: {exc}") from None


def _read_token_key(path: Path) -> bytes:
    """Read the join-token HMAC key, checking its length."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CaCorrupt(
            f"{path} is missing; restore it from backup, or write {TOKEN_KEY_BYTES} random "
            "bytes to it (outstanding join tokens will stop working)"
        ) from None
    if len(data) != TOKEN_KEY_BYTES:
        raise CaCorrupt(
            f"{path} holds {len(data)} bytes, expected {TOKEN_KEY_BYTES}; restore it from backup"
        )
    return data


def _warn_if_exposed(path: Path) -> None:
    """Log a warning if a private key file is readable by group or others."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "%s has mode %o; the CA key should be private: chmod 600 %s", path, mode, path
        )
