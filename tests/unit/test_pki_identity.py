"""Tests for honeyfleet.pki.identity: SPIFFE ids, validation, and reading them from certs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from honeyfleet.pki import IdentityError, generate_key
from honeyfleet.pki.identity import Identity, Role, identity_from_certificate


def test_uri_and_str() -> None:
    """An identity renders as a SPIFFE URI and as role/name."""
    ident = Identity("lab", Role.SENSOR, "sensor-01.eu")
    assert ident.uri == "spiffe://lab/sensor/sensor-01.eu"
    assert str(ident) == "sensor/sensor-01.eu"


@pytest.mark.parametrize("role", list(Role))
def test_parse_round_trip(role: Role) -> None:
    """parse(uri) inverts .uri for every role."""
    ident = Identity("fleet_1", role, "n-1")
    assert Identity.parse(ident.uri) == ident


def test_role_given_as_string_is_normalised() -> None:
    """A plain string role is stored as the enum, so equality with parsed ids holds."""
    ident = Identity("lab", "admin", "alice")  # type: ignore[arg-type]
    assert ident.role is Role.ADMIN
    assert ident == Identity.parse("spiffe://lab/admin/alice")


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "https://lab/sensor/s1",
        "spiffe://lab/sensor",
        "spiffe://lab/sensor/s1/extra",
        "spiffe://lab/sensor/s1/",
        "spiffe://lab/hacker/s1",
        "spiffe://Lab/sensor/s1",
        "spiffe:///sensor/s1",
        "spiffe://lab/sensor/",
        "spiffe://lab/sensor/-s1",
        "spiffe://lab/sensor/s1\n",
        "spiffe://lab/sensor/s%201",
        "spiffe://lab/sensor/" + "a" * 64,
    ],
)
def test_parse_rejects(uri: str) -> None:
    """Anything but spiffe://<fleet>/<role>/<name> with valid labels is refused."""
    with pytest.raises(IdentityError):
        Identity.parse(uri)


@pytest.mark.parametrize("bad", ["", "UPPER", "has space", "a/b", "_lead", "é", "x" * 64, "a\n"])
def test_invalid_name_is_named_in_error(bad: str) -> None:
    """The error message quotes the offending value and the field."""
    with pytest.raises(IdentityError, match="invalid name") as info:
        Identity("lab", Role.SENSOR, bad)
    assert repr(bad) in str(info.value)


def test_invalid_fleet_is_named_in_error() -> None:
    """A bad fleet is reported as such."""
    with pytest.raises(IdentityError, match="invalid fleet 'My Fleet'"):
        Identity("My Fleet", Role.SENSOR, "s1")


def test_longest_valid_label() -> None:
    """63 characters is the limit, as for a DNS label."""
    assert Identity("lab", Role.SENSOR, "a" * 63).name == "a" * 63


def test_unknown_role_lists_valid_ones() -> None:
    """Role.parse tells the operator what the choices are."""
    with pytest.raises(IdentityError, match="controller, poolnode, sensor, admin"):
        Role.parse("root")


def _self_signed(sans: list[x509.GeneralName] | None) -> x509.Certificate:
    """A throwaway certificate with the given SANs (None: no SAN extension at all)."""
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_identity_from_certificate() -> None:
    """The one spiffe URI wins; other SAN types and non-spiffe URIs are ignored."""
    cert = _self_signed(
        [
            x509.DNSName("s1.example"),
            x509.UniformResourceIdentifier("https://example.net/"),
            x509.UniformResourceIdentifier("spiffe://lab/poolnode/pn1"),
        ]
    )
    assert identity_from_certificate(cert) == Identity("lab", Role.POOLNODE, "pn1")


@pytest.mark.parametrize(
    "sans",
    [
        None,
        [x509.DNSName("s1.example")],
        [
            x509.UniformResourceIdentifier("spiffe://lab/sensor/a"),
            x509.UniformResourceIdentifier("spiffe://lab/admin/b"),
        ],
        [x509.UniformResourceIdentifier("spiffe://lab/nope/a")],
    ],
)
def test_identity_from_certificate_rejects(sans: list[x509.GeneralName] | None) -> None:
    """No SAN, no spiffe URI, two of them, or a bad one: all refused."""
    with pytest.raises(IdentityError):
        identity_from_certificate(_self_signed(sans))
