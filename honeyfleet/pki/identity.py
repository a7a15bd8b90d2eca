"""Fleet identities: who a certificate belongs to.

An identity is ``(fleet, role, name)`` and travels in a certificate as a single SPIFFE-style
URI SAN, ``spiffe://<fleet>/<role>/<name>``. Servers authorize by role and name taken from
that URI, never from the subject CN (which is informational only).

Clients check the server the same way, but gRPC Python can only check a DNS name during the
handshake (``grpc.ssl_target_name_override``), never a URI SAN or a callback. So every leaf
also carries the identity as two DNS names under the reserved ``.invalid`` top-level domain
(RFC 2606, never resolvable), which only the CA writes:

* ``<role>.<fleet>.hf.invalid`` - "some member of this role" (a client that wants any
  controller asks for this name);
* ``<name>.<role>.<fleet>.hf.invalid`` - this exact member (a sensor reaching the pool node
  a lease names).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from cryptography import x509

from honeyfleet.pki.errors import IdentityError

__all__ = [
    "IDENTITY_DNS_SUFFIX",
    "LABEL_PATTERN",
    "SPIFFE_SCHEME",
    "Identity",
    "Role",
    "identity_dns_name",
    "identity_from_certificate",
    "validate_label",
]

SPIFFE_SCHEME = "spiffe://"
#: Parent domain of the identity DNS names; operators' SANs may not use it.
IDENTITY_DNS_SUFFIX = "hf.invalid"

#: Fleet and node names: lowercase DNS-label-ish, so they are safe in URIs, file names and
#: log lines without escaping.
LABEL_PATTERN = r"[a-z0-9][a-z0-9._-]{0,62}"
_LABEL_RE = re.compile(LABEL_PATTERN)


class Role(enum.StrEnum):
    """What a fleet member is allowed to do; servers authorize each RPC by role."""

    CONTROLLER = "controller"
    POOLNODE = "poolnode"
    SENSOR = "sensor"
    ADMIN = "admin"

    @classmethod
    def parse(cls, value: str) -> Role:
        """Return the role spelled ``value``, or raise IdentityError listing valid roles."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(r.value for r in cls)
            raise IdentityError(f"unknown role {value!r}: use one of {valid}") from None


def validate_label(value: str, what: str) -> str:
    """Return ``value`` if it is a valid fleet or node name, else raise IdentityError.

    ``what`` names the field ("fleet", "name") so the message points at the bad input.
    """
    # fullmatch, not match+$: "$" would accept a trailing newline.
    if not isinstance(value, str) or _LABEL_RE.fullmatch(value) is None:
        raise IdentityError(
            f"invalid {what} {value!r}: use 1-63 characters of lowercase letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Identity:
    """A fleet member's identity: the fleet it belongs to, its role, and its unique name."""

    fleet: str
    """Trust domain; every certificate of one CA carries the same fleet."""
    role: Role
    """What the holder may do."""
    name: str
    """Unique per role within the fleet, e.g. a host name."""

    def __post_init__(self) -> None:
        """Validate all fields so an Identity can never hold an unsafe value."""
        validate_label(self.fleet, "fleet")
        validate_label(self.name, "name")
        if not isinstance(self.role, Role):
            # Accept plain strings from callers but store the enum, so comparisons are exact.
            object.__setattr__(self, "role", Role.parse(str(self.role)))

    @property
    def uri(self) -> str:
        """The SPIFFE id carried in the certificate's URI SAN."""
        return f"{SPIFFE_SCHEME}{self.fleet}/{self.role.value}/{self.name}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Parse ``spiffe://<fleet>/<role>/<name>``; raise IdentityError on anything else."""
        expected = "expected spiffe://<fleet>/<role>/<name>"
        if not isinstance(uri, str) or not uri.startswith(SPIFFE_SCHEME):
            raise IdentityError(f"invalid SPIFFE id {uri!r}: {expected}")
        parts = uri[len(SPIFFE_SCHEME) :].split("/")
        if len(parts) != 3:
            raise IdentityError(f"invalid SPIFFE id {uri!r}: {expected}")
        fleet, role, name = parts
        return cls(fleet=fleet, role=Role.parse(role), name=name)

    @property
    def dns_names(self) -> tuple[str, str]:
        """The identity DNS names the CA writes into this member's certificate."""
        return (
            identity_dns_name(self.fleet, self.role),
            identity_dns_name(self.fleet, self.role, self.name),
        )

    def __str__(self) -> str:
        """Short form for logs: ``role/name`` (the fleet is the same everywhere)."""
        return f"{self.role.value}/{self.name}"


def identity_dns_name(fleet: str, role: Role, name: str | None = None) -> str:
    """The DNS name a client checks to accept a server of ``role`` (and exactly ``name``)."""
    # Unambiguous: fleet and suffix are fixed per CA and a role never contains a dot.
    base = f"{Role.parse(role).value}.{fleet}.{IDENTITY_DNS_SUFFIX}"
    return base if name is None else f"{name}.{base}"


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """Return the identity in ``cert``'s SPIFFE URI SAN.

    Exactly one ``spiffe://`` URI SAN is required: with two, a server could authorize on one
    while logging the other.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError(
            f"certificate serial {cert.serial_number:x} has no subjectAltName; "
            "it was not issued by a honeyfleet CA - issue a new one with `honeyfleet pki issue`"
        ) from None
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(SPIFFE_SCHEME)
    ]
    if len(uris) != 1:
        raise IdentityError(
            f"certificate serial {cert.serial_number:x} has {len(uris)} spiffe:// URI SANs, "
            "expected exactly 1 - issue a new one with `honeyfleet pki issue`"
        )
    return Identity.parse(uris[0])
