"""Exceptions raised by the fleet PKI.

Every error message says what failed, which file or value was involved, and what the
operator should do next, because most of these surface verbatim on the command line.

Hierarchy::

    PkiError
    ├── IdentityError          bad fleet/role/name or SPIFFE id, or a cert without one
    ├── PkiFileError           a PKI file exists where it must not, or cannot be parsed
    ├── CaError
    │   ├── CaNotFound         no CA in the directory
    │   ├── CaExists           a CA is already there (refusing to re-initialise)
    │   └── CaCorrupt          CA files present but unreadable or inconsistent
    ├── IssueError             a certificate cannot be issued (bad SAN, validity...)
    │   └── CsrInvalid         a certificate signing request is malformed or forged
    ├── TokenError
    │   ├── TokenInvalid       malformed token or MAC mismatch
    │   └── TokenExpired       well-formed and authentic, but past its expiry
    └── RevocationError        the revocation list cannot be read or updated
"""

from __future__ import annotations

import grpc

from honeyfleet.errors import HoneyfleetError

__all__ = [
    "CaCorrupt",
    "CaError",
    "CaExists",
    "CaNotFound",
    "CsrInvalid",
    "IdentityError",
    "IssueError",
    "PkiError",
    "PkiFileError",
    "RevocationError",
    "TokenError",
    "TokenExpired",
    "TokenInvalid",
]


class PkiError(HoneyfleetError):
    """Root of every error raised by ``honeyfleet.pki``."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class IdentityError(PkiError):
    """A fleet, role, name or SPIFFE id is invalid, or a certificate carries no identity."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class PkiFileError(PkiError):
    """A PKI file would be overwritten, or exists but cannot be parsed."""


class CaError(PkiError):
    """Base class for problems with the CA directory."""


class CaNotFound(CaError):
    """The directory holds no certificate authority."""


class CaExists(CaError):
    """A certificate authority already exists where a new one was requested."""


class CaCorrupt(CaError):
    """The CA files exist but are unreadable or do not belong together."""


class IssueError(PkiError):
    """A certificate could not be issued with the requested parameters."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class CsrInvalid(IssueError):
    """A certificate signing request is malformed, oversized, or its signature is wrong."""


class TokenError(PkiError):
    """Base class for join-token problems."""

    code = grpc.StatusCode.UNAUTHENTICATED


class TokenInvalid(TokenError):
    """The token is malformed, oversized, or its MAC does not verify."""


class TokenExpired(TokenError):
    """The token is authentic but its expiry time has passed."""


class RevocationError(PkiError):
    """The revocation list cannot be read or updated."""
