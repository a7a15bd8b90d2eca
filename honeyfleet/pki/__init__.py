"""The fleet PKI: one CA per fleet, SPIFFE-style identities, join tokens, revocation.

What it offers:

* ``identity`` - ``Role``, ``Identity`` (``spiffe://<fleet>/<role>/<name>``),
  ``identity_from_certificate``;
* ``ca`` - ``init_ca``, ``load_ca``, ``CertificateAuthority`` (``issue``, ``sign_csr``),
  and for joining hosts ``generate_key`` and ``csr_for`` (the key never leaves the host);
* ``tokens`` - ``create_token``, ``verify_token`` (controller), ``read_token_unverified``
  (joiner, for the CA pin);
* ``revocation`` - ``RevocationList``, cheap to ``refresh()`` from a server;
* ``files`` - ``write_private``: atomic 0600 writes;
* ``errors`` - ``PkiError`` and its subclasses;
* ``cli`` - ``add_parser`` for the ``honeyfleet pki`` commands (imported on demand).
"""

from __future__ import annotations

from honeyfleet.pki.ca import CertificateAuthority, IssuedFiles, init_ca, load_ca
from honeyfleet.pki.certs import (
    csr_for,
    fingerprint,
    generate_key,
    load_certificate,
    load_private_key,
    private_key_pem,
)
from honeyfleet.pki.errors import (
    CaCorrupt,
    CaError,
    CaExists,
    CaNotFound,
    CsrInvalid,
    IdentityError,
    IssueError,
    PkiError,
    PkiFileError,
    RevocationError,
    TokenError,
    TokenExpired,
    TokenInvalid,
)
from honeyfleet.pki.files import write_private
from honeyfleet.pki.identity import Identity, Role, identity_from_certificate
from honeyfleet.pki.revocation import Revocation, RevocationList
from honeyfleet.pki.tokens import TokenClaims, create_token, read_token_unverified, verify_token

__all__ = [
    "CaCorrupt",
    "CaError",
    "CaExists",
    "CaNotFound",
    "CertificateAuthority",
    "CsrInvalid",
    "Identity",
    "IdentityError",
    "IssueError",
    "IssuedFiles",
    "PkiError",
    "PkiFileError",
    "Revocation",
    "RevocationError",
    "RevocationList",
    "Role",
    "TokenClaims",
    "TokenError",
    "TokenExpired",
    "TokenInvalid",
    "create_token",
    "csr_for",
    "fingerprint",
    "generate_key",
    "identity_from_certificate",
    "init_ca",
    "load_ca",
    "load_certificate",
    "load_private_key",
    "private_key_pem",
    "read_token_unverified",
    "verify_token",
    "write_private",
]
