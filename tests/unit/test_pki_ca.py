"""Tests for honeyfleet.pki.ca, certs and files: CA lifecycle, issuing, CSR signing."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from honeyfleet.pki import (
    CaCorrupt,
    CaExists,
    CaNotFound,
    CertificateAuthority,
    CsrInvalid,
    Identity,
    IdentityError,
    IssueError,
    PkiFileError,
    Role,
    csr_for,
    generate_key,
    identity_from_certificate,
    init_ca,
    load_ca,
    load_certificate,
    load_private_key,
    write_private,
)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    """A fresh CA for fleet 'lab'."""
    return init_ca(tmp_path / "pki", "lab")


def _mode(path: Path) -> int:
    """Permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


# --- CA lifecycle -----------------------------------------------------------------------


def test_init_creates_private_layout(ca: CertificateAuthority) -> None:
    """init writes every documented file, all 0600, in a 0700 directory."""
    d = ca.directory
    assert _mode(d) == 0o700
    for name in ("ca.pem", "issuing.pem", "ca.key", "token.key", "fleet", "revoked.json"):
        assert _mode(d / name) == 0o600, name
    # The root key sits apart, for the operator to move offline.
    assert _mode(d / "root") == 0o700 and _mode(d / "root" / "root.key") == 0o600
    assert (d / "fleet").read_text() == "lab\n"
    assert len((d / "token.key").read_bytes()) == 32
    assert json.loads((d / "revoked.json").read_text()) == {}


def test_ca_certificate_profile(ca: CertificateAuthority) -> None:
    """The root is a P-256, self-signed, path-length-1 CA limited to cert/CRL signing; the
    issuing CA under it is path-length-0 (it signs only leaves)."""
    cert = ca.root
    assert cert.subject.rfc4514_string() == "CN=lab honeyfleet CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ca.cert.verify_directly_issued_by(ca.root)
    issuing_bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert issuing_bc.ca and issuing_bc.path_length == 0
    assert ca.cert.public_key() == ca.key.public_key() != ca.root.public_key()
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1)
    assert 3640 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 3651


def test_load_round_trip(ca: CertificateAuthority) -> None:
    """load_ca returns the same CA that init_ca created."""
    loaded = load_ca(ca.directory)
    assert loaded.fleet == "lab"
    assert loaded.fingerprint == ca.fingerprint
    assert loaded.token_key == ca.token_key
    assert loaded.cert_pem == ca.cert_pem == (ca.directory / "ca.pem").read_bytes()
    assert ca.fingerprint == ca.root.fingerprint(hashes.SHA256()).hex()
    assert loaded.cert == ca.cert and loaded.root == ca.root
    assert len(ca.fingerprint) == 64


def test_one_level_ca_of_older_releases_still_loads(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """A CA directory without issuing.pem (the root signs leaves) loads and issues."""
    (ca.directory / "issuing.pem").unlink()
    root_key = (ca.directory / "root" / "root.key").read_bytes()
    write_private(ca.directory / "ca.key", root_key, overwrite=True)
    legacy = load_ca(ca.directory)
    assert legacy.cert == legacy.root == ca.root and legacy.chain_pem == b""
    issued = legacy.issue(Role.SENSOR, "old", out_dir=tmp_path / "o")
    load_certificate(issued.cert_path).verify_directly_issued_by(ca.root)


def test_repr_has_no_key_material(ca: CertificateAuthority) -> None:
    """repr() is safe to log."""
    assert "lab" in repr(ca)
    assert ca.token_key.hex() not in repr(ca)
    assert "PRIVATE" not in repr(ca)


def test_refuses_reinit(ca: CertificateAuthority) -> None:
    """A second init in the same directory is refused and changes nothing."""
    before = (ca.directory / "ca.key").read_bytes()
    with pytest.raises(CaExists, match="refusing to overwrite"):
        init_ca(ca.directory, "other")
    assert (ca.directory / "ca.key").read_bytes() == before


def test_refuses_init_over_partial_ca(tmp_path: Path) -> None:
    """Even a stray ca.key alone blocks init: it might be the only copy of a CA key."""
    d = tmp_path / "pki"
    d.mkdir()
    (d / "ca.key").write_text("keep me")
    with pytest.raises(CaExists, match=r"ca\.key"):
        init_ca(d, "lab")


def test_init_rejects_bad_fleet(tmp_path: Path) -> None:
    """The fleet name is validated before anything is written."""
    with pytest.raises(IdentityError, match="invalid fleet"):
        init_ca(tmp_path / "pki", "Bad Fleet")
    assert not (tmp_path / "pki").exists()


def test_load_missing(tmp_path: Path) -> None:
    """A missing CA says how to create one."""
    with pytest.raises(CaNotFound, match="pki init"):
        load_ca(tmp_path / "nowhere")


def test_load_trust_bundle_only(tmp_path: Path, ca: CertificateAuthority) -> None:
    """A directory with ca.pem but no ca.key is not a CA."""
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "ca.pem").write_bytes(ca.cert_pem)
    with pytest.raises(CaNotFound, match=r"no ca\.key"):
        load_ca(d)


def test_load_detects_mismatched_key(ca: CertificateAuthority, tmp_path: Path) -> None:
    """A CA key from another CA is detected."""
    other = init_ca(tmp_path / "other", "lab")
    write_private(
        ca.directory / "ca.key", (other.directory / "ca.key").read_bytes(), overwrite=True
    )
    with pytest.raises(CaCorrupt, match="does not match"):
        load_ca(ca.directory)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("token.key", b"short", "expected 32"),
        ("fleet", b"Not Valid\n", "invalid fleet"),
        ("fleet", b"other\n", "not that fleet's CA"),
        ("ca.pem", b"garbage", "not a valid PEM or DER X.509"),
        ("ca.key", b"garbage", "not an unencrypted PEM private key"),
    ],
)
def test_load_detects_damage(
    ca: CertificateAuthority, name: str, content: bytes, match: str
) -> None:
    """Each damaged file is reported as CaCorrupt with a pointer to the problem."""
    write_private(ca.directory / name, content, overwrite=True)
    with pytest.raises(CaCorrupt, match=match):
        load_ca(ca.directory)


def test_load_missing_token_key(ca: CertificateAuthority) -> None:
    """A missing token.key explains the consequence of recreating it."""
    (ca.directory / "token.key").unlink()
    with pytest.raises(CaCorrupt, match="join tokens will stop working"):
        load_ca(ca.directory)


# --- issuing ----------------------------------------------------------------------------


def test_issue_writes_private_files(ca: CertificateAuthority, tmp_path: Path) -> None:
    """issue writes key, cert and CA copy, all 0600, and the key matches the cert."""
    out = tmp_path / "out" / "sensor-s1"
    issued = ca.issue(Role.SENSOR, "s1", out_dir=out)
    assert issued.key_path == out / "s1.key"
    assert issued.cert_path == out / "s1.pem"
    assert issued.ca_path == out / "ca.pem"
    for path in (issued.key_path, issued.cert_path, issued.ca_path):
        assert _mode(path) == 0o600, path
    assert _mode(out) == 0o700
    assert issued.ca_path.read_bytes() == ca.cert_pem
    cert = load_certificate(issued.cert_path)
    key = load_private_key(issued.key_path)
    assert key.public_key() == cert.public_key()
    assert cert.serial_number == issued.serial
    assert issued.identity == Identity("lab", Role.SENSOR, "s1")


def test_issued_certificate_profile(ca: CertificateAuthority, tmp_path: Path) -> None:
    """SANs, EKU, key usage, constraints, key ids, backdating and chain are all correct."""
    issued = ca.issue(
        Role.POOLNODE,
        "pn1",
        dns=["PN1.Example.NET", "pn1.example.net", "pool.example.net"],
        ips=["192.0.2.10", "2001:db8::10"],
        validity_days=30,
        out_dir=tmp_path / "o",
    )
    cert = load_certificate(issued.cert_path)
    cert.verify_directly_issued_by(ca.cert)
    assert identity_from_certificate(cert) == Identity("lab", Role.POOLNODE, "pn1")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pn1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://lab/poolnode/pn1"]
    # The identity names first, then the operator's, lowercased and de-duplicated.
    assert san.get_values_for_type(x509.DNSName) == [
        "poolnode.lab.hf.invalid",
        "pn1.poolnode.lab.hf.invalid",
        "pn1.example.net",
        "pool.example.net",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("2001:db8::10"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days == 30 and lifetime.seconds == 300  # 30 days + 5 minutes backdating
    assert 0 < cert.serial_number < 2**159


@pytest.mark.parametrize(
    "name", ["*.pool.example.net", "*", "pool.*.example.net", "x.poolnode.lab.hf.invalid"]
)
def test_wildcard_and_reserved_dns_names_are_refused(
    ca: CertificateAuthority, tmp_path: Path, name: str
) -> None:
    """A certificate never carries a wildcard, nor an identity name the CA did not write."""
    with pytest.raises(IssueError):
        ca.issue(Role.POOLNODE, "pn1", dns=[name], out_dir=tmp_path / "o")


def test_issue_serials_are_unique_and_logged(ca: CertificateAuthority, tmp_path: Path) -> None:
    """Each issue gets a new random serial, recorded in issued.jsonl."""
    a = ca.issue(Role.SENSOR, "a", out_dir=tmp_path / "a")
    b = ca.issue(Role.SENSOR, "b", out_dir=tmp_path / "b")
    assert a.serial != b.serial
    ledger = (ca.directory / "issued.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in ledger]
    assert [e["serial"] for e in entries] == [f"{a.serial:x}", f"{b.serial:x}"]
    assert entries[0]["identity"] == "spiffe://lab/sensor/a"
    assert _mode(ca.directory / "issued.jsonl") == 0o600


def test_issue_refuses_to_overwrite_key(ca: CertificateAuthority, tmp_path: Path) -> None:
    """Issuing twice into the same directory keeps the first key."""
    first = ca.issue(Role.SENSOR, "s1", out_dir=tmp_path)
    key_before = first.key_path.read_bytes()
    with pytest.raises(PkiFileError, match=r"s1\.key already exists"):
        ca.issue(Role.SENSOR, "s1", out_dir=tmp_path)
    assert first.key_path.read_bytes() == key_before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ips": ["10.0.0.300"]}, "invalid IP address '10.0.0.300'"),
        ({"ips": ["example.com"]}, "invalid IP address"),
        ({"dns": ["bad name"]}, "invalid DNS name 'bad name'"),
        ({"dns": ["-lead.example"]}, "invalid DNS name"),
        ({"dns": [""]}, "invalid DNS name"),
        ({"validity_days": 0}, "at least 1 day"),
    ],
)
def test_issue_rejects_bad_parameters(
    ca: CertificateAuthority, tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    """Invalid SANs or validity fail with a message naming the value, and write no files."""
    with pytest.raises(IssueError, match=match):
        ca.issue(Role.SENSOR, "s1", out_dir=tmp_path / "o", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "o").exists()


def test_issue_rejects_bad_name(ca: CertificateAuthority, tmp_path: Path) -> None:
    """A name that is not a safe label never reaches the file system."""
    with pytest.raises(IdentityError):
        ca.issue(Role.SENSOR, "../evil", out_dir=tmp_path)


def test_leaf_validity_clamped_to_ca(tmp_path: Path) -> None:
    """A leaf never outlives its CA."""
    short = init_ca(tmp_path / "pki", "lab", validity_days=10)
    issued = short.issue(Role.SENSOR, "s1", validity_days=365, out_dir=tmp_path / "o")
    cert = load_certificate(issued.cert_path)
    assert cert.not_valid_after_utc == short.cert.not_valid_after_utc


# --- CSR signing ------------------------------------------------------------------------


def test_sign_csr_uses_only_the_public_key(ca: CertificateAuthority) -> None:
    """The CSR asks to be an admin with extra SANs; the CA issues exactly what it was told."""
    key = generate_key()
    forged = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://lab/admin/root"),
                    x509.DNSName("controller.example"),
                    x509.IPAddress(ipaddress.ip_address("10.9.9.9")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    wanted = Identity("lab", Role.SENSOR, "s7")
    cert = x509.load_pem_x509_certificate(ca.sign_csr(forged, wanted, dns=["s7.example"]))
    cert.verify_directly_issued_by(ca.cert)
    assert cert.public_key() == key.public_key()
    assert identity_from_certificate(cert) == wanted
    assert cert.subject.rfc4514_string() == "CN=s7"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [
        x509.UniformResourceIdentifier("spiffe://lab/sensor/s7"),
        x509.DNSName("sensor.lab.hf.invalid"),
        x509.DNSName("s7.sensor.lab.hf.invalid"),
        x509.DNSName("s7.example"),
    ]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_csr_for_round_trip(ca: CertificateAuthority) -> None:
    """The joiner's helper produces a CSR the CA accepts."""
    key = generate_key()
    ident = Identity("lab", Role.POOLNODE, "pn2")
    csr_pem = csr_for(key, ident)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    cert = x509.load_pem_x509_certificate(ca.sign_csr(csr_pem, ident, ips=["10.0.0.2"]))
    assert identity_from_certificate(cert) == ident


def test_sign_csr_rejects_bad_signature(ca: CertificateAuthority) -> None:
    """A CSR whose signature does not verify (no proof of key possession) is refused."""
    csr = x509.load_pem_x509_csr(csr_for(generate_key(), Identity("lab", Role.SENSOR, "s")))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # flip a bit in the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrInvalid, match="signature does not verify"):
        ca.sign_csr(tampered, Identity("lab", Role.SENSOR, "s"))


@pytest.mark.parametrize("junk", [b"", b"not a csr", b"-----BEGIN CERTIFICATE REQUEST-----\n"])
def test_sign_csr_rejects_garbage(ca: CertificateAuthority, junk: bytes) -> None:
    """Malformed input is a CsrInvalid, not a crash."""
    with pytest.raises(CsrInvalid):
        ca.sign_csr(junk, Identity("lab", Role.SENSOR, "s"))


def test_sign_csr_rejects_oversized(ca: CertificateAuthority) -> None:
    """CSRs come from the network; size is bounded before parsing."""
    with pytest.raises(CsrInvalid, match="limit"):
        ca.sign_csr(b"A" * 20_000, Identity("lab", Role.SENSOR, "s"))


def test_sign_csr_rejects_other_key_types(ca: CertificateAuthority) -> None:
    """Only P-256 keys are accepted, so every peer speaks the same curve."""
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s")]))
        .sign(key, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CsrInvalid, match="P-256"):
        ca.sign_csr(csr, Identity("lab", Role.SENSOR, "s"))


def test_sign_csr_rejects_other_fleet(ca: CertificateAuthority) -> None:
    """A CA only issues identities in its own trust domain."""
    ident = Identity("elsewhere", Role.SENSOR, "s")
    with pytest.raises(IdentityError, match="fleet 'elsewhere'"):
        ca.sign_csr(csr_for(generate_key(), ident), ident)


# --- files --------------------------------------------------------------------------------


def test_write_private_is_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    """The mode is set explicitly, not left to the umask."""
    import os

    old = os.umask(0)
    try:
        write_private(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f") == 0o600


def test_write_private_overwrite_semantics(tmp_path: Path) -> None:
    """Existing files are kept unless overwrite=True; no temp files are left behind."""
    path = tmp_path / "k"
    write_private(path, b"one")
    with pytest.raises(PkiFileError, match="refusing to overwrite"):
        write_private(path, b"two")
    assert path.read_bytes() == b"one"
    write_private(path, b"three", overwrite=True)
    assert path.read_bytes() == b"three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]
