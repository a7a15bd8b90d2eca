"""One-time join tokens: authorise an enrolment and pin the fleet CA for the joiner.

Format (ASCII, at most ``MAX_TOKEN_LENGTH`` characters)::

    hf1.<base64url(json claims)>.<base64url(HMAC-SHA256(token_key, "hf1." + payload))>

base64url is unpadded. The claims are ``role``, optional ``name`` (if present the joiner must
enrol under exactly that name), ``exp`` (unix seconds), ``jti`` (16 random bytes, hex: the
single-use id), ``ca`` (SHA-256 hex fingerprint of the CA certificate) and ``fleet``.

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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from honeyfleet.pki.ca import CertificateAuthority
from honeyfleet.pki.errors import IdentityError, TokenError, TokenExpired, TokenInvalid
from honeyfleet.pki.identity import Role, validate_label

__all__ = [
    "MAX_TOKEN_LENGTH",
    "TOKEN_PREFIX",
    "TokenClaims",
    "create_token",
    "read_token_unverified",
    "verify_token",
]

TOKEN_PREFIX = "hf1"  # noqa: S105 - a format version tag, not a secret
#: Tokens arrive from the network; a real one is ~300 characters.
MAX_TOKEN_LENGTH = 2048

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_JTI_RE = re.compile(r"[0-9a-f]{32}")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_CLAIM_KEYS = frozenset({"role", "name", "exp", "jti", "ca", "fleet"})
_REQUIRED_KEYS = _CLAIM_KEYS - {"name"}
_HOW_TO_FIX = "ask the fleet administrator for a new one (`honeyfleet pki token create`)"


@dataclass(frozen=True)
class TokenClaims:
    """The decoded claims of a join token."""

    role: Role
    """Role the joiner will be issued."""
    name: str | None
    """If set, the only name the joiner may enrol under."""
    expires_at: datetime
    """UTC expiry (the ``exp`` claim)."""
    jti: str
    """Single-use id, 32 hex digits; the controller records used ones."""
    ca_fingerprint: str
    """SHA-256 hex of the CA certificate DER; the joiner pins the controller's CA to it."""
    fleet: str
    """Fleet the token is for."""


def create_token(
    ca: CertificateAuthority, role: Role, *, ttl: timedelta, name: str | None = None
) -> str:
    """Create a join token for ``role`` (and optionally exactly ``name``) valid for ``ttl``."""
    role = Role.parse(role)
    if ttl <= timedelta(0):
        raise TokenError(f"token lifetime {ttl} is invalid: use a positive duration")
    if name is not None:
        validate_label(name, "name")
    claims: dict[str, Any] = {
        "role": role.value,
        "exp": int((datetime.now(UTC) + ttl).timestamp()),
        "jti": secrets.token_hex(16),
        "ca": ca.fingerprint,
        "fleet": ca.fleet,
    }
    if name is not None:
        claims["name"] = name
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
            f"join token claims {sorted(keys)} do not match the hf1 format; {_HOW_TO_FIX}"
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
    name = raw.get("name")
    try:
        role = Role.parse(raw["role"]) if isinstance(raw["role"], str) else None
        fleet = validate_label(raw["fleet"], "fleet")
        if name is not None:
            validate_label(name, "name")
    except IdentityError as exc:
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
    )
