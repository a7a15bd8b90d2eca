"""Tests for honeyfleet.pki.tokens: format, MAC, expiry and hostile input."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from honeyfleet.pki import (
    CertificateAuthority,
    IssueError,
    Role,
    TokenError,
    TokenExpired,
    TokenInvalid,
    create_token,
    init_ca,
    read_token_unverified,
    verify_token,
)
from honeyfleet.pki.tokens import MAX_TOKEN_LENGTH


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    """A fresh CA for fleet 'lab'."""
    return init_ca(tmp_path / "pki", "lab")


def _b64(data: bytes) -> str:
    """Unpadded base64url, as the token format uses."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(claims: dict[str, object], key: bytes) -> str:
    """Build a correctly MACed token around arbitrary claims (to test claim validation)."""
    payload = _b64(json.dumps(claims).encode())
    mac = hmac.new(key, f"hf2.{payload}".encode(), hashlib.sha256).digest()
    return f"hf2.{payload}.{_b64(mac)}"


def test_round_trip(ca: CertificateAuthority) -> None:
    """A fresh token verifies and carries role, name, CA pin, fleet and a jti."""
    ttl = timedelta(minutes=30)
    before = datetime.now(UTC)
    token = create_token(ca, Role.SENSOR, ttl=ttl, name="s1")
    after = datetime.now(UTC)
    claims = verify_token(token, ca.token_key)
    assert claims.role is Role.SENSOR
    assert claims.name == "s1"
    assert claims.fleet == "lab"
    assert claims.ca_fingerprint == ca.fingerprint
    assert len(claims.jti) == 32 and int(claims.jti, 16) >= 0
    # exp is whole unix seconds, truncated: bounded by the clock read around creation.
    assert (before + ttl).replace(microsecond=0) <= claims.expires_at <= after + ttl
    assert read_token_unverified(token) == claims


def test_format(ca: CertificateAuthority) -> None:
    """hf2.<payload>.<mac>, unpadded base64url, with exactly the documented claims."""
    token = create_token(ca, Role.POOLNODE, ttl=timedelta(hours=1), name="n1")
    prefix, payload, mac = token.split(".")
    assert prefix == "hf2"
    assert "=" not in token and "+" not in token and "/" not in token
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert set(claims) == {"role", "name", "exp", "jti", "ca", "fleet"}
    expected = hmac.new(ca.token_key, f"hf2.{payload}".encode(), hashlib.sha256).digest()
    assert mac == _b64(expected)
    assert read_token_unverified(token).name == "n1"


def test_addresses_and_reenrol_round_trip(ca: CertificateAuthority) -> None:
    """A pool node's token names its addresses, canonical; re-enrolment is explicit."""
    token = create_token(
        ca,
        Role.POOLNODE,
        ttl=timedelta(hours=1),
        name="rack2",
        dns=["Rack2.Example.NET."],
        ips=["127.0.0.1"],
        reenrol=True,
    )
    claims = verify_token(token, ca.token_key)
    assert (claims.dns, claims.ips, claims.reenrol) == (
        ("rack2.example.net",),
        ("127.0.0.1",),
        True,
    )
    assert not verify_token(
        create_token(ca, Role.SENSOR, ttl=timedelta(1), name="s"), ca.token_key
    ).reenrol


@pytest.mark.parametrize(
    ("role", "dns", "ips", "error"),
    [
        (Role.POOLNODE, ["*.example.net"], [], IssueError),
        (Role.POOLNODE, ["pn.poolnode.lab.hf.invalid"], [], IssueError),
        (Role.POOLNODE, [], ["10.0.0.300"], IssueError),
        (Role.SENSOR, [], ["127.0.0.1"], TokenError),
        (Role.POOLNODE, [f"h{i}.example.net" for i in range(9)], [], TokenError),
        (Role.CONTROLLER, [], [], TokenError),
        (Role.ADMIN, [], [], TokenError),
    ],
)
def test_token_addresses_are_checked_at_creation(
    ca: CertificateAuthority, role: Role, dns: list[str], ips: list[str], error: type[Exception]
) -> None:
    """No wildcard, no reserved name, no addresses for a sensor, and only a few."""
    with pytest.raises(error):
        create_token(ca, role, ttl=timedelta(hours=1), name="x", dns=dns, ips=ips)


def test_tokens_are_unique(ca: CertificateAuthority) -> None:
    """Every token has its own single-use id."""
    jtis = {
        read_token_unverified(create_token(ca, Role.SENSOR, ttl=timedelta(1), name="n1")).jti
        for _ in range(20)
    }
    assert len(jtis) == 20


def test_surrounding_whitespace_tolerated(ca: CertificateAuthority) -> None:
    """Copy-pasted tokens often carry a newline."""
    token = create_token(ca, Role.SENSOR, ttl=timedelta(hours=1), name="n1")
    assert verify_token(f"  {token}\n", ca.token_key).role is Role.SENSOR


def test_tampered_payload_rejected(ca: CertificateAuthority) -> None:
    """Changing the claims (e.g. sensor -> admin) breaks the MAC."""
    token = create_token(ca, Role.SENSOR, ttl=timedelta(hours=1), name="n1")
    prefix, payload, mac = token.split(".")
    claims = read_token_unverified(token)
    forged = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged["role"] = "admin"
    bad = f"{prefix}.{_b64(json.dumps(forged).encode())}.{mac}"
    assert read_token_unverified(bad).role is Role.ADMIN  # unverified read cannot tell...
    with pytest.raises(TokenInvalid, match="signature does not verify"):
        verify_token(bad, ca.token_key)  # ...but the controller can
    assert claims.role is Role.SENSOR


def test_tampered_mac_rejected(ca: CertificateAuthority) -> None:
    """A MAC of the right length but wrong value is refused."""
    token = create_token(ca, Role.SENSOR, ttl=timedelta(hours=1), name="n1")
    prefix, payload, mac = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(mac + "="))
    raw[0] ^= 0xFF
    with pytest.raises(TokenInvalid, match="signature"):
        verify_token(f"{prefix}.{payload}.{_b64(bytes(raw))}", ca.token_key)


def test_other_ca_rejected(ca: CertificateAuthority, tmp_path: Path) -> None:
    """A token from another CA (even for the same fleet name) does not verify."""
    other = init_ca(tmp_path / "other", "lab")
    token = create_token(other, Role.SENSOR, ttl=timedelta(hours=1), name="n1")
    with pytest.raises(TokenInvalid, match="another fleet CA"):
        verify_token(token, ca.token_key)


def test_expired_rejected(ca: CertificateAuthority) -> None:
    """After exp, an authentic token raises TokenExpired (not TokenInvalid)."""
    token = create_token(ca, Role.SENSOR, ttl=timedelta(minutes=5), name="n1")
    exp = read_token_unverified(token).expires_at
    assert verify_token(token, ca.token_key, now=exp - timedelta(seconds=1))
    with pytest.raises(TokenExpired, match="expired"):
        verify_token(token, ca.token_key, now=exp)
    with pytest.raises(TokenExpired):
        verify_token(token, ca.token_key, now=datetime.now(UTC) + timedelta(hours=1))


def test_naive_now_refused(ca: CertificateAuthority) -> None:
    """A naive datetime is a programming error, not silently local time."""
    token = create_token(ca, Role.SENSOR, ttl=timedelta(minutes=5), name="n1")
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_token(token, ca.token_key, now=datetime(2030, 1, 1))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "hf2",
        "hf2..",
        "hf2.a.b.c",
        "hf2.e30.AAAA",
        "hf2.e30",
        "hf2.!!!!.AAAA",
        "hf2.e30.AAAA",  # MAC too short
        "hf2.e3 0.AAAA",
        "hf2.e30=." + "A" * 43,  # padding is not allowed
        "x" * (MAX_TOKEN_LENGTH + 1),
        "hf2." + "A" * 5000 + ".AAAA",
    ],
)
def test_malformed_rejected(ca: CertificateAuthority, token: str) -> None:
    """Garbage, wrong versions, bad base64 and oversized input all raise TokenInvalid."""
    with pytest.raises(TokenInvalid):
        read_token_unverified(token)
    with pytest.raises(TokenInvalid):
        verify_token(token, ca.token_key)


def test_non_string_rejected(ca: CertificateAuthority) -> None:
    """Bytes or None from a sloppy caller are TokenInvalid too."""
    with pytest.raises(TokenInvalid):
        verify_token(b"hf2.x.y", ca.token_key)  # type: ignore[arg-type]


def _good_claims(ca: CertificateAuthority) -> dict[str, object]:
    """A valid claim set to mutate."""
    return {
        "role": "sensor",
        "exp": int((datetime.now(UTC) + timedelta(hours=1)).timestamp()),
        "jti": "ab" * 16,
        "ca": ca.fingerprint,
        "fleet": "lab",
        "name": "s1",
    }


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"role": "root"}, "unknown role"),
        ({"role": 1}, "role"),
        ({"exp": "tomorrow"}, "exp"),
        ({"exp": True}, "exp"),
        ({"exp": 10**30}, "exp"),
        ({"jti": "short"}, "jti"),
        ({"ca": "AB" * 32}, "'ca'"),
        ({"fleet": "Bad Fleet"}, "invalid fleet"),
        ({"name": "../x"}, "invalid name"),
        ({"extra": 1}, "do not match the hf2 format"),
        ({"jti": None}, "jti"),
        ({"reenrol": 1}, "reenrol"),
        ({"ips": "127.0.0.1"}, "address"),
        ({"dns": ["*.example.net"]}, "invalid claim"),
        ({"role": "sensor", "ips": ["127.0.0.1"]}, "invalid claim"),
    ],
)
def test_bad_claims_rejected_even_with_valid_mac(
    ca: CertificateAuthority, change: dict[str, object], match: str
) -> None:
    """Claims are validated strictly after the MAC, naming the bad claim."""
    claims = _good_claims(ca) | change
    with pytest.raises(TokenInvalid, match=match):
        verify_token(_forge(claims, ca.token_key), ca.token_key)


def test_missing_claim_rejected(ca: CertificateAuthority) -> None:
    """Every claim but the addresses and reenrol is required; a name-less token is refused."""
    for claim in ("ca", "name"):
        claims = _good_claims(ca)
        del claims[claim]
        with pytest.raises(TokenInvalid, match="do not match the hf2 format"):
            verify_token(_forge(claims, ca.token_key), ca.token_key)


def test_payload_must_be_object(ca: CertificateAuthority) -> None:
    """A JSON array payload is malformed."""
    payload = _b64(b"[1,2]")
    mac = hmac.new(ca.token_key, f"hf2.{payload}".encode(), hashlib.sha256).digest()
    with pytest.raises(TokenInvalid, match="JSON object"):
        verify_token(f"hf2.{payload}.{_b64(mac)}", ca.token_key)


def test_forged_good_claims_accepted(ca: CertificateAuthority) -> None:
    """Sanity check for the helper: unmodified claims verify."""
    assert verify_token(_forge(_good_claims(ca), ca.token_key), ca.token_key).jti == "ab" * 16


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-1)])
def test_create_rejects_non_positive_ttl(ca: CertificateAuthority, ttl: timedelta) -> None:
    """A token that is born expired is a mistake."""
    with pytest.raises(TokenError, match="positive"):
        create_token(ca, Role.SENSOR, ttl=ttl, name="n1")
