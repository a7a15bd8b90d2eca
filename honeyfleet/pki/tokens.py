"""One-time join tokens: authorise an enrolment and pin the fleet CA for the joiner.

Format (ASCII, at most ``MAX_TOKEN_LENGTH`` characters)::

    hf2.<base64url(json claims)>.<base64url(HMAC-SHA256(token_key, "hf2." + payload))>

base64url is unpadded. The claims are ``role``, ``name`` (the only name the joiner gets: the
operator chooses it, never the joiner), ``exp`` (unix seconds), ``jti`` (16 random bytes, hex:
the single-use id), ``ca`` (SHA-256 hex fingerprint of the CA certificate), ``fleet``, and
optionally ``dns`` / ``ips`` (the exact addresses the certificate carries, for a pool node that
serves; no wildcards) and ``reenrol`` (true: the name may already exist, and enrolling revokes
its current certificates). ``hf1`` tokens, which let the joiner pick its name, are refused.

Two readers:

* the joining host calls ``read_token_unverified``: it does not hold ``token.key`` and cannot
  check the MAC, but needs ``ca`` to authenticate the controller's TLS certificate before it
  sends anything (the token itself is the out-of-band channel for that pin);
* the controller calls ``verify_token`` with the CA's ``token.key``.

**Single use is the caller's job.** ``verify_token`` is stateless: the controller must record
each accepted ``jti`` in its store (until ``exp`` passes) and refuse a ``jti`` it has seen.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from honeyfleet.pki.ca import CertificateAuthority
from honeyfleet.pki.certs import parse_dns_names, parse_ip_addresses
from honeyfleet.pki.errors import PkiError, TokenError, TokenExpired, TokenInvalid
from honeyfleet.pki.identity import Role, validate_label

__all__ = [
    "ADDRESSED_ROLES",
    "ENROLLABLE_ROLES",
    "MAX_TOKEN_ADDRESSES",
    "MAX_TOKEN_LENGTH",
    "TOKEN_PREFIX",
    "TokenClaims",
    "create_token",
    "read_token_unverified",
    "verify_token",
]

TOKEN_PREFIX = "hf2"  # noqa: S105 - a format version tag, not a secret
#: Tokens arrive from the network; a real one is ~300 characters.
MAX_TOKEN_LENGTH = 2048

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_JTI_RE = re.compile(r"[0-9a-f]{32}")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_CLAIM_KEYS = frozenset({"role", "name", "exp", "jti", "ca", "fleet", "dns", "ips", "reenrol"})
_REQUIRED_KEYS = _CLAIM_KEYS - {"dns", "ips", "reenrol"}
#: Roles a token may enrol; controllers and admins are issued by hand (`pki issue`).
ENROLLABLE_ROLES = frozenset({Role.SENSOR, Role.POOLNODE})
#: Roles whose certificates may carry addresses: the ones other members connect to.
ADDRESSED_ROLES = frozenset({Role.POOLNODE, Role.CONTROLLER})
#: Addresses one token may name; a pool node needs one or two.
MAX_TOKEN_ADDRESSES = 8
_HOW_TO_FIX = "ask the fleet administrator for a new one (`honeyfleet pki token create`)"


@dataclass(frozen=True)
class TokenClaims:
    """The decoded claims of a join token."""

    role: Role
    """Role the joiner will be issued."""
    name: str
    """The only name the joiner may enrol under, chosen by the operator."""
    expires_at: datetime
    """UTC expiry (the ``exp`` claim)."""
    jti: str
    """Single-use id, 32 hex digits; the controller records used ones."""
    ca_fingerprint: str
    """SHA-256 hex of the CA certificate DER; the joiner pins the controller's CA to it."""
    fleet: str
    """Fleet the token is for."""
    dns: tuple[str, ...] = ()
    """DNS names the certificate carries (exactly these; never a wildcard)."""
    ips: tuple[str, ...] = ()
    """IP addresses the certificate carries (exactly these)."""
    reenrol: bool = False
    """True: ``name`` may already be enrolled; its current certificates are revoked."""


def create_token(
    ca: CertificateAuthority,
    role: Role,
    *,
    ttl: timedelta,
    name: str,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    reenrol: bool = False,
) -> str:
    """Create a join token for exactly ``role``/``name`` (and its addresses) valid for ``ttl``.

    Raises TokenError for a bad lifetime or addresses the role may not carry, IdentityError for
    a bad name and IssueError for a bad or wildcard address.
    """
    role = Role.parse(role)
    if role not in ENROLLABLE_ROLES:
        raise TokenError(
            f"a token cannot enrol a {role}: issue its certificate with `honeyfleet pki issue`"
        )
    if ttl <= timedelta(0):
        raise TokenError(f"token lifetime {ttl} is invalid: use a positive duration")
    validate_label(name, "name")
    dns_names, addresses = _addresses(role, dns, ips)
    claims: dict[str, Any] = {
        "role": role.value,
        "name": name,
        "exp": int((datetime.now(UTC) + ttl).timestamp()),
        "jti": secrets.token_hex(16),
        "ca": ca.fingerprint,
        "fleet": ca.fleet,
    }
    if dns_names:
        claims["dns"] = dns_names
    if addresses:
        claims["ips"] = addresses
    if reenrol:
        claims["reenrol"] = True
    payload = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return f"{TOKEN_PREFIX}.{payload}.{_b64encode(_mac(ca.token_key, payload))}"


def read_token_unverified(token: str) -> TokenClaims:
    """Decode a token's claims WITHOUT checking its MAC or expiry (for the joining host).

    Raises TokenInvalid if it is malformed. Never authorise anything from the result; use it
    only for the CA pin and to know which role to request.
    """
    payload, _ = _split(token)
    return _parse_claims(payload)


def verify_token(token: str, token_key: bytes, *, now: datetime | None = None) -> TokenClaims:
    """Verify a token's MAC and expiry against the CA's ``token_key`` and return its claims.

    Raises TokenInvalid (malformed, or MAC mismatch, e.g. made by another CA) or TokenExpired.
    Does NOT enforce single use: the caller must record and refuse repeated ``jti`` values.
    """
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("verify_token: `now` must be timezone-aware")
    payload, mac = _split(token)
    # Check authenticity before parsing JSON: unauthenticated input gets no further.
    if not hmac.compare_digest(mac, _mac(token_key, payload)):
        raise TokenInvalid(
            "join token signature does not verify: it was altered, truncated, or issued by "
            f"another fleet CA; {_HOW_TO_FIX}"
        )
    claims = _parse_claims(payload)
    if now >= claims.expires_at:
        raise TokenExpired(
            f"join token {claims.jti} expired at {claims.expires_at.isoformat()}; {_HOW_TO_FIX}"
        )
    return claims


def _addresses(role: Role, dns: Sequence[str], ips: Sequence[str]) -> tuple[list[str], list[str]]:
    """Validated, canonical addresses for a token of ``role``; TokenError if not allowed."""
    if (dns or ips) and role not in ADDRESSED_ROLES:
        raise TokenError(
            f"a {role} certificate carries no addresses (nothing connects to a {role}); "
            "drop --dns/--ip"
        )
    if len(dns) + len(ips) > MAX_TOKEN_ADDRESSES:
        raise TokenError(f"a token names at most {MAX_TOKEN_ADDRESSES} addresses")
    return parse_dns_names(dns), [str(a) for a in parse_ip_addresses(ips)]


def _mac(token_key: bytes, payload: str) -> bytes:
    """HMAC-SHA256 over the prefix and payload, so the version is authenticated too."""
    return hmac.new(token_key, f"{TOKEN_PREFIX}.{payload}".encode(), hashlib.sha256).digest()


def _b64encode(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    """Strict unpadded base64url decode; TokenInvalid on any non-canonical input."""
    # urlsafe_b64decode silently skips junk characters, so check the alphabet first.
    if _B64URL_RE.fullmatch(text) is None:
        raise TokenInvalid(f"join token {what} is not base64url; {_HOW_TO_FIX}")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenInvalid(f"join token {what} is not base64url; {_HOW_TO_FIX}") from None
    if _b64encode(data) != text:
        raise TokenInvalid(f"join token {what} is not canonical base64url; {_HOW_TO_FIX}")
    return data


def _split(token: str) -> tuple[str, bytes]:
    """Split a token into its payload text and decoded MAC, checking size and shape."""
    if not isinstance(token, str):
        raise TokenInvalid(f"join token must be text, got {type(token).__name__}")
    # Bound before any other work; surrounding whitespace from copy-paste is tolerated.
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenInvalid(
            f"join token is {len(token)} characters, more than the {MAX_TOKEN_LENGTH} allowed; "
            "check it was copied correctly"
        )
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenInvalid(
            f"not a honeyfleet join token (expected '{TOKEN_PREFIX}.<payload>.<mac>'); "
            "check it was copied completely"
        )
    mac = _b64decode(parts[2], "MAC")
    if len(mac) != hashlib.sha256().digest_size:
        raise TokenInvalid(f"join token MAC has the wrong length; {_HOW_TO_FIX}")
    return parts[1], mac


def _parse_claims(payload: str) -> TokenClaims:
    """Decode and strictly validate the JSON claims; TokenInvalid naming the bad claim."""
    try:
        raw = json.loads(_b64decode(payload, "payload"))
    except (ValueError, RecursionError):
        raise TokenInvalid(f"join token payload is not JSON; {_HOW_TO_FIX}") from None
    if not isinstance(raw, dict):
        raise TokenInvalid(f"join token payload is not a JSON object; {_HOW_TO_FIX}")
    keys = set(raw)
    if not keys >= _REQUIRED_KEYS or not keys <= _CLAIM_KEYS:
        raise TokenInvalid(
            f"join token claims {sorted(keys)} do not match the {TOKEN_PREFIX} format; "
            f"{_HOW_TO_FIX}"
        )
    exp = raw["exp"]
    # bool is an int subclass; true/false is not a timestamp.
    if not isinstance(exp, int) or isinstance(exp, bool) or not 0 < exp < 2**40:
        raise TokenInvalid(f"join token has an invalid 'exp' claim; {_HOW_TO_FIX}")
    jti, ca_fp = raw["jti"], raw["ca"]
    if not isinstance(jti, str) or _JTI_RE.fullmatch(jti) is None:
        raise TokenInvalid(f"join token has an invalid 'jti' claim; {_HOW_TO_FIX}")
    if not isinstance(ca_fp, str) or _FINGERPRINT_RE.fullmatch(ca_fp) is None:
        raise TokenInvalid(f"join token has an invalid 'ca' claim; {_HOW_TO_FIX}")
    name, dns, ips = raw["name"], raw.get("dns", []), raw.get("ips", [])
    reenrol = raw.get("reenrol", False)
    if not isinstance(reenrol, bool):
        raise TokenInvalid(f"join token has an invalid 'reenrol' claim; {_HOW_TO_FIX}")
    if not _string_list(dns) or not _string_list(ips):
        raise TokenInvalid(f"join token has an invalid address claim; {_HOW_TO_FIX}")
    try:
        role = Role.parse(raw["role"]) if isinstance(raw["role"], str) else None
        fleet = validate_label(raw["fleet"], "fleet")
        validate_label(name, "name")
        if role is not None:
            dns, ips = _addresses(role, dns, ips)
    except PkiError as exc:
        raise TokenInvalid(f"join token has an invalid claim: {exc}") from None
    if role is None:
        raise TokenInvalid(f"join token has an invalid 'role' claim; {_HOW_TO_FIX}")
    return TokenClaims(
        role=role,
        name=name,
        expires_at=datetime.fromtimestamp(exp, UTC),
        jti=jti,
        ca_fingerprint=ca_fp,
        fleet=fleet,
        dns=tuple(dns),
        ips=tuple(ips),
        reenrol=reenrol,
    )


def _string_list(value: object) -> bool:
    """True if ``value`` is a JSON list of strings."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
